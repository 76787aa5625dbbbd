"""``dialmail aliases list``, ``dialmail users vacation`` and ``users forward``: the delivery policy from the shell."""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Optional

import typer

from gateway.cli.app import EX_USAGE, explained, fail, state
from gateway.cli.users import users_app
from gateway.config import parse_duration

aliases_app = typer.Typer(help="Aliases, groups, forwards and catch-alls, with what they expand to.",
                          no_args_is_help=True)


def _directory(ctx):
    from gateway.office.directory import Directory
    from spool.users import Users
    cfg = state(ctx).config()
    return cfg, Directory(cfg, Users(cfg.spool_dir))


@aliases_app.command("list")
@explained
def aliases_list(ctx: typer.Context):
    """Print every alias, group, forward, catch-all and automatic reply, and where mail to it goes."""
    from gateway.delivery import listing
    from gateway.delivery.stages.autoreply import Responder
    from spool.policystate import PolicyState
    from spool.queue import Catalogue, Queue
    cfg, directory = _directory(ctx)
    queue = Queue(Catalogue(cfg.spool_dir))
    responder = Responder(cfg, queue, directory, PolicyState.beside(queue))
    for line in listing.lines(cfg, directory, responder):
        typer.echo(line)


def _subject(fixed: Optional[str]) -> str:
    return fixed or "Auto: <subject answered>"


@users_app.command("vacation")
@explained
def users_vacation(ctx: typer.Context, name: str,
                   start: Annotated[Optional[str],
                                    typer.Option(help="First day (2026-07-01 or 2026-07-01T08:00).")] = None,
                   end: Annotated[Optional[str], typer.Option(help="Last day (inclusive) or end time.")] = None,
                   subject: Annotated[Optional[str],
                                      typer.Option(help="Subject of the reply (default: \"Auto: \" and the "
                                                        "subject answered).")] = None,
                   message_file: Annotated[Optional[Path], typer.Option(help="Text of the reply (UTF-8).")] = None,
                   every: Annotated[Optional[str],
                                    typer.Option(help="Answer one sender at most once per this long "
                                                      "(default: policy autoreply_every).")] = None,
                   off: Annotated[bool, typer.Option("--off", help="Turn the out-of-office off.")] = False,
                   show: Annotated[bool, typer.Option("--show", help="Print the current setting.")] = False):
    """Turn a user's out-of-office reply on (with dates, subject and text) or off; overrides the config file's vacation table."""
    from spool.policystate import PolicyState
    from spool.queue import Catalogue
    from spool.users import Users
    cfg = state(ctx).config()
    user = name.strip().lower()
    if not Users(cfg.spool_dir).exists(user):
        fail(f"no such user: {user}", EX_USAGE)
    st = PolicyState(Catalogue(cfg.spool_dir))
    if show:
        v = st.vacation(user)
        if v is None:
            conf = cfg.policy.vacations.get(user)
            typer.echo(f"{user}: {'from the configuration: ' + _subject(conf.subject) if conf else 'off'}")
        elif not v.enabled:
            typer.echo(f"{user}: off")
        else:
            when = lambda t: dt.datetime.fromtimestamp(t).isoformat(" ", "minutes") if t else "-"  # noqa: E731
            typer.echo(f"{user}: on from {when(v.start)} until {when(v.end)}: {_subject(v.subject)}")
        return
    if off:
        st.vacation_off(user)
        typer.echo(f"out-of-office of {user} is off")
        return
    if message_file is None:
        fail("give --message-file with the text of the reply (or --off)", EX_USAGE)
    try:
        body = message_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {message_file}: {exc}", EX_USAGE)
    from gateway.office import operator
    try:
        interval = parse_duration(every) if every else None
    except ValueError as exc:
        fail(f"--every: {exc}", EX_USAGE)
    try:
        operator.set_out_of_office(st, Users(cfg.spool_dir), user,
                                   operator.OutOfOffice(subject, body, start, end, interval))
    except ValueError as exc:
        fail(str(exc), EX_USAGE)
    typer.echo(f"out-of-office of {user} is on{' from ' + start if start else ''}{' until ' + end if end else ''}")


@users_app.command("forward")
@explained
def users_forward(ctx: typer.Context, name: str,
                  to: Annotated[Optional[str],
                                typer.Option("--to", help="Where to send the mail: addresses or user names, "
                                                          "comma-separated.")] = None,
                  keep: Annotated[bool, typer.Option("--keep", help="Keep a copy in the user's mailbox too.")] = False,
                  off: Annotated[bool, typer.Option("--off", help="Stop forwarding (the config file's too).")] = False,
                  show: Annotated[bool, typer.Option("--show", help="Print the current setting.")] = False):
    """Forward a user's mail elsewhere (optionally keeping a copy), or stop; overrides the config file's forward table."""
    from gateway.office import operator
    from spool.policystate import PolicyState
    from spool.queue import Catalogue
    cfg, directory = _directory(ctx)
    user = name.strip().lower()
    if not directory.users.exists(user):
        fail(f"no such user: {user}", EX_USAGE)
    st = PolicyState(Catalogue(cfg.spool_dir))
    if show:
        fwd = directory.forward_of(user, st.forward)
        source = "" if st.forward(user) is not None or fwd is None else " (from the configuration)"
        typer.echo(f"{user}: " + (f"to {', '.join(fwd.to)}{', keeping a copy' if fwd.keep else ''}{source}"
                                  if fwd else "not forwarded"))
        return
    if off:
        operator.forwarding_off(directory.users, st, user)
        typer.echo(f"forwarding of {user} is off")
        return
    if not to:
        fail("give --to ADDRESS[,ADDRESS] (or --off, or --show)", EX_USAGE)
    try:
        targets = operator.set_forwarding(directory, st, user, to.split(","), keep)
    except ValueError as exc:
        fail(str(exc), EX_USAGE)
    typer.echo(f"mail to {user} goes to {', '.join(targets)}{', keeping a copy' if keep else ''}")
