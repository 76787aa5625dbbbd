"""Running dialmail itself in tests: config files, users, a real daemon process."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil

from spool.maildir import Maildir
from spool.users import Users
from tests.peers import PeerStartError, free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent

#: Every password a test gave a Site user, for the final scan of the logs (tests/torture/test_zz_secrets.py).
PASSWORDS: set[str] = set()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll until ``predicate()`` is truthy; return its value or raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def wait_until(predicate, timeout: float, what: str) -> float:
    """Poll ``predicate()`` from a coroutine until it is truthy; return the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


class RssSampler:
    """Highest resident set size of one process (default: this one) while the block runs."""

    def __init__(self, pid: int | None = None, interval: float = 0.005):
        self.process = psutil.Process(pid)
        self.interval = interval
        self.start = self.peak = self.process.memory_info().rss
        self.samples = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> RssSampler:
        self.start = self.peak = self.process.memory_info().rss
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(self.interval):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:  # the process is gone: its peak is what was seen
                return
            self.samples += 1

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.start


class Site:
    """A dialmail installation in a temp dir: config file, spool, users."""

    def __init__(self, tmp: Path, domains=("office.test",), extra: str = "", smtp_port: int | None = None,
                 pop3_port: int | None = None, mynetworks=("127.0.0.1/32",)):
        self.dir = Path(tmp)
        self.spool = self.dir / "spool"
        self.smtp_port = smtp_port or free_port()
        self.pop3_port = pop3_port or free_port()
        self.domains = tuple(domains)
        self.config_path = self.dir / "dialmail.toml"
        self.mynetworks = tuple(mynetworks)
        self.server_extra = ""  # more [server] keys, e.g. 'postmaster = "admin@office.test"'
        self.write_config(extra)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "dialmail.log"
        # A command that runs dialmail as another user, e.g. ["setpriv", "--reuid=nobody", ...]
        self.run_as: list[str] = []

    def write_config(self, extra: str = "") -> None:
        domains = ", ".join(f'"{d}"' for d in self.domains)
        nets = ", ".join(f'"{n}"' for n in self.mynetworks)
        text = textwrap.dedent(f"""\
            [server]
            hostname = "mail.{self.domains[0]}"
            domains = [{domains}]
            spool_dir = "{self.spool}"
            mynetworks = [{nets}]
            {self.server_extra}

            [smtp]
            listen = ["127.0.0.1:{self.smtp_port}", "127.0.0.2:{self.smtp_port}"]
            max_message_size = "30MB"
            min_free_space = "1MB"

            [pop3]
            listen = ["127.0.0.1:{self.pop3_port}"]
            """)
        self.config_path.write_text(text + textwrap.dedent(extra))

    def fetch_account(self, port: int, user: str, password: str, *, name: str = "isp", tls: str = "off",
                      **keys: str) -> str:
        """A ``[[fetch]]`` table for an ISP mailbox on 127.0.0.1, its password file written (0600).

        Extra ``keys`` are TOML values written as given, e.g. ``mode='"multidrop"'``.
        """
        pw = self.dir / f"{name}.password"
        pw.write_text(password + "\n")
        os.chmod(pw, 0o600)
        lines = [f'name = "{name}"', 'host = "127.0.0.1"', f"port = {port}", f'tls = "{tls}"',
                 f'username = "{user}"', f'password_file = "{pw}"', *(f"{k} = {v}" for k, v in keys.items())]
        return "\n[[fetch]]\n" + "\n".join(lines) + "\n"

    @property
    def users(self) -> Users:
        return Users(self.spool)

    def add_user(self, name: str, password: str = "secret") -> None:
        PASSWORDS.add(password)
        self.users.add(name, password)

    def maildir(self, user: str) -> Maildir:
        return Maildir(self.spool / "mail" / user)

    def mail_of(self, user: str) -> list[bytes]:
        md = self.maildir(user)
        return [p.read_bytes() for p in md.messages()] if md.exists() else []

    def cli(self, *args: str, input: bytes | None = None, check: bool = False, timeout: float = 60):
        return subprocess.run([*self.run_as, sys.executable, "-m", "gateway", "-c", str(self.config_path), *args],
                              input=input, capture_output=True, timeout=timeout, check=check, cwd=ROOT)

    def start(self, wait: bool = True) -> subprocess.Popen:
        # A port free when chosen can be taken before the daemon binds it (another test's
        # client, on 127.0.0.2 too): the daemon then says "cannot listen on" and exits, and
        # the site moves to new ports.  Any other failure to start is raised with the log.
        for attempt in range(3):
            seen = len(self.log())
            log = open(self.log_path, "ab")
            self.proc = subprocess.Popen([*self.run_as, sys.executable, "-m", "gateway", "-c", str(self.config_path),
                                          "run"],
                                         stdout=log, stderr=log, cwd=ROOT)
            log.close()
            if not wait:
                return self.proc
            try:
                # The POP3 service starts after SMTP: a test may talk to either at once.
                wait_port("127.0.0.1", self.smtp_port, proc=self.proc)
                wait_port("127.0.0.1", self.pop3_port, proc=self.proc)
                return self.proc
            except PeerStartError as exc:
                said = self.log()[seen:]
                if "cannot listen on" not in said or attempt == 2:
                    raise PeerStartError(f"{exc}; the daemon said:\n{said[-3000:]}") from None
                self._move_ports()
        return self.proc

    def _move_ports(self) -> None:
        text = self.config_path.read_text()
        for attr in ("smtp_port", "pop3_port"):
            old, new = getattr(self, attr), free_port()
            text = text.replace(f":{old}\"", f":{new}\"")
            setattr(self, attr, new)
        self.config_path.write_text(text)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
