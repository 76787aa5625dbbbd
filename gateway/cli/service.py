"""``dialmail check`` and ``dialmail run``: verify the configuration, run the daemon."""
from __future__ import annotations

import asyncio

import typer

from gateway.cli.app import (
    EX_CONFIG,
    app,
    explained,
    fail,
    setup_logging,
    state,
)


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
    if cfg.imap.enabled:
        typer.echo(f"  imap          {', '.join(map(str, cfg.imap.listen))}{'  STARTTLS' if cfg.imap.tls_cert else ''}"
                   f"  Dovecot {cfg.imap.dovecot}")
    else:
        typer.echo("  imap          off")
    web = cfg.web
    if web.listen:
        scheme = "https" if web.tls_cert else "http"
        typer.echo(f"  web console   {', '.join(f'{scheme}://{x}/' for x in web.listen)}  "
                   f"admins {', '.join(web.admins) or '-'}")
    sh = cfg.smarthost
    typer.echo(f"  smarthost     {sh.host or '-'}:{sh.port} starttls={sh.starttls}"
               f"{' auth=' + sh.username if sh.username else ''}"
               f"{f' by {sh.auth} ({sh.oauth.provider})' if sh.oauth else ''} route={sh.route}")
    for f in cfg.fetch:
        target = f.deliver_to if f.mode == "single" else f"multidrop via {f.envelope_header or 'To/Cc guess'}"
        typer.echo(f"  fetch         {f.name}: {f.username}@{f.host}:{f.port} ({f.tls}) {', '.join(f.folders)}"
                   f" -> {target}{' keep' if f.keep else ''}"
                   f"{f'  {f.auth} ({f.oauth.provider})' if f.oauth else ''}")
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
    from gateway.imap import supervisor as imap
    from gateway.pop3 import server as pop3
    from gateway.session import scheduler
    from gateway.web import service as web
    return [pop3.service, imap.service, control.service, scheduler.service, web.service]
