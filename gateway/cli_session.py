"""``connect-now``, ``log`` and ``status``: the session commands, with live progress."""
from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gateway.cli import EX_TEMPFAIL, app, explained, state

console = Console(stderr=False, highlight=False)


class ProgressView:
    """Turns session events into lines and per-direction byte counters."""

    def __init__(self, out: Console):
        self.out = out
        self.started = time.monotonic()
        self.sent_bytes = 0
        self.fetched_bytes = 0
        self.outcome: str | None = None
        self.record: dict | None = None

    def __call__(self, event: dict) -> None:
        kind = event.get("type")
        t = f"[dim]{time.monotonic() - self.started:6.1f}s[/dim]"
        if kind == "session":
            self.out.print(f"{t} session {event['id']} ({event['trigger']}, {event['mode']})")
        elif kind == "dialing":
            self.out.print(f"{t} bringing the link up ({event.get('backend')})")
        elif kind == "modem":
            self.out.print(f"{t} [cyan]modem[/cyan] {event.get('text')}")
        elif kind == "connected":
            self.out.print(f"{t} [green]CONNECTED[/green] {event.get('description') or ''}")
        elif kind == "send":
            self._transfer(t, "send", event)
        elif kind == "fetch":
            self._transfer(t, "fetch", event)
        elif kind == "send-done":
            self.out.print(f"{t} sending done: {event['sent']} sent, {event['deferred']} deferred, "
                           f"{event['bounced']} bounced")
        elif kind == "fetch-done":
            self.out.print(f"{t} fetching done: {event['fetched']} fetched")
        elif kind == "hangup":
            self.out.print(f"{t} hanging up")
        elif kind in ("error", "stopping", "refused"):
            self.out.print(f"{t} [red]{kind}[/red]: {event.get('message') or event.get('reason')}")
        elif kind == "retry":
            self.out.print(f"{t} line dropped: trying again in {event['in']}s "
                           f"(retry {event['attempt']} of {event['of']})")
        elif kind == "info":
            self.out.print(f"{t} {event.get('message')}")
        elif kind == "done":
            self.record = event.get("record")
            self.outcome = event.get("outcome")
            r = self.record or {}
            self.out.print(f"{t} session {event['id']} {self.outcome}: sent {r.get('sent', 0)}, "
                           f"deferred {r.get('deferred', 0)}, bounced {r.get('bounced', 0)}, "
                           f"fetched {r.get('fetched', 0)}; connected {r.get('connected_seconds', 0)}s"
                           f"{', cost ' + str(r.get('cost')) if r.get('cost') else ''}")
        elif kind == "end":
            self.outcome = event.get("outcome")

    def _transfer(self, t: str, way: str, ev: dict) -> None:
        what = ev.get("qid") or ev.get("uid") or ev.get("message_id") or ""
        total, elapsed = ev.get("total"), ev.get("seconds")
        rate = f", {int(total) / max(float(elapsed), 1e-3) / 1024:.1f} KiB/s" if total and elapsed else ""
        size = f" {int(ev['size']) / 1024:.1f} KiB" if ev.get("size") is not None else ""
        count = f" [{ev['done']}/{ev['done'] + ev['left']}]" if ev.get("left") is not None else ""
        arrow = "→ sent" if way == "send" else "← fetched"
        self.out.print(f"{t} {arrow}{count} {what}{size}{rate}".rstrip())


@app.command("connect-now")
@explained
def connect_now(ctx: typer.Context,
                send_only: Annotated[bool, typer.Option("--send-only", help="Only send the queue.")] = False,
                fetch_only: Annotated[bool, typer.Option("--fetch-only", help="Only fetch new mail.")] = False,
                wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the session until it ends "
                                                   "(default).")] = True):
    """Bring the link up now, send and fetch, hang up; shows live progress.

    Asks the running daemon if there is one, else runs the session itself.
    Exits non-zero when the session failed, so cron can mail the admin.
    """
    if send_only and fetch_only:
        typer.echo("dialmail: --send-only and --fetch-only exclude each other", err=True)
        raise typer.Exit(64)
    mode = "send" if send_only else "fetch" if fetch_only else "both"
    cfg = state(ctx).config()
    view = ProgressView(console)
    outcome = asyncio.run(_connect(cfg, mode, view, wait))
    if outcome not in ("ok", "started"):
        raise typer.Exit(EX_TEMPFAIL if outcome in ("partial", "refused") else 1)


