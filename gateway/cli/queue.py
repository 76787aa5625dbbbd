"""``dialmail queue`` and ``mailq``: inspect and manage the outbound queue."""
from __future__ import annotations

import asyncio
import sys
import time

import typer

from gateway.cli.app import (
    EX_TEMPFAIL,
    EX_USAGE,
    app,
    explained,
    fail,
    state,
)

queue_app = typer.Typer(help="Inspect and manage the outbound queue.", no_args_is_help=True)


def _queue(ctx):
    from spool.queue import Catalogue, Queue
    return Queue(Catalogue(state(ctx).config().spool_dir))


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@queue_app.command("list")
@explained
def queue_list(ctx: typer.Context):
    """Show queued messages: id, age, size, sender, recipients and their status."""
    _print_queue(_queue(ctx))


@app.command("mailq")
@explained
def mailq(ctx: typer.Context):
    """Same as 'queue list'."""
    _print_queue(_queue(ctx))


def _print_queue(queue) -> None:
    msgs = queue.messages()
    if not msgs:
        typer.echo("queue is empty")
        return
    now = time.time()
    typer.echo(f"{'ID':<20} {'AGE':>5} {'SIZE':>9}  SENDER / RECIPIENTS")
    for m in msgs:
        hold = "  (held)" if m.hold else ""
        typer.echo(f"{m.id:<20} {_age(now - m.arrival):>5} {m.size:>9}  <{m.sender}>{hold}")
        for r in m.recipients:
            detail = r.status
            if r.status not in ("queued",) and r.last_reply:
                # a failure dialmail decided itself has no reply code: its text stands alone
                said = f"{r.last_code} {r.last_reply}" if r.last_code else r.last_reply
                detail += f": {said}"
            if r.status in ("queued", "deferred") and r.next_retry > now:
                detail += f" (next try in {_age(r.next_retry - now)})"
            typer.echo(f"{'':<37}  {r.rcpt} [{r.route}] {detail}")
    total = sum(m.size for m in msgs)
    typer.echo(f"-- {len(msgs)} message(s), {total} bytes")


def _lookup(queue, qid: str):
    from gateway.office import operator
    try:
        return operator.lookup(queue, qid)
    except operator.NotQueued as exc:
        fail(str(exc), EX_USAGE)


def _operate(fn, *args):
    """One of the operator's changes (``gateway.office.operator``, shared with the web console)."""
    from gateway.office import operator
    try:
        return fn(*args)
    except operator.NotQueued as exc:
        fail(str(exc), EX_USAGE)


@queue_app.command("show")
@explained
def queue_show(ctx: typer.Context, qid: str):
    """Print one queued message: envelope, per-recipient status, then the message itself."""
    q = _queue(ctx)
    m = _lookup(q, qid)
    typer.echo(f"id: {m.id}\nsender: <{m.sender}>\narrived: {time.ctime(m.arrival)}\nsize: {m.size}\n"
               f"origin: {m.origin} {m.client or ''}\nhold: {'yes' if m.hold else 'no'}")
    for r in m.recipients:
        typer.echo(f"recipient: {r.rcpt} route={r.route} status={r.status} attempts={r.attempts}"
                   f"{' last=' + str(r.last_code) + ' ' + (r.last_reply or '') if r.last_code else ''}")
    typer.echo("")
    with q.open_body(m.id, check=False) as f:
        sys.stdout.flush()
        sys.stdout.buffer.write(f.read())


@queue_app.command("hold")
@explained
def queue_hold(ctx: typer.Context, qid: str):
    """Keep a message in the queue without sending it until released."""
    from gateway.office import operator
    _operate(operator.hold, _queue(ctx), qid)
    typer.echo(f"{qid}: held")


@queue_app.command("release")
@explained
def queue_release(ctx: typer.Context, qid: str):
    """Release a held message for the next session."""
    from gateway.office import operator
    changed = _operate(operator.release, _queue(ctx), qid)  # a body held as damaged goes as it is now
    typer.echo(f"{qid}: released" + (" (its body as it is now)" if changed else ""))


@queue_app.command("delete")
@explained
def queue_delete(ctx: typer.Context, qid: str):
    """Delete a message from the queue without a bounce."""
    from gateway.office import operator
    m = _operate(operator.delete, _queue(ctx), qid)
    typer.echo(f"{m.id}: deleted")


@queue_app.command("bounce")
@explained
def queue_bounce(ctx: typer.Context, qid: str):
    """Return a message to its sender now ("deleted by the administrator") and remove it."""
    from gateway.office import operator
    cfg = state(ctx).config()
    q = _queue(ctx)
    m, settled = _operate(operator.bounce, cfg, q, qid)
    if settled.local:
        deliver_local_now(cfg, q)
    notice = f"bounce {settled.bounce_id} to <{m.sender}>" if settled.bounce_id else "no bounce (null sender)"
    typer.echo(f"{m.id}: bounced, {notice}")


@queue_app.command("flush")
@explained
def queue_flush(ctx: typer.Context):
    """Bring the link up and send everything waiting now (back-off ignored); no fetching."""
    from gateway.relay import flush as relay
    from gateway.session import link
    from spool.fsio import is_disk_full
    cfg = state(ctx).config()
    q = _queue(ctx)

    async def send_all() -> relay.FlushResult:
        # The same bring-up as a dial session's, under the session lock; a line that drops
        # stops the flush at a message boundary, as in a session.
        async with link.for_queue_flush(cfg) as carrier_lost:
            return await relay.flush(cfg, q, stop_event=carrier_lost, force=True)

    try:
        result = asyncio.run(send_all())
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        # Nothing was sent that is not recorded: the flush refuses to send without room.
        fail(f"flush stopped: the spool's disk is full ({exc}); the mail waits until there is room",
             EX_TEMPFAIL)
    for r in result.results:
        typer.echo(f"{r.qid} <{r.rcpt}> {r.outcome.status}: {r.outcome.said}")
    if result.local_notices:
        deliver_local_now(cfg, q)
    typer.echo(f"-- {result.sent} delivered, {result.deferred} deferred, {result.bounced} bounced, "
               f"{result.messages} message(s), {result.bytes} bytes")
    if result.error is not None:
        fail(f"flush stopped: {result.error.said}", EX_TEMPFAIL)


def deliver_local_now(cfg, q) -> None:
    """Bounces for local senders go into their mailboxes at once, daemon or not (claims keep
    a running daemon from delivering the same recipient twice)."""
    from gateway.delivery.worker import LocalDelivery
    from gateway.office.directory import Directory
    from spool.users import Users
    delivery = LocalDelivery(cfg, q, Directory(cfg, Users(cfg.spool_dir)))
    while delivery.run_once():
        pass
