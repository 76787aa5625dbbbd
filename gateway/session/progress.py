"""A session's events as the lines a person reads: what connect-now and the demo print."""
from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape


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
        self.record: dict | None = None
        self.reasons: list[str] = []  # the lines that say what went wrong, for --quiet
        self.summary: str | None = None

    def say(self, text: str, reason: bool = False) -> None:
        """One line of progress; ``text`` is rich markup, so outside text must be escaped."""
        if reason:
            self.reasons.append(text)
        if not self.quiet:
            self.out.print(text)

    def __call__(self, event: dict) -> None:
        kind = event.get("type")
        t = f"[dim]{time.monotonic() - self.started:6.1f}s[/dim]"
        if kind == "session":
            self.say(f"{t} session {event['id']} ({event['trigger']}, {event['mode']})")
        elif kind == "dialing":
            self.say(f"{t} bringing the link up ({event.get('backend')})")
        elif kind == "modem":
            self.say(f"{t} [cyan]modem[/cyan] {escape(str(event.get('text')))}")
        elif kind == "connected":
            self.say(f"{t} [green]CONNECTED[/green] {escape(event.get('description') or '')}")
        elif kind == "send":
            self._transfer(t, "send", event)
        elif kind == "fetch":
            self._transfer(t, "fetch", event)
        elif kind == "send-done":
            why = event.get("error")
            self.say(f"{t} sending done: {event['sent']} sent, {event['deferred']} deferred, "
                     f"{event['bounced']} bounced" + (f" [red]({escape(why)})[/red]" if why else ""), reason=bool(why))
        elif kind == "fetch-done":
            whys = event.get("errors") or []
            self.say(f"{t} fetching done: {event['fetched']} fetched"
                     + (f" [red]({escape('; '.join(whys))})[/red]" if whys else ""), reason=bool(whys))
        elif kind == "hangup":
            self.say(f"{t} hanging up")
        elif kind in ("error", "stopping", "refused"):
            text = str(event.get("message") or event.get("reason"))
            self.say(f"{t} [red]{kind}[/red]: {escape(text)}", reason=True)
        elif kind == "retry":
            self.say(f"{t} line dropped: trying again in {event['in']}s "
                     f"(retry {event['attempt']} of {event['of']})", reason=True)
        elif kind == "info":
            self.say(f"{t} {escape(str(event.get('message')))}")
        elif kind == "done":
            self.record = event.get("record")
            self.outcome = event.get("outcome")
            r = self.record or {}
            errors = r.get("errors") or []
            self.say(f"{t} session {event['id']} {self.outcome}: sent {r.get('sent', 0)}, "
                     f"deferred {r.get('deferred', 0)}, bounced {r.get('bounced', 0)}, "
                     f"fetched {r.get('fetched', 0)}; connected {r.get('connected_seconds', 0)}s"
                     f"{', cost ' + str(r.get('cost')) if r.get('cost') else ''}"
                     + (f" [red]— {escape('; '.join(errors))}[/red]" if errors else ""))
            self.summary = f"session {event['id']} {self.outcome}"
        elif kind == "end":
            self.outcome = event.get("outcome")

    def explain(self) -> None:
        """For --quiet after a failure: what failed and why, in the lines shown live."""
        if not self.quiet:
            return
        r = self.record or {}
        head = self.summary or f"session {self.outcome or 'failed'}"
        self.out.print(f"dialmail connect-now: {head}: sent {r.get('sent', 0)}, deferred {r.get('deferred', 0)}, "
                       f"bounced {r.get('bounced', 0)}, fetched {r.get('fetched', 0)}")
        for line in self.reasons:
            self.out.print(line)
        for err in r.get("errors") or []:
            if not any(escape(err) in line for line in self.reasons):
                self.out.print(f"  {escape(err)}")

    def _transfer(self, t: str, way: str, ev: dict) -> None:
        what = ev.get("qid") or ev.get("uid") or ev.get("message_id") or ""
        total, elapsed = ev.get("total"), ev.get("seconds")
        rate = f", {int(total) / max(float(elapsed), 1e-3) / 1024:.1f} KiB/s" if total and elapsed else ""
        size = f" {int(ev['size']) / 1024:.1f} KiB" if ev.get("size") is not None else ""
        count = f" [{ev['done']}/{ev['done'] + ev['left']}]" if ev.get("left") is not None else ""
        arrow = "→ sent" if way == "send" else "← fetched"
        self.say(f"{t} {arrow}{escape(count)} {escape(str(what))}{size}{rate}".rstrip())


# Exit codes of connect-now besides 0 (the session went through) and 1 (it failed):
# 75 (EX_TEMPFAIL) when part of the work is left for the next session, and the shell's
