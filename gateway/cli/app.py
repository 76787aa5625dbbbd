"""The ``dialmail`` command's shared pieces: the Typer app, the global options, and the
turning of dialmail's errors into one line and an exit code (sysexits style; only the
CLI chooses exit codes)."""
from __future__ import annotations

import functools
import logging
import os
import sys
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
from spool.queue import CatalogueDamaged

EX_USAGE, EX_UNAVAILABLE, EX_SOFTWARE, EX_TEMPFAIL, EX_CONFIG = 64, 69, 70, 75, 78

app = typer.Typer(help="dialmail: the office mail server for an intermittent Internet link.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


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
        except CatalogueDamaged as exc:
            fail(f"error: {exc}", EX_TEMPFAIL)
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


# Linked as /usr/sbin/sendmail or /usr/bin/mailq, dialmail is that command (as Postfix's
# sendmail is): cron and scripts run it by those names, with sendmail's options.
INVOKED_AS = {"sendmail": "sendmail", "mailq": "mailq"}


def main() -> None:
    command = INVOKED_AS.get(os.path.basename(sys.argv[0]))
    if command is None:
        app()
    else:
        app(args=[command, *sys.argv[1:]], prog_name="dialmail")
