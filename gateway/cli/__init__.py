"""The ``dialmail`` command, one module per command group.

``app`` holds the shared pieces (the Typer app, error reporting, exit codes) and the core
commands (check, run, sendmail, users, queue, fetch); the other modules add their
commands or sub-apps to it when imported here.
"""
from gateway.cli import demo, modem, policy, session  # noqa: F401  (each adds its commands to ``app``)
from gateway.cli.app import app, main

app.add_typer(modem.modem_app, name="modem")
app.add_typer(policy.aliases_app, name="aliases")

__all__ = ["app", "main"]
