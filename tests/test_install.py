"""The README's install steps, run as written, and what they install.

The steps are read from README.md, so the test fails when the README drifts.  They run
line by line, as an admin types them, in a fresh venv under a temporary root: every
absolute path they (and the samples in etc/) name -- /opt/dialmail, /etc/dialmail,
/var/spool/dialmail, /usr/local/sbin, ... -- is moved below that root, DESTDIR style, and
the program's default configuration path is pointed there by $DIALMAIL_CONFIG.  What the
admin types at a prompt (passwords) is fed on stdin, with no terminal.

Also here: dialmail linked as ``sendmail`` and ``mailq`` behaves as those commands.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# The paths of a real install that the test moves below its temporary root.
SYSTEM_PATHS = ("/opt/dialmail", "/etc/dialmail", "/var/spool/dialmail", "/usr/local/sbin", "/usr/sbin",
                "/usr/bin", "/etc/systemd/system")
# An absolute path starts a word (after a space, quote, "=", "(") or follows "file://".
_PATH_RE = re.compile(r"(?:(?<![^\s\"'=(])|(?<=://))(" + "|".join(
    re.escape(p) for p in sorted(SYSTEM_PATHS, key=len, reverse=True)) + r")(?=/|\s|\"|'|\)|$)", re.MULTILINE)
# Debian cron's mail command: /usr/sbin/sendmail -FCronDaemon -i -B8BITMIME -oem -oi -t
CRON_SENDMAIL_ARGS = ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "-oi", "-t"]


def readme_block(heading: str, after: str = "") -> list[str]:
    """The command lines of the first indented block in section ``heading`` (after the text
    ``after``, when given)."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n") + 1
    if after:
        start = text.index(after, start)
    lines, inside = [], False
    for line in text[start:].splitlines()[1:]:
        if line.startswith("    "):
            inside = True
            lines.append(line[4:])
        elif inside and line.strip():
            break
        elif line.startswith("#"):
            raise AssertionError(f"no indented block in {heading!r}")
    return [line for line in lines if line.strip()]


