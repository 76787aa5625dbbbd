"""``dialmail webmail``: Roundcube on top of the office's IMAP (Dovecot) and submission."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gateway.cli.app import EX_CONFIG, explained, fail, state

webmail_app = typer.Typer(help="Webmail: Roundcube (Debian's package) on the office's IMAP and submission.",
                          no_args_is_help=True)

ANY_ADDRESS = ("", "0.0.0.0", "::")


def _near(host: str) -> str:
    # Roundcube runs on this machine: a listener on every address is reached on loopback.
    return "127.0.0.1" if host in ANY_ADDRESS else host


@webmail_app.command("config")
@explained
def webmail_config(ctx: typer.Context,
                   directory: Annotated[Optional[Path], typer.Option(
                       "--dir", help="Where to write Roundcube's configuration (default: <spool>/webmail).")] = None,
                   peer_name: Annotated[Optional[str], typer.Option(
                       help="The name the TLS certificate is for (default: [server] hostname).")] = None):
    """Write a complete Roundcube configuration directory for this office and say how to serve it.

    IMAP is the [imap] listener (Dovecot), sending is [submission] (port 587) when there is one,
    else [smtp] on loopback; TLS is verified against the office's own certificate.  Run it again
    after changing those settings: the key that protects logged-in sessions is kept.
    """
    from gateway.webmail import roundcube
    cfg = state(ctx).config()
    if not cfg.imap.enabled:
        fail("webmail reads mail over IMAP: add an [imap] section first (README: IMAP and bigger sites)", EX_CONFIG)
    listen = cfg.imap.listen[0]
    imap = roundcube.Endpoint(_near(listen.host), listen.port, "starttls" if cfg.imap.tls_cert else "none")
    if cfg.submission is not None:
        sub = cfg.submission.listen[0]
        smtp = roundcube.Endpoint(_near(sub.host), sub.port, "starttls")
    else:  # port 25 from this machine: AUTH is allowed on loopback
        sub = cfg.smtp.listen[0]
        smtp = roundcube.Endpoint(_near(sub.host), sub.port, "starttls" if cfg.smtp.tls_cert else "none")
    settings = roundcube.Webmail(imap=imap, smtp=smtp, mail_domain=cfg.server.domains[0],
                                 product_name=f"{cfg.server.hostname} webmail",
                                 ca_file=cfg.imap.tls_cert, peer_name=peer_name or cfg.server.hostname)
    target = directory or cfg.spool_dir / "webmail"
    written = roundcube.write(settings, target)
    typer.echo(f"wrote {written} (IMAP {imap.url()}, sending {smtp.url()})")
    if not (roundcube.DEBIAN_DOCROOT / "index.php").exists():
        typer.echo("Roundcube is not installed: apt-get install roundcube-core roundcube-sqlite3 php-cgi")
    typer.echo("serve it, for a small office, with PHP's built-in server as this user:\n"
               f"  ROUNDCUBE_CONFIG_DIR={target} php -S 0.0.0.0:8080 -t {roundcube.DEBIAN_DOCROOT}\n"
               "or with Apache: Debian's /etc/roundcube/apache.conf plus "
               f"'SetEnv ROUNDCUBE_CONFIG_DIR {target}' (the directory must then be readable by www-data)")
