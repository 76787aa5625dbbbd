"""The ``dialmail`` command.  It alone chooses exit codes (sysexits style)."""
from __future__ import annotations

import asyncio
import functools
import getpass
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from gateway import config as config_mod
from gateway.mail.errors import (
    ConfigError,
    DialmailError,
    OperationalError,
    PermanentError,
    TransientError,
)

EX_USAGE, EX_UNAVAILABLE, EX_SOFTWARE, EX_TEMPFAIL, EX_CONFIG = 64, 69, 70, 75, 78

app = typer.Typer(help="dialmail: the office mail server for an intermittent Internet link.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
users_app = typer.Typer(help="Local users and their passwords.", no_args_is_help=True)
queue_app = typer.Typer(help="Inspect and manage the outbound queue.", no_args_is_help=True)
app.add_typer(users_app, name="users")
app.add_typer(queue_app, name="queue")


class State:
    def __init__(self, config_path: Optional[Path], verbose: bool):
        self.config_path = config_path
        self.verbose = verbose
        self._config = None

    def config(self) -> config_mod.Config:
        if self._config is None:
            self._config = config_mod.load(self.config_path)
        return self._config


def fail(message: str, code: int) -> None:
    typer.echo(f"dialmail: {message}", err=True)
    raise typer.Exit(code)


def explained(fn):
    """Turn dialmail's errors into one line on stderr and a sysexits code."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            fail(f"configuration error: {exc}", EX_CONFIG)
        except PermanentError as exc:
            fail(f"error: {exc}", EX_UNAVAILABLE)
        except (TransientError, OperationalError) as exc:
            fail(f"error: {exc}", EX_TEMPFAIL)
        except DialmailError as exc:
            fail(f"error: {exc}", EX_SOFTWARE)
    return wrapper


def state(ctx: typer.Context) -> State:
    return ctx.find_root().obj


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.WARNING)


@app.callback()
def main_options(ctx: typer.Context,
                 config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Configuration file "
                                   "(default: $DIALMAIL_CONFIG, then /etc/dialmail/dialmail.toml).")] = None,
                 verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False):
    ctx.obj = State(config, verbose)


# ---------------------------------------------------------------- check / run


@app.command()
@explained
def check(ctx: typer.Context):
    """Validate the configuration against this machine (users, files, clamd) and print a summary.

    Exits 78 when anything would fail once the daemon runs or the link is up; warnings only tell.
    """
    from gateway import preflight
    cfg = state(ctx).config()
    findings = preflight.check(cfg)
    errors = [f for f in findings if f.level == preflight.ERROR]
    for f in findings:
        typer.echo(f"dialmail: {'configuration error' if f.level == preflight.ERROR else 'warning'}: {f}",
                   err=True)
    if errors:
        fail(f"{cfg.path}: {len(errors)} problem{'s' if len(errors) > 1 else ''} to fix before dialmail runs",
             EX_CONFIG)
    s = cfg.server
    warned = len(findings)
    typer.echo(f"configuration {cfg.path}: OK" + (f" ({warned} warning{'s' if warned > 1 else ''})" if warned else ""))
    typer.echo(f"  hostname      {s.hostname}")
    typer.echo(f"  domains       {', '.join(s.domains)}")
    typer.echo(f"  spool         {s.spool_dir}")
    typer.echo(f"  mynetworks    {', '.join(str(n) for n in s.mynetworks)}")
    typer.echo(f"  smtp          {', '.join(map(str, cfg.smtp.listen))}  max {cfg.smtp.max_message_size} bytes"
               f"{'  STARTTLS' if cfg.smtp.tls_cert else ''}")
    typer.echo(f"  pop3          {', '.join(map(str, cfg.pop3.listen))}{'  STLS' if cfg.pop3.tls_cert else ''}")
    sh = cfg.smarthost
    typer.echo(f"  smarthost     {sh.host or '-'}:{sh.port} starttls={sh.starttls}"
               f"{' auth=' + sh.username if sh.username else ''} route={sh.route}")
    for f in cfg.fetch:
        target = f.deliver_to if f.mode == "single" else f"multidrop via {f.envelope_header or 'To/Cc guess'}"
        typer.echo(f"  fetch         {f.name}: {f.username}@{f.host}:{f.port} ({f.tls}) {', '.join(f.folders)}"
                   f" -> {target}{' keep' if f.keep else ''}")
    typer.echo(f"  link          {cfg.link.type}")
    typer.echo(f"  schedule      {', '.join(cfg.schedule.dial) or '-'}")
    typer.echo(f"  aliases       {len(cfg.aliases)}")


@app.command()
@explained
def run(ctx: typer.Context):
    """Run the daemon in the foreground (SMTP, POP3, local delivery, scheduler, control socket)."""
    from gateway import preflight
    from gateway.daemon import Daemon
    st = state(ctx)
    cfg = st.config()
    setup_logging(st.verbose)
    preflight.at_start(cfg)  # logs what `dialmail check` would say; refuses a postmaster that loses mail
    asyncio.run(Daemon(cfg, services=default_services()).serve())


def default_services():
    """Services the daemon runs beside SMTP and local delivery."""
    from gateway import control
    from gateway.pop3 import server as pop3
    from gateway.session import scheduler
    return [pop3.service, control.service, scheduler.service]


# ---------------------------------------------------------------- sendmail


# sendmail's own options (-t, -i, -f ...) are not click options: they reach parse_args as they
# came, and so does --help, which prints sendmail's usage rather than click's.
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": []})
@explained
def sendmail(ctx: typer.Context):
    """sendmail-compatible: queue a message read from stdin (options: dialmail sendmail --help)."""
    from gateway.cli.sendmail import USAGE, parse_args, submit
    try:
        opts = parse_args(ctx.args)
    except ValueError as exc:
        fail(f"sendmail: {exc} (sendmail --help lists the options)", EX_USAGE)
    if opts.help:
        typer.echo(USAGE, nl=False)
        return
    cfg = state(ctx).config()
    qid = submit(cfg, opts, sys.stdin.buffer, login=_login_name())
    if opts.verbose:
        typer.echo(f"queued as {qid}")


def _login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())


# ---------------------------------------------------------------- users


def _users(ctx):
    from spool.users import Users
    return Users(state(ctx).config().spool_dir)


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        fail("the passwords differ", EX_USAGE)
    return first


@users_app.command("add")
@explained
def users_add(ctx: typer.Context, name: str,
              password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from "
                                                                                      "the first line of stdin.")] = False):
    """Add a local user (a mailbox in every local domain, or only in DOMAIN for NAME@DOMAIN)."""
    from spool.users import UserError
    server = state(ctx).config().server
    domain = name.rpartition("@")[2].strip().lower() if "@" in name else None
    if domain is not None and not server.is_local_domain(domain):
        # Mail to such a user would be relayed out to that domain, never into this mailbox.
        fail(f"{domain} is not a local domain (have: {', '.join(server.domains)}); add it to [server] domains "
             f"first, or give the bare name to have a mailbox in every local domain", EX_USAGE)
    try:
        _users(ctx).add(name, _read_password(password_stdin))
    except UserError as exc:
        fail(str(exc), EX_USAGE)
    typer.echo(f"user {name.lower()} added")


@users_app.command("passwd")
@explained
def users_passwd(ctx: typer.Context, name: str,
                 password_stdin: Annotated[bool, typer.Option("--password-stdin")] = False):
    """Change a user's password."""
    from spool.users import UserError
    try:
        _users(ctx).set_password(name, _read_password(password_stdin))
    except UserError as exc:
        fail(str(exc), EX_USAGE)
    typer.echo(f"password of {name.lower()} changed")


@users_app.command("del")
@explained
def users_del(ctx: typer.Context, name: str):
    """Delete a user (the mailbox stays on disk)."""
    from spool.users import UserError
    try:
        _users(ctx).delete(name)
    except UserError as exc:
        fail(str(exc), EX_USAGE)
    typer.echo(f"user {name.lower()} deleted (mailbox kept)")


@users_app.command("list")
@explained
def users_list(ctx: typer.Context):
    """List local users."""
    for name in _users(ctx).names():
        typer.echo(name)


# ---------------------------------------------------------------- queue


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
                detail += f": {r.last_code or ''} {r.last_reply}".rstrip()
            if r.status in ("queued", "deferred") and r.next_retry > now:
                detail += f" (next try in {_age(r.next_retry - now)})"
            typer.echo(f"{'':<37}  {r.rcpt} [{r.route}] {detail}")
    total = sum(m.size for m in msgs)
    typer.echo(f"-- {len(msgs)} message(s), {total} bytes")


def _lookup(queue, qid: str):
    msg = queue.find(qid)
    if msg is None:
        fail(f"no queued message matches {qid!r}", EX_USAGE)
    return msg


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
    with q.open_body(m.id) as f:
        sys.stdout.flush()
        sys.stdout.buffer.write(f.read())


@queue_app.command("hold")
@explained
def queue_hold(ctx: typer.Context, qid: str):
    """Keep a message in the queue without sending it until released."""
    q = _queue(ctx)
    q.set_hold(_lookup(q, qid).id, True)
    typer.echo(f"{qid}: held")


@queue_app.command("release")
@explained
def queue_release(ctx: typer.Context, qid: str):
    """Release a held message for the next session."""
    q = _queue(ctx)
    m = _lookup(q, qid)
    q.set_hold(m.id, False)
    q.reschedule(m.id, 0)
    typer.echo(f"{qid}: released")


@queue_app.command("delete")
@explained
def queue_delete(ctx: typer.Context, qid: str):
    """Delete a message from the queue without a bounce."""
    q = _queue(ctx)
    m = _lookup(q, qid)
    q.remove(m.id)
    typer.echo(f"{m.id}: deleted")


@queue_app.command("bounce")
@explained
def queue_bounce(ctx: typer.Context, qid: str):
    """Return a message to its sender now ("deleted by the administrator") and remove it."""
    from gateway.mail.outcome import administrator_bounce
    from gateway.office.bounce import bounce_now
    cfg = state(ctx).config()
    q = _queue(ctx)
    m = _lookup(q, qid)
    settled = bounce_now(cfg, q, m.id, administrator_bounce())
    if settled.local:
        _deliver_local_now(cfg, q)
    notice = f"bounce {settled.bounce_id} to <{m.sender}>" if settled.bounce_id else "no bounce (null sender)"
    typer.echo(f"{m.id}: bounced, {notice}")


@queue_app.command("flush")
@explained
def queue_flush(ctx: typer.Context):
    """Bring the link up and send everything waiting now (back-off ignored); no fetching."""
    from gateway.relay import flush as relay
    from gateway.session import link
    cfg = state(ctx).config()
    q = _queue(ctx)

    async def send_all() -> relay.FlushResult:
        # The same bring-up as a dial session's, under the session lock; a line that drops
        # stops the flush at a message boundary, as in a session.
        async with link.for_queue_flush(cfg) as carrier_lost:
            return await relay.flush(cfg, q, stop_event=carrier_lost, force=True)

    result = asyncio.run(send_all())
    for r in result.results:
        typer.echo(f"{r.qid} <{r.rcpt}> {r.outcome.status}: {r.outcome.code} {r.outcome.reply}")
    if result.local_notices:
        _deliver_local_now(cfg, q)
    typer.echo(f"-- {result.sent} delivered, {result.deferred} deferred, {result.bounced} bounced, "
               f"{result.messages} message(s), {result.bytes} bytes")
    if result.error is not None:
        fail(f"flush stopped: {result.error.code} {result.error.reply}", EX_TEMPFAIL)


@app.command("fetch")
@explained
def fetch_now(ctx: typer.Context,
              account: Annotated[Optional[list[str]], typer.Option("--account", "-a",
                                 help="Only the fetch account of this name (repeatable).")] = None):
    """Collect mail from the ISP mailboxes now (no dialling: the link must be up) and deliver it."""
    from gateway.fetch.imap import fetch_all
    from gateway.office.directory import Directory
    from spool.users import Users
    st = state(ctx)
    cfg = st.config()
    if st.verbose:
        setup_logging(True)
    names = [a.name for a in cfg.fetch]
    for name in account or []:
        if name not in names:
            fail(f"no [[fetch]] account named {name!r} (have: {', '.join(names) or 'none'})", EX_USAGE)
    from spool.queue import Catalogue, Queue
    cat = Catalogue(cfg.spool_dir)
    q = Queue(cat)
    result = asyncio.run(fetch_all(cfg, q, cat, Directory(cfg, Users(cfg.spool_dir)),
                                   accounts=list(account) if account else None))
    _deliver_local_now(cfg, q)
    for r in result.accounts:
        typer.echo(r.summary())
    if result.errors:
        raise typer.Exit(EX_TEMPFAIL)


def _deliver_local_now(cfg, q) -> None:
    """Bounces for local senders go into their mailboxes at once, daemon or not (claims keep
    a running daemon from delivering the same recipient twice)."""
    from gateway.delivery.worker import LocalDelivery
    from gateway.office.directory import Directory
    from spool.users import Users
    delivery = LocalDelivery(cfg, q, Directory(cfg, Users(cfg.spool_dir)))
    while delivery.run_once():
        pass


# Linked as /usr/sbin/sendmail or /usr/bin/mailq, dialmail is that command (as Postfix's
# sendmail is): cron and scripts run it by those names, with sendmail's options.
INVOKED_AS = {"sendmail": "sendmail", "mailq": "mailq"}


def main() -> None:
    command = INVOKED_AS.get(os.path.basename(sys.argv[0]))
    if command is None:
        app()
    else:
        app(args=[command, *sys.argv[1:]], prog_name="dialmail")
