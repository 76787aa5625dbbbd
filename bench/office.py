"""The two office mail servers the benchmarks compare: dialmail's daemon (``python -m
gateway run`` on a config of our own) and Postfix as an office MTA for a dial-up line
(``relayhost``, ``defer_transports = smtp``, flushed with ``postqueue -f``)."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aiosmtplib

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.peers import PostfixSmarthost, free_port, peer_tmpdir, wait_port


class DialmailSite:
    """A dialmail installation in a temp dir running the real daemon."""

    def __init__(self, directory: Path | None = None, *, max_message_size: str = "100MB"):
        self._own_dir = directory is None
        self.dir = Path(directory) if directory else peer_tmpdir("dialmail")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.spool = self.dir / "spool"
        self.smtp_port, self.pop3_port = free_port(), free_port()
        self.config_path = self.dir / "dialmail.toml"
        self.log_path = self.dir / "dialmail.log"
        self.max_message_size = max_message_size
        self.proc: subprocess.Popen | None = None
        self.write_config("")

    def write_config(self, extra: str) -> None:
        self.config_path.write_text(textwrap.dedent(f"""\
            [server]
            hostname = "mail.office.test"
            domains = ["office.test"]
            spool_dir = "{self.spool}"
            mynetworks = ["127.0.0.1/32"]

            [smtp]
            listen = ["127.0.0.1:{self.smtp_port}"]
            max_message_size = "{self.max_message_size}"
            max_connections = 200
            min_free_space = "1MB"

            [pop3]
            listen = ["127.0.0.1:{self.pop3_port}"]
            """) + textwrap.dedent(extra))

    def add_user(self, name: str, password: str) -> None:
        from spool.users import Users
        self.spool.mkdir(parents=True, exist_ok=True)
        Users(self.spool).add(name, password)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gateway", "-c", str(self.config_path), *args],
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)

    def start(self) -> DialmailSite:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "-c", str(self.config_path), "run"],
                                         stdout=log, stderr=log, cwd=ROOT)
        wait_port("127.0.0.1", self.smtp_port, timeout=30, proc=self.proc)
        wait_port("127.0.0.1", self.pop3_port, timeout=30, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        if self._own_dir and not os.environ.get("DIALMAIL_KEEP_PEER_DIRS"):
            shutil.rmtree(self.dir, ignore_errors=True)


class OfficePostfix(PostfixSmarthost):
    """Postfix set up the way its documentation says for a dial-up office: mail for the
    office domain stays here, everything else goes to ``relayhost`` but only when flushed
    (``defer_transports = smtp`` + ``postqueue -f``).  Root only."""

    def __init__(self, relayhost_port: int):
        super().__init__(recipient_rules="", params={
            "virtual_mailbox_domains": "office.test",
            "default_transport": "smtp",
            "relay_transport": "smtp",
            "relayhost": f"[127.0.0.1]:{relayhost_port}",
            "defer_transports": "smtp",
            "max_use": "100",
            "myhostname": "mail.office.test",
            "message_size_limit": "104857600",
        })

    def flush(self) -> None:
        """``postqueue -f``: returns at once, delivery runs in the background."""
        subprocess.run(["postqueue", "-c", str(self.etc), "-f"], check=True, capture_output=True, timeout=60)

    def queued(self) -> int:
        queue = self.dir / "queue"
        return sum(1 for sub in ("maildrop", "incoming", "active", "deferred", "hold")
                   for f in (queue / sub).rglob("*") if f.is_file())

    def deferred(self) -> int:
        return sum(1 for f in (self.dir / "queue" / "deferred").rglob("*") if f.is_file())


def submit(port: int, messages: list[tuple[str, str, bytes]], connections: int = 1) -> float:
    """Send (sender, rcpt, data) triples by SMTP over ``connections`` parallel sessions; seconds."""
    async def one(chunk):
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=300) as c:
            for sender, rcpt, data in chunk:
                await c.sendmail(sender, [rcpt], data)

    async def go():
        await asyncio.gather(*(one(messages[i::connections]) for i in range(connections)))

    start = time.perf_counter()
    asyncio.run(go())
    return time.perf_counter() - start


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