class Root:
    """A temporary file-system root for the install, and a shell to type commands into."""

    def __init__(self, tmp: Path):
        self.dir = tmp / "root"
        self.dir.mkdir()
        self.tmpdir = tmp / "tmpdir"       # $TMPDIR of every command: must end empty
        self.tmpdir.mkdir()
        self.src = tmp / "src"             # the unpacked source
        shutil.copytree(ROOT, self.src, ignore=shutil.ignore_patterns(
            ".git", ".venv", "*.egg-info", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache"))
        for sample in (self.src / "etc").rglob("*"):
            if sample.is_file():
                sample.write_text(self.move(sample.read_text()))
        for d in SYSTEM_PATHS:
            (self.dir / d.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        for d in ("/usr/local/sbin", "/usr/sbin", "/usr/bin", "/etc/systemd/system"):
            self.path(d).mkdir(parents=True, exist_ok=True)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DIALMAIL_", "VIRTUAL_ENV", "PYTHON"))},
            "PATH": os.pathsep.join([str(self.path("/usr/local/sbin")), "/usr/local/bin", "/usr/sbin",
                                     "/usr/bin", "/sbin", "/bin"]),
            "DIALMAIL_CONFIG": str(self.path("/etc/dialmail/dialmail.toml")),
            "TMPDIR": str(self.tmpdir),
        }

    def path(self, system_path: str) -> Path:
        return self.dir / system_path.lstrip("/")

    def move(self, text: str) -> str:
        return _PATH_RE.sub(lambda m: str(self.path(m.group(1))), text)

    def type(self, line: str, stdin: bytes = b"", timeout: float = 300) -> subprocess.CompletedProcess:
        """Run one command line as typed at a root shell in the source directory; no terminal
        (its own session), so a password prompt reads stdin."""
        return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", self.move(line)], cwd=self.src, env=self.env,
                              input=stdin, capture_output=True, timeout=timeout, start_new_session=True,
                              check=False)


def typed_at_prompts(line: str) -> bytes:
    """What the admin types for a README line: a password twice for ``users add``, one line
    then end of input for ``cat > file``."""
    if "users add" in line:
        return b"Office-Test-1\nOffice-Test-1\n"
    if re.search(r"\bcat > ", line):
        return b"isp-secret\n"
    return b""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The README's install block, run line by line; every line must succeed."""
    root = Root(tmp_path_factory.mktemp("install"))
    root.transcript = {}
    for line in readme_block("## Install and run"):
        r = root.type(line, typed_at_prompts(line))
        root.transcript[line] = r
        assert r.returncode == 0, (f"README step failed ({r.returncode}): {line}\n"
                                   f"stdout:\n{r.stdout.decode(errors='replace')}\n"
                                   f"stderr:\n{r.stderr.decode(errors='replace')}")
    return root


def _output_of(root: Root, command: str) -> str:
    [r] = [r for line, r in root.transcript.items() if line.split("#")[0].strip() == command]
    return r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")


def test_readme_install_steps_give_a_configuration_that_passes_check(installed):
    out = _output_of(installed, "dialmail check")
    assert f"configuration {installed.path('/etc/dialmail/dialmail.toml')}: OK" in out, out
    for name in ("smarthost.password", "office.password"):
        mode = stat.S_IMODE(installed.path(f"/etc/dialmail/{name}").stat().st_mode)
        assert mode == 0o600, f"{name}: {mode:04o}"
        assert installed.path(f"/etc/dialmail/{name}").read_text() == "isp-secret\n"
    assert installed.path("/etc/dialmail/fudge-recipe.eml").is_file()
    assert stat.S_IMODE(installed.path("/var/spool/dialmail").stat().st_mode) == 0o700
    users = installed.type("dialmail users list").stdout.decode().split()
    assert {"admin", "alice", "bob", "carol@branch.office.example"} <= set(users), users


def test_readme_install_steps_run_the_demo_and_leave_no_temporary_directory(installed):
    out = _output_of(installed, "dialmail demo")
    assert "every message arrived where it should" in out, out
    assert list(installed.tmpdir.iterdir()) == []


def test_installed_copy_has_the_readme_and_the_samples(installed):
    doc = installed.path("/opt/dialmail/share/doc/dialmail")
    assert (doc / "README.md").read_text() == README.read_text()
    for name in ("dialmail.toml", "fudge-recipe.eml", "aliases.example.toml", "crontab.example",
                 "dialmail.service"):
        assert (doc / "examples" / name).is_file(), name


def test_systemd_unit_from_the_readme_verifies_and_names_installed_paths(installed):
    block = readme_block("## Install and run", after="under systemd:")
    assert block[0].startswith("install ") and "dialmail.service" in block[0], block
    for line in block:
        if not line.startswith("systemctl"):    # no systemd manager to talk to here
            r = installed.type(line)
            assert r.returncode == 0, (line, r.stderr)
    unit = installed.path("/etc/systemd/system/dialmail.service")
    text = unit.read_text()
    exec_start = re.search(r"^ExecStart=(\S+)", text, re.MULTILINE).group(1)
    assert os.access(exec_start, os.X_OK), exec_start
    doc = re.search(r"^Documentation=file://(\S+)", text, re.MULTILINE).group(1)
    assert Path(doc).is_file(), doc
    config = re.search(r"--config (\S+)", text).group(1)
    assert Path(config) == installed.path("/etc/dialmail/dialmail.toml")
    # The spool is /var/spool/dialmail, made by the install steps: neither a StateDirectory=
    # (/var/lib) nor a ReadWritePaths= that stops the service when the directory is missing.
    assert not re.search(r"^(StateDirectory|ReadWritePaths)=", text, re.MULTILINE), text
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze missing (Debian: apt-get install systemd; see tests/peers-debian.txt)")
        pytest.skip("needs systemd-analyze (Debian: apt-get install systemd)")
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and "dialmail.service" not in r.stderr, r.stderr


def test_readme_sendmail_links_take_crons_mail(installed):
    for line in readme_block("### sendmail and mailq for cron and scripts"):
        r = installed.type(line)
        assert r.returncode == 0, (line, r.stderr)
    sendmail, mailq = installed.path("/usr/sbin/sendmail"), installed.path("/usr/bin/mailq")
    message = (b"From: root (Cron Daemon)\nTo: admin@office.example\nSubject: Cron <root@mail> backup\n\n"
               b"backup: 3 files\n.\nstill the message\n")
    r = subprocess.run([str(sendmail), *CRON_SENDMAIL_ARGS], input=message, env=installed.env,
                       capture_output=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    new = list(installed.path("/var/spool/dialmail/mail/admin/new").iterdir())
    assert len(new) == 1
    body = new[0].read_bytes()
    assert b"Subject: Cron <root@mail> backup" in body and b"still the message" in body
    r = subprocess.run([str(sendmail), "-f", "admin@office.example", "help@isp.example"],
                       input=b"Subject: outbound\n\nhello\n", env=installed.env, capture_output=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(mailq)], env=installed.env, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert "<admin@office.example>" in r.stdout and "help@isp.example" in r.stdout, r.stdout


def test_demo_without_its_imap_server_explains_and_leaves_no_temporary_directory(installed):
    """Runs last: it breaks the installed venv on purpose."""
    pip = str(installed.path("/opt/dialmail/bin/pip"))
    # pymap there, its dependency not: the simulated ISP's IMAP server dies at start-up.
    r = installed.type(f"{pip} uninstall -y -q pysasl")
    assert r.returncode == 0, r.stderr
    r = installed.type("dialmail demo")
    err = r.stderr.decode()
    assert r.returncode == 70, (r.stdout, err)
    assert "dialmail: demo failed: the simulated IMAP server did not start" in err, err
    assert "imap.log: ModuleNotFoundError: No module named 'pysasl'" in err, err
    assert "Traceback" not in err
    assert list(installed.tmpdir.iterdir()) == []
    # pymap gone: the demo says what to install before it makes anything.
    r = installed.type(f"{pip} uninstall -y -q pymap")
    assert r.returncode == 0, r.stderr
    r = installed.type("dialmail demo")
    assert r.returncode == 69, r.stderr
    m = re.fullmatch(r"dialmail: demo: the simulated ISP needs pymap \(a pure-Python IMAP server\), which is "
                     r"not installed; run: (\S+) -m pip install pymap\n", r.stderr.decode())
    assert m, r.stderr
    assert Path(m.group(1)).parent == installed.path("/opt/dialmail/bin"), m.group(1)
    # ... and that command works.
    r = installed.type(f"{m.group(1)} -m pip install -q pymap")
    assert r.returncode == 0, r.stderr
    r = installed.type("dialmail demo")
    assert r.returncode == 0 and b"every message arrived where it should" in r.stdout, (r.stdout, r.stderr)
    assert list(installed.tmpdir.iterdir()) == []
    assert list(installed.tmpdir.iterdir()) == []


# ---------------------------------------------------------------- linked as sendmail / mailq


def _linked(tmp_path: Path, name: str) -> Path:
    program = Path(sys.executable).parent / "dialmail"
    assert program.exists(), f"{program} missing: install the project into this venv (make venv)"
    link = tmp_path / "bin" / name
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(program)
    return link


def test_linked_as_sendmail_it_queues_what_cron_pipes_to_it(site, tmp_path):
    sendmail = _linked(tmp_path, "sendmail")
    env = {**os.environ, "DIALMAIL_CONFIG": str(site.config_path)}
    message = b"To: alice@office.test\nSubject: Cron <root@host> date\n\nThu Nov 26\n"
    r = subprocess.run([str(sendmail), *CRON_SENDMAIL_ARGS], input=message, env=env, capture_output=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    [got] = site.mail_of("alice")
    assert b"Subject: Cron <root@host> date\r\n" in got and b"From: CronDaemon <" in got
    r = subprocess.run([str(sendmail), "--help"], env=env, capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0 and r.stdout.startswith("usage: sendmail "), (r.stdout, r.stderr)


def test_linked_as_mailq_it_lists_the_queue(site, tmp_path):
    mailq = _linked(tmp_path, "mailq")
    env = {**os.environ, "DIALMAIL_CONFIG": str(site.config_path)}
    site.cli("sendmail", "-f", "bob@office.test", "someone@outside.test", input=b"Subject: out\n\nx\n", check=True)
    r = subprocess.run([str(mailq)], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert "<bob@office.test>" in r.stdout and "someone@outside.test" in r.stdout, r.stdout
