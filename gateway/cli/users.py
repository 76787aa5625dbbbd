"""``dialmail users``: local users and their argon2-hashed passwords."""
from __future__ import annotations

import getpass
import sys
from typing import Annotated

import typer

from gateway.cli.app import (
    EX_USAGE,
    explained,
    fail,
    state,
)

users_app = typer.Typer(help="Local users and their passwords.", no_args_is_help=True)


def _users(ctx):
    from spool.users import Users
    return Users(state(ctx).config().spool_dir)


def _changed(ctx) -> None:
    """A managed Dovecot reads the users file again, so IMAP logins follow at once."""
    from gateway.imap.supervisor import reload_users
    reload_users(state(ctx).config())


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        fail("the passwords differ", EX_USAGE)
    return first


def _security(server) -> str:
    if server.starttls:
        return "STARTTLS"
    return ("none (passwords in the clear: LAN only)" if server.plaintext_lan
            else "none (logins from this machine only)")


def client_settings(config, name: str) -> list[str]:
    """What to type into a mail client's account settings for ``name`` (the servers are the
    ones the console's autoconfig answer names: ``gateway.office.mailclient``)."""
    from gateway.office.mailclient import client_servers
    domain = name.partition("@")[2] or config.server.domains[0]
    local = name.partition("@")[0]
    lines = ["", "Mail client settings:", f"  email address     {local}@{domain}", f"  user name         {name}"]
    for server in client_servers(config):
        if server.incoming:
            lines.append(f"  incoming ({server.protocol})   {server.host}  port {server.port}  security "
                         f"{_security(server)}")
        else:
            password = ("password: the same" if server.login_needed
                        else "password: the same (not needed from the office LAN)")
            lines.append(f"  outgoing (SMTP)   {server.host}  port {server.port}  security "
                         f"{'STARTTLS' if server.starttls else 'none'}, {password}")
    return lines


@users_app.command("add")
@explained
def users_add(ctx: typer.Context, name: str,
              password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from "
                                                                                      "the first line of stdin.")] = False):
    """Add a local user (a mailbox in every local domain, or only in DOMAIN for NAME@DOMAIN)."""
    from gateway.office import operator
    from spool.users import UserError
    cfg = state(ctx).config()
    try:
        operator.check_new_user(cfg, name)  # before a password is asked for
        operator.add_user(cfg, _users(ctx), name, _read_password(password_stdin))
    except UserError as exc:
        fail(str(exc), EX_USAGE)
    _changed(ctx)
    typer.echo(f"user {name.lower()} added")
    for line in client_settings(state(ctx).config(), name.lower()):
        typer.echo(line)


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
    _changed(ctx)
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
    _changed(ctx)
    typer.echo(f"user {name.lower()} deleted (mailbox kept)")


@users_app.command("list")
@explained
def users_list(ctx: typer.Context):
    """List local users."""
    for name in _users(ctx).names():
        typer.echo(name)
