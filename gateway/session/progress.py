"""A session's events as the lines a person reads: what connect-now and the demo print."""
from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape

from gateway.session.events import (
    Connected,
    Dialing,
    Done,
    End,
    Error,
    Etrn,
    EtrnFailed,
    Event,
    FetchDone,
    Fetched,
    Hangup,
    Info,
    ModemLine,
    Refused,
    Retry,
    SendDone,
    Sent,
    Started,
    Stopping,
    Summary,
)


class ProgressView:
    """Turns session events into lines and per-direction byte counters.

    ``quiet`` (for cron, which mails any output): nothing is printed as it happens; the
    lines that explain a failure are kept and printed by ``explain`` when it failed.
    """

    def __init__(self, out: Console, quiet: bool = False):
        self.out = out
        self.quiet = quiet
        self.started = time.monotonic()
        self.sent_bytes = 0
        self.fetched_bytes = 0
        self.outcome: str | None = None
        self.record: Summary | None = None
        self.reasons: list[str] = []  # the lines that say what went wrong, for --quiet
        self.summary: str | None = None

    def say(self, text: str, reason: bool = False) -> None:
        """One line of progress; ``text`` is rich markup, so outside text must be escaped."""
        if reason:
            self.reasons.append(text)
        if not self.quiet:
            self.out.print(text)

    def __call__(self, event: Event) -> None:
        t = f"[dim]{time.monotonic() - self.started:6.1f}s[/dim]"
        match event:
            case Started():
                self.say(f"{t} session {event.id} ({event.trigger}, {event.mode})")
            case Dialing():
                self.say(f"{t} bringing the link up ({event.backend})")
            case ModemLine():
                self.say(f"{t} [cyan]modem[/cyan] {escape(event.text)}")
            case Connected():
                self.say(f"{t} [green]CONNECTED[/green] {escape(event.description or '')}")
            case Sent():
                self._transfer(t, "→ sent", event.qid, event.size, event.total, event.seconds, event.done,
                               event.left)
            case Fetched():
                self._transfer(t, "← fetched", event.uid, event.size, None, None, event.done, event.left)
            case SendDone():
                why = event.error
                self.say(f"{t} sending done: {event.sent} sent, {event.deferred} deferred, {event.bounced} bounced"
                         + (f" [red]({escape(why)})[/red]" if why else ""), reason=bool(why))
            case FetchDone():
                whys = event.errors
                self.say(f"{t} fetching done: {event.fetched} fetched"
                         + (f" [red]({escape('; '.join(whys))})[/red]" if whys else ""), reason=bool(whys))
            case Etrn():
                self.say(f"{t} ETRN {escape(event.domain)}: {event.code} {escape(event.reply)}")
            case EtrnFailed():
                self.say(f"{t} [red]ETRN not sent[/red]: {escape(event.error)}", reason=True)
            case Hangup():
                self.say(f"{t} hanging up")
            case Error():
                self.say(f"{t} [red]error[/red]: {escape(event.message)}", reason=True)
            case Stopping() | Refused():
                self.say(f"{t} [red]{event.kind}[/red]: {escape(event.reason)}", reason=True)
            case Retry():
                self.say(f"{t} line dropped: trying again in {event.in_}s "
                         f"(retry {event.attempt} of {event.of})", reason=True)
            case Info():
                self.say(f"{t} {escape(event.message)}")
            case Done():
                self.record = r = event.record
                self.outcome = event.outcome
                self.say(f"{t} session {event.id} {self.outcome}: sent {r.sent}, deferred {r.deferred}, "
                         f"bounced {r.bounced}, fetched {r.fetched}; connected {r.connected_seconds}s"
                         f"{', cost ' + str(r.cost) if r.cost else ''}"
                         + (f" [red]— {escape('; '.join(r.errors))}[/red]" if r.errors else ""))
                self.summary = f"session {event.id} {self.outcome}"
            case End():
                self.outcome = event.outcome

    def explain(self) -> None:
        """For --quiet after a failure: what failed and why, in the lines shown live."""
        if not self.quiet:
            return
        r = self.record or Summary()
        head = self.summary or f"session {self.outcome or 'failed'}"
        self.out.print(f"dialmail connect-now: {head}: sent {r.sent}, deferred {r.deferred}, "
                       f"bounced {r.bounced}, fetched {r.fetched}")
        for line in self.reasons:
            self.out.print(line)
        for err in r.errors:
            if not any(escape(err) in line for line in self.reasons):
                self.out.print(f"  {escape(err)}")

    def _transfer(self, t: str, arrow: str, what: str, size: int | None, total: int | None,
                  elapsed: float | None, done: int, left: int | None) -> None:
        rate = f", {int(total) / max(float(elapsed), 1e-3) / 1024:.1f} KiB/s" if total and elapsed else ""
        shown = f" {int(size) / 1024:.1f} KiB" if size is not None else ""
        count = f" [{done}/{done + left}]" if left is not None else ""
        self.say(f"{t} {arrow}{escape(count)} {escape(str(what))}{shown}{rate}".rstrip())
