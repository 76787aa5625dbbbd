"""``dialmail quarantine``: fetched mail the policy refused, kept in ``<spool>/mail/quarantine``."""
from __future__ import annotations

import typer

from gateway.cli.app import EX_USAGE, explained, fail, state

quarantine_app = typer.Typer(help="Fetched mail the policy refused: list, release, delete.", no_args_is_help=True)


@quarantine_app.command("list")
@explained
def quarantine_list(ctx: typer.Context):
    """Show each quarantined message: its key, sender, subject, recipients and why it was kept."""
    from gateway.delivery.stages import quarantine
    items = quarantine.kept(state(ctx).config().spool_dir)
    if not items:
        typer.echo("the quarantine is empty")
        return
    for k in items:
        typer.echo(f"{k.key}\n  from {k.author}  for {k.recipients}  {k.size} bytes\n"
                   f"  subject {k.subject}\n  kept: {k.reason}")


@quarantine_app.command("release")
@explained
def quarantine_release(ctx: typer.Context, key: str):
    """Deliver a quarantined message to whom it was for, without checking it again."""
    from gateway.delivery.stages import quarantine
    from gateway.office.directory import Directory
    from spool.queue import Catalogue, Queue
    from spool.users import Users
    cfg = state(ctx).config()
    try:
        qid = quarantine.release(Queue(Catalogue(cfg.spool_dir)), Directory(cfg, Users(cfg.spool_dir)),
                                 quarantine.find(cfg.spool_dir, key))
    except quarantine.NotQuarantined as exc:
        fail(str(exc), EX_USAGE)
    typer.echo(f"{key}: released as {qid} (the daemon delivers it)")


@quarantine_app.command("delete")
@explained
def quarantine_delete(ctx: typer.Context, key: str):
    """Delete a quarantined message for good."""
    from gateway.delivery.stages import quarantine
    try:
        quarantine.delete(state(ctx).config().spool_dir, key)
    except quarantine.NotQuarantined as exc:
        fail(str(exc), EX_USAGE)
    typer.echo(f"{key}: deleted")
