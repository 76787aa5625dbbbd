"""``connect-now``, ``hangup``, ``log`` and ``status``: the session commands, with live progress."""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import signal
import textwrap
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gateway.cli.app import EX_TEMPFAIL, EX_UNAVAILABLE, app, explained, state
from gateway.session.events import Done, Error, Hangup, HungUp, Info, Started, Stopping
from gateway.session.progress import ProgressView

# soft_wrap: a long reason stays one line (the terminal folds it; cron mail and grep keep it whole).
console = Console(stderr=False, highlight=False, soft_wrap=True)

WIDE_LOG = 120  # terminal columns from which `dialmail log` shows the bit rate and byte counts


# Exit codes of connect-now besides 0 (the session went through) and 1 (it failed):
# 75 (EX_TEMPFAIL) when part of the work is left for the next session, and the shell's
# 128 + signal when this command itself was interrupted.
EX_INTERRUPTED = {"Ctrl-C": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}


@app.command("connect-now")
@explained
def connect_now(ctx: typer.Context,
                send_only: Annotated[bool, typer.Option("--send-only", help="Only send the queue.")] = False,
                fetch_only: Annotated[bool, typer.Option("--fetch-only", help="Only fetch new mail.")] = False,
                wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the session until it ends "
                                                   "(default).")] = True,
                quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing unless the session "
                                                    "failed; then say what failed and why (for cron).")] = False):
    """Bring the link up now, send and fetch, hang up; shows live progress.

    Asks the running daemon if there is one, else runs the session itself.  Ctrl-C
    then ends the session at a safe point and hangs up (a second Ctrl-C cuts it off);
    with the daemon, Ctrl-C only stops following: `dialmail hangup` ends the session.
    Exits non-zero when the session failed or was interrupted, so cron can mail the admin.
    """
    if send_only and fetch_only:
        typer.echo("dialmail: --send-only and --fetch-only exclude each other", err=True)
        raise typer.Exit(64)
    mode = "send" if send_only else "fetch" if fetch_only else "both"
    cfg = state(ctx).config()
    view = ProgressView(console, quiet=quiet)
    outcome, signalled = asyncio.run(_connect(cfg, mode, view, wait))
    if outcome in ("ok", "started"):
        return
    if outcome != "detached":
        view.explain()
    if signalled:
        raise typer.Exit(EX_INTERRUPTED[signalled])
    raise typer.Exit(EX_TEMPFAIL if outcome in ("partial", "refused", "interrupted") else 1)


async def _connect(cfg, mode: str, view: ProgressView, wait: bool) -> tuple[str, str | None]:
    """The session's outcome (or "started", "detached") and the signal that interrupted it here."""
    from gateway.control import NoDaemon, request
    loop = asyncio.get_running_loop()
    follower = asyncio.current_task()
    loop.add_signal_handler(signal.SIGINT, follower.cancel)
    try:
        async with contextlib.aclosing(request(cfg.spool_dir, {"cmd": "connect", "mode": mode})) as events:
            async for event in events:
                view(event)
                if not wait and isinstance(event, (Started, Info)):
                    return "started", None
        return view.outcome or "failed", None
    except NoDaemon:
        pass
    except asyncio.CancelledError:
        follower.uncancel()
        # Ctrl-C stops the viewer only; the daemon's session is not ours to end.
        view.out.print("\nstopped following: the session goes on in the daemon; "
                       "`dialmail hangup` ends it", highlight=False)
        return "detached", "Ctrl-C"
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    return await _run_here(cfg, mode, view)


