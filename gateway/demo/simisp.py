"""A simulated ISP for the demo: a smarthost that keeps what it receives, and IMAP mailboxes.

The smarthost is aiosmtpd in the caller's loop, writing each accepted message with its
envelope into ``<dir>/smarthost/``.  The mailboxes are pymap (a pure-Python IMAP server,
in-memory backend) in a child process.  Both listen on 127.0.0.1; the gateway reaches
them only through the simulated modem's line shaper.
"""
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from aiosmtpd.smtp import SMTP as SMTPProtocol

PYMAP = "import sys; from pymap.main import main; sys.argv[0] = 'pymap'; sys.exit(main())"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Store:
    def __init__(self, directory: Path):
        self.dir = directory
        self.count = 0

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        name = f"{time.time():.6f}-{self.count}"
        meta = {"mail_from": envelope.mail_from, "rcpt_tos": envelope.rcpt_tos}
        (self.dir / f"{name}.json").write_text(json.dumps(meta))
        (self.dir / f"{name}.eml").write_bytes(envelope.original_content or envelope.content)
        return "250 2.0.0 Ok: stored by the simulated ISP"


class SimulatedISP:
    def __init__(self, directory: Path, user: str = "office", password: str = "isp-password"):
        self.dir = Path(directory)
        self.user, self.password = user, password
        self.smtp_port = free_port()
        self.imap_port = free_port()
        self.smtp_server: asyncio.base_events.Server | None = None
        self.imap_proc: subprocess.Popen | None = None
        (self.dir / "smarthost").mkdir(parents=True, exist_ok=True)

    async def start(self) -> "SimulatedISP":
        loop = asyncio.get_running_loop()
        store = _Store(self.dir / "smarthost")
        self.smtp_server = await loop.create_server(
            lambda: SMTPProtocol(store, hostname="smtp.isp.example", ident="simulated ISP"), "127.0.0.1",
            self.smtp_port)
        log = open(self.dir / "imap.log", "wb")
        self.imap_proc = subprocess.Popen(
            [sys.executable, "-c", PYMAP, "--host", "127.0.0.1", "--port", str(self.imap_port), "--no-tls", "dict",
             "--demo-user", self.user, "--demo-password", self.password], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.imap_port), timeout=0.5):
                    break
            except OSError:
                if self.imap_proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the simulated IMAP server did not start (see {self.dir / 'imap.log'})")
                await asyncio.sleep(0.1)
        return self

    def deliver_to_mailbox(self, message: bytes, folder: str = "INBOX") -> None:
        """What the ISP does when mail arrives for the office: it lands in the IMAP mailbox."""
        from imapclient import IMAPClient
        with IMAPClient("127.0.0.1", self.imap_port, ssl=False, timeout=10) as c:
            c.login(self.user, self.password)
            c.append(folder, message)

    def mailbox_count(self, folder: str = "INBOX") -> int:
        from imapclient import IMAPClient
        with IMAPClient("127.0.0.1", self.imap_port, ssl=False, timeout=10) as c:
            c.login(self.user, self.password)
            return c.select_folder(folder, readonly=True)[b"EXISTS"]

    def received(self) -> list[tuple[dict, bytes]]:
        """(envelope, message) of everything the smarthost accepted."""
        out = []
        for meta in sorted((self.dir / "smarthost").glob("*.json")):
            out.append((json.loads(meta.read_text()), meta.with_suffix(".eml").read_bytes()))
        return out

    async def stop(self) -> None:
        if self.smtp_server is not None:
            self.smtp_server.close()
            await self.smtp_server.wait_closed()
        if self.imap_proc is not None and self.imap_proc.poll() is None:
            self.imap_proc.terminate()
            try:
                self.imap_proc.wait(10)
            except subprocess.TimeoutExpired:
                self.imap_proc.kill()
                self.imap_proc.wait()

