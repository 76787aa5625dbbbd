"""Every ``--help`` of the ``dialmail`` command reads right: exit 0, no type labels beside
flags, nothing of a command's summary swallowed, and ``dialmail sendmail --help`` prints
sendmail's own usage."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from gateway.cli.app import app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _commands(command, path=()):
    """(path, command) for the root and every command and group below it."""
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        if not getattr(sub, "hidden", False):
            yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(typer.main.get_command(app)))


def _help(path: tuple[str, ...]):
    # Wide enough that rich does not cut a summary short; narrow enough to wrap like a terminal.
    return CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "120", "DIALMAIL_CONFIG": "/nonexistent"})


def test_the_walk_finds_the_commands_an_admin_uses():
    paths = {" ".join(p) for p, _ in COMMANDS}
    assert {"", "check", "run", "sendmail", "mailq", "connect-now", "users", "users add", "queue list",
            "demo"} <= paths


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS if p != ("sendmail",)],
                         ids=lambda p: " ".join(p) or "dialmail")
def test_help_exits_0_and_shows_no_type_beside_flags(path):
    result = _help(path)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert "<bool>" not in result.output and "BOOLEAN" not in result.output, result.output


@pytest.mark.parametrize("path", [p for p, c in COMMANDS if getattr(c, "commands", None)],
                         ids=lambda p: " ".join(p) or "dialmail")
def test_group_help_shows_each_command_summary_whole(path):
    """A summary is shown as written: rich markup must not eat text such as "[rcpt ...]"."""
    group = dict(COMMANDS)[path]
    output = _help(path).output
    for name, sub in group.commands.items():
        if getattr(sub, "hidden", False):
            continue
        summary = sub.get_short_help_str(limit=1000)
        missing = [word for word in summary.split() if word not in output]
        assert not missing, f"{name}: {missing} missing from:\n{output}"


def _run(*args: str, stdin: bytes = b""):
    env = {**os.environ, "DIALMAIL_CONFIG": "/nonexistent/dialmail.toml"}
    return subprocess.run([sys.executable, "-m", "gateway", *args], input=stdin, capture_output=True, env=env,
                          cwd=ROOT, timeout=60, check=False)


def test_sendmail_help_prints_sendmail_usage_without_a_config():
    r = _run("sendmail", "--help")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert out.startswith("usage: sendmail [-t] [-i] [-f sender] [-F name] [-v] [rcpt ...]\n"), out
    for option in ("-t", "-i", "-f sender", "-F name", "-v", "rcpt"):
        assert f"\n  {option} " in out, f"{option} not explained in:\n{out}"
    assert r.stderr == b""


def test_top_level_help_shows_sendmail_usage_hint():
    out = _help(()).output
    assert "dialmail sendmail --help" in out, out