async def _run_here(cfg, mode: str, view: ProgressView) -> tuple[str, str | None]:
    """No daemon: run the session in this process; Ctrl-C or SIGTERM interrupt it at a safe point."""
    from gateway import preflight
    from gateway.daemon import Spool
    preflight.before_dial(cfg)
    from gateway.session.session import SessionContext, SessionControl, run_with_retries
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    control = SessionControl()

    def interrupted(by: str) -> None:
        if control.interrupted_by is None:
            if control.interrupt(by):
                view.say(f"{by}: ending the session at a safe point and hanging up (Ctrl-C again cuts it off)")
        else:  # asked twice: stop now; the session log still gets its record
            main.cancel()

    for sig, name in ((signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")):
        loop.add_signal_handler(sig, interrupted, name)
    spool = Spool(cfg)
    try:
        rec = await run_with_retries(SessionContext(cfg, spool), "manual", mode, emit=view, control=control)
        return rec.outcome, control.interrupted_by
    except asyncio.CancelledError:
        main.uncancel()
        return "interrupted", control.interrupted_by or "Ctrl-C"
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        spool.close()


@app.command("hangup")
@explained
def hangup(ctx: typer.Context):
    """End the running dial session at a safe point and hang up the line.

    Mail in flight stays queued for the next session, as at the session's max_time.
    """
    from gateway.control import HangupAsked, NoDaemon, NoSession, request
    from spool.sessions import SessionLock
    cfg = state(ctx).config()
    view = ProgressView(console)

    async def ask() -> str | None:
        async for event in request(cfg.spool_dir, {"cmd": "hangup"}):
            if isinstance(event, NoSession):
                return None
            if isinstance(event, HangupAsked):
                typer.echo("asked the daemon to end the session at a safe point and hang up")
            elif isinstance(event, (Stopping, Hangup, HungUp, Done, Error)):
                view(event)
        return view.outcome or "ended"

    try:
        outcome = asyncio.run(ask())
    except NoDaemon:
        holder = SessionLock(cfg.spool_dir).holder()
        if holder:
            # A connect-now running the session itself: its own Ctrl-C or SIGTERM ends it.
            typer.echo(f"no daemon is running; a session runs in process {holder} (connect-now): press Ctrl-C "
                       f"there, or `kill -TERM {holder}`, to end it at a safe point")
            raise typer.Exit(EX_UNAVAILABLE) from None
        outcome = None
    if outcome is None:
        typer.echo("no dial session is running; nothing to hang up")


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
    width = console.width
    # Errors are printed under the table, one wrapped paragraph per session: a column of
    # their own would be a few characters wide on a terminal and wrap word by word.
    wide = width >= WIDE_LOG
    table = Table(title=f"last {len(rows)} session(s)", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                  collapse_padding=not wide)
    columns = ("#", "started", "trigger", "outcome", "bit/s", "online", "bytes up/down", "sent/defer/bounce",
               "fetched", "wire/mail", "cost") if wide else ("#", "started", "trigger", "outcome", "online",
                                                             "sent/def/bnc", "fetched", "wire/mail", "cost")
    for col in columns:
        table.add_column(col, justify="left" if col in ("started", "trigger", "outcome") else "right", no_wrap=True)
    cur = cfg.session.currency
    for sid, r in rows:
        cells = {"#": str(sid), "started": dt.datetime.fromtimestamp(r.started).strftime("%m-%d %H:%M:%S" if wide else "%m-%d %H:%M"),
                 "trigger": r.trigger, "outcome": r.outcome + ("*" if r.errors else ""),
                 "bit/s": str(r.connect_rate or "-"), "online": f"{r.connected_seconds:.0f}s",
                 "bytes up/down": f"{r.bytes_up}/{r.bytes_down}",
                 "sent/defer/bounce": f"{r.sent}/{r.deferred}/{r.bounced}",
                 "sent/def/bnc": f"{r.sent}/{r.deferred}/{r.bounced}", "fetched": str(r.fetched),
                 "wire/mail": _ratio(r.fetch_wire_down, r.fetched_bytes),
                 "cost": f"{r.cost:.2f}{(' ' + cur) if cur and wide else ''}"}
        table.add_row(*(escape(cells[c]) for c in columns))
    Console(width=width, highlight=False).print(table)
    with_errors = [(sid, r) for sid, r in rows if r.errors]
    if with_errors:
        typer.echo("* errors:")
    for sid, r in with_errors:
        lead = f"  #{sid} "
        for n, err in enumerate(r.errors):
            typer.echo(textwrap.fill(err, width=max(width - 1, 40), initial_indent=lead if n == 0 else " " * len(lead),
                                     subsequent_indent=" " * (len(lead) + 2), break_on_hyphens=False))


@app.command("status")
@explained
def status(ctx: typer.Context):
    """Daemon and link state, queue counts, next scheduled dial, last session."""
    from gateway.control import NoDaemon, Status, request
    cfg = state(ctx).config()

    async def ask() -> Status | None:
        async for event in request(cfg.spool_dir, {"cmd": "status"}):
            return event if isinstance(event, Status) else None
        return None
    try:
        st = asyncio.run(ask())
    except NoDaemon:
        st = None
    if st is None:
        from gateway.config import dialtimes
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
        _print_logins(cfg)
        return
    typer.echo(f"daemon: running (pid {st.pid})")
    typer.echo(f"link: {st.link}")
    _print_status(st.queue, st.next_dial, st.last_session)
    _print_logins(cfg)


def _print_logins(cfg) -> None:
    from gateway.oauth.tokens import sign_ins_needed
    for line in sign_ins_needed(cfg):
        typer.echo(f"oauth: {line}")


def _ratio(wire: int, mail: int) -> str:
    """Bytes the fetch moved per byte of mail fetched: below 1 where COMPRESS worked."""
    return f"{wire / mail:.2f}" if wire and mail else "-"


def _print_status(counts: dict, next_dial, last) -> None:
    typer.echo(f"queue: {counts['messages']} message(s), {counts['bytes']} bytes; "
               f"{counts['relay']} recipient(s) waiting to be sent ({counts['deferred']} deferred), "
               f"{counts['held']} held")
    typer.echo(f"next scheduled dial: {next_dial or 'none'}")
    if last:
        started = dt.datetime.fromtimestamp(last["started"]).strftime("%Y-%m-%d %H:%M")
        ratio = _ratio(last.get("fetch_wire_down", 0), last.get("fetched_bytes", 0))
        typer.echo(f"last session: #{last['id']} {started} {last['trigger']} {last['outcome']}, sent "
                   f"{last['sent']}, fetched {last['fetched']}"
                   + (f" (the fetch moved {ratio} x the mail's bytes)" if ratio != "-" else "")
                   + (f"; errors: {'; '.join(last['errors'])}" if last.get("errors") else ""))
    else:
        typer.echo("last session: none yet")
