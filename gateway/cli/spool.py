"""``dialmail spool check`` and ``repair``: the spool against itself (see spool.check)."""
from __future__ import annotations

import typer

from gateway.cli.app import EX_TEMPFAIL, explained, fail, state

spool_app = typer.Typer(help="Check the spool on disk and repair it.", no_args_is_help=True)

EX_FOUND = 1  # fsck's "something is wrong": check found problems


@spool_app.command("check")
@explained
def spool_check(ctx: typer.Context):
    """Check catalogue, queue files, claims, Maildir tmp/ and fetch state; changes nothing.

    Each problem is printed with what 'dialmail spool repair' will do about it; the exit
    status is 1 when something is wrong."""
    from spool import check
    try:
        findings = check.check(state(ctx).config().spool_dir)
    except check.CatalogueBusy as exc:
        fail(f"cannot read the spool catalogue now ({exc}); try again", EX_TEMPFAIL)
    for f in findings:
        typer.echo(f"{f.subject}: {f.problem}\n    repair will: {f.repair}")
    wrong = check.problems(findings)
    if not wrong:
        typer.echo("spool ok")
        return
    typer.echo(f"-- {len(wrong)} problem(s); 'dialmail spool repair' (daemon stopped) does the above, keeping "
               "whatever it cannot put back in lost+found/")
    raise typer.Exit(EX_FOUND)


@spool_app.command("repair")
@explained
def spool_repair(ctx: typer.Context):
    """Repair what 'spool check' finds (stop the daemon first).

    Nothing that could be mail is deleted: what cannot be queued again goes to lost+found/."""
    from spool import check
    root = state(ctx).config().spool_dir
    try:
        done = check.repair(root)
    except check.SpoolInUse as exc:
        fail(str(exc), EX_TEMPFAIL)
    for line in done:
        typer.echo(line)
    left = check.problems(check.check(root))
    for f in left:
        typer.echo(f"still wrong: {f.subject}: {f.problem}")
    typer.echo("spool ok" if not left else f"-- {len(left)} problem(s) left")
    if left:
        raise typer.Exit(EX_FOUND)