async def _connect(cfg, mode: str, view: ProgressView, wait: bool) -> str:
    from gateway.control import NoDaemon, request
    try:
        async for event in request(cfg.spool_dir, {"cmd": "connect", "mode": mode}):
            view(event)
            if not wait and event.get("type") in ("session", "info"):
                return "started"
        return view.outcome or "failed"
    except NoDaemon:
        pass
    from gateway.daemon import Spool
    from gateway.session import SessionContext, run_with_retries
    spool = Spool(cfg)
    try:
        rec = await run_with_retries(SessionContext(cfg, spool), "manual", mode, emit=view)
        return rec.outcome
    finally:
        spool.close()


@app.command("log")
@explained
def session_log(ctx: typer.Context,
                last: Annotated[int, typer.Option("--last", "-n", help="How many sessions.")] = 20):
    """The session log: one row per dial session."""
    from spool.queue import Catalogue
    from spool.sessions import SessionLog
    cfg = state(ctx).config()
    cat = Catalogue(cfg.spool_dir)
    rows = SessionLog(cat).last(last)
    cat.close()
    table = Table(title=f"last {len(rows)} session(s)")
    for col in ("#", "started", "trigger", "outcome", "bit/s", "online", "bytes up/down", "sent/defer/bounce",
                "fetched", "cost", "errors"):
        table.add_column(col, justify="left" if col in ("started", "trigger", "outcome", "errors") else "right",
                         no_wrap=col != "errors")
    cur = cfg.session.currency
    for sid, r in rows:
        table.add_row(str(sid), dt.datetime.fromtimestamp(r.started).strftime("%m-%d %H:%M:%S"), r.trigger,
                      r.outcome, str(r.connect_rate or "-"), f"{r.connected_seconds:.0f}s",
                      f"{r.bytes_up}/{r.bytes_down}", f"{r.sent}/{r.deferred}/{r.bounced}", str(r.fetched),
                      f"{r.cost:.2f}{(' ' + cur) if cur else ''}", "; ".join(r.errors) or "-")
    Console(width=max(console.width, 132)).print(table)


@app.command("status")
@explained
def status(ctx: typer.Context):
    """Daemon and link state, queue counts, next scheduled dial, last session."""
    from gateway.control import NoDaemon, request
    cfg = state(ctx).config()

    async def ask():
        async for event in request(cfg.spool_dir, {"cmd": "status"}):
            return event
    try:
        st = asyncio.run(ask())
    except NoDaemon:
        st = None
    if st is None:
        from gateway import dialtimes
        from spool.queue import Catalogue, Queue
        from spool.sessions import SessionLog
        cat = Catalogue(cfg.spool_dir)
        counts = Queue(cat).counts()
        last = SessionLog(cat).last(1)
        cat.close()
        nxt = dialtimes.next_dial(cfg.schedule.rules, dt.datetime.now())
        typer.echo("daemon: not running")
        _print_status(counts, nxt.isoformat(sep=" ", timespec="minutes") if nxt else None,
                      last[-1][1].__dict__ | {"id": last[-1][0]} if last else None)
        return
    typer.echo(f"daemon: running (pid {st['pid']})")
    typer.echo(f"link: {st['link']}")
    _print_status(st["queue"], st["next_dial"], st["last_session"])


def _print_status(counts: dict, next_dial, last) -> None:
    typer.echo(f"queue: {counts['messages']} message(s), {counts['bytes']} bytes; "
               f"{counts['relay']} recipient(s) waiting to be sent ({counts['deferred']} deferred), "
               f"{counts['held']} held")
    typer.echo(f"next scheduled dial: {next_dial or 'none'}")
    if last:
        started = dt.datetime.fromtimestamp(last["started"]).strftime("%Y-%m-%d %H:%M")
        typer.echo(f"last session: #{last['id']} {started} {last['trigger']} {last['outcome']}, sent "
                   f"{last['sent']}, fetched {last['fetched']}"
                   + (f"; errors: {'; '.join(last['errors'])}" if last.get("errors") else ""))
    else:
        typer.echo("last session: none yet")
