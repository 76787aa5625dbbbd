"""``dialmail dovecot``: Dovecot on dialmail's mailboxes, for an admin who runs Dovecot."""
from __future__ import annotations

import typer

from gateway.cli.app import (
    explained,
    state,
)

dovecot_app = typer.Typer(help="IMAP by Dovecot on dialmail's mailboxes.", no_args_is_help=True)


@dovecot_app.command("config")
@explained
def dovecot_config(ctx: typer.Context):
    """Print the configuration to add to an existing Dovecot (dovecot = "external" in the imap section).

    Also gets the spool ready for that Dovecot (users file readable by group dovecot, Maildirs
    owned by the imap section's mail_user when dialmail runs as root), as `dialmail run` does.
    """
    from gateway.imap import dovecotconf, store
    cfg = state(ctx).config()
    if cfg.imap.dovecot == "off":
        typer.echo("dialmail: note: [imap] is off; set dovecot = \"external\" in it so dialmail run and "
                   "dialmail check expect this Dovecot", err=True)
    owner = store.prepare(cfg)
    typer.echo(dovecotconf.fragment(cfg, owner, store.DovecotPaths(cfg.spool_dir)), nl=False)
