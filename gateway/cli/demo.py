"""``dialmail demo``: the whole system on a simulated modem and ISP (gateway.demo.scenario)."""
from __future__ import annotations

import asyncio
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from gateway.cli.app import EX_SOFTWARE, EX_UNAVAILABLE, app
from gateway.demo import scenario


@app.command()
def demo(keep: Annotated[bool, typer.Option("--keep", help="Keep the temporary directory.")] = False,
         rate: Annotated[int, typer.Option("--rate", help="Simulated modem speed, bit/s.")] = 33600,
         stay: Annotated[bool, typer.Option("--stay", help="Afterwards keep the daemon, the simulated ISP and "
                                            "the web console running until Ctrl-C.")] = False):
    """Run the whole system on a simulated modem and ISP, printed as it goes (what `make demo` runs)."""
    if importlib.util.find_spec("pymap") is None:
        typer.echo("dialmail: demo: the simulated ISP needs pymap (a pure-Python IMAP server), which is not "
                   f"installed; run: {sys.executable} -m pip install pymap", err=True)
        raise typer.Exit(EX_UNAVAILABLE)
    tmp = Path(tempfile.mkdtemp(prefix="dialmail-demo-"))
    # The directory goes whatever happens (success, failure, Ctrl-C) unless --keep says otherwise;
    # a failure's explanation is taken from its logs first.
    try:
        code = asyncio.run(scenario.run(tmp, rate, stay))
    except KeyboardInterrupt:
        code = 0 if stay else 130  # with --stay, Ctrl-C is how the demo ends
    except (RuntimeError, OSError) as exc:
        typer.echo(f"dialmail: demo failed: {exc}", err=True)
        for log in (tmp / "isp" / "imap.log", tmp / "dialmail.log"):
            tail = _last_line(log)
            if tail:
                typer.echo(f"dialmail: demo: {log.name}: {tail}", err=True)
        if not keep:
            typer.echo("dialmail: demo: its directory is removed; 'dialmail demo --keep' keeps it", err=True)
        code = EX_SOFTWARE
    finally:
        if keep:
            scenario.console.print(f"kept {tmp} (logs: dialmail.log, isp/imap.log, spool/sessions/)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    raise typer.Exit(code)


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""
