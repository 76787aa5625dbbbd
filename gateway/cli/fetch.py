"""``dialmail fetch``: collect from the ISP mailboxes now, without the link logic."""
from __future__ import annotations

import asyncio
from typing import Annotated, Optional

import typer

from gateway.cli.app import (
    EX_TEMPFAIL,
    EX_USAGE,
    app,
    explained,
    fail,
    setup_logging,
    state,
)
from gateway.cli.queue import deliver_local_now


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
    deliver_local_now(cfg, q)
    for r in result.accounts:
        typer.echo(r.summary())
    if result.errors:
        raise typer.Exit(EX_TEMPFAIL)
