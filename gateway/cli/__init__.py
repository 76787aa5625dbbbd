"""The ``dialmail`` command, one module per command group.

``app`` holds the shared pieces (the Typer app, global options, error reporting and exit
codes); each other module adds its commands or its sub-app when imported here, in the
order ``dialmail --help`` lists them.
"""
from gateway.cli import service, sendmail, queue, quarantine, fetch, demo, session, users, modem, policy, spool, oauth, dovecot, webmail  # noqa: F401,I001
from gateway.cli.app import app, main

app.add_typer(users.users_app, name="users")
app.add_typer(queue.queue_app, name="queue")
app.add_typer(quarantine.quarantine_app, name="quarantine")
app.add_typer(spool.spool_app, name="spool")
app.add_typer(modem.modem_app, name="modem")
app.add_typer(policy.aliases_app, name="aliases")
app.add_typer(oauth.oauth_app, name="oauth")
app.add_typer(dovecot.dovecot_app, name="dovecot")
app.add_typer(webmail.webmail_app, name="webmail")

__all__ = ["app", "main"]
