"""The torture runs' set-up: a site whose sim link forwards through taps to smtp-sink and
Dovecot, message factories, and the final drain that must leave nothing behind."""
from __future__ import annotations

import os
import random
from pathlib import Path

from tests.harness import Site
from tests.peers import free_port
from tests.torture.checker import make_message
from tests.torture.tap import Tap

ISP_USER, ISP_PASS = "office", "isp-torture-secret"
USERS = ("alice", "bob")


class Rig:
    def __init__(self, site: Site, sink, dovecot, rate: int = 460800, latency_ms: int = 20):
        self.site, self.sink, self.dovecot = site, sink, dovecot
        self.rate, self.latency_ms = rate, latency_ms
        self.smtp_tap = Tap(sink.port).start()
        self.imap_tap = Tap(dovecot.imap_port).start()
        self.relay_port, self.imap_port = free_port(), free_port()
        dovecot.add_user(ISP_USER, ISP_PASS)
        pw = site.dir / "isp.password"
        pw.write_text(ISP_PASS + "\n")
        os.chmod(pw, 0o600)
        self.serial = 0

    def close(self) -> None:
        self.smtp_tap.stop()
        self.imap_tap.stop()

    def config(self, drop_after_bytes: int | None = None, extra: str = "") -> str:
        drop = f"drop_after_bytes = {drop_after_bytes}\n" if drop_after_bytes else ""
        return f"""
[smarthost]
host = "127.0.0.1"
port = {self.relay_port}
starttls = "off"
timeout = 20.0

[[fetch]]
name = "isp"
host = "127.0.0.1"
port = {self.imap_port}
tls = "off"
username = "{ISP_USER}"
password_file = "{self.site.dir / 'isp.password'}"
mode = "multidrop"
envelope_header = "Delivered-To"

[link]
type = "sim"
rate = {self.rate}
dial_delay = "0s"
redial_delay = "0.2s"
latency_ms = {self.latency_ms}
{drop}forward = ["127.0.0.1:{self.relay_port}->127.0.0.1:{self.smtp_tap.port}", "127.0.0.1:{self.imap_port}->127.0.0.1:{self.imap_tap.port}"]

[session]
retry_delay = "0.5s"
retry_count = 0
idle_timeout = "20s"
{extra}"""

    def write(self, drop_after_bytes: int | None = None, extra: str = "") -> None:
        self.site.write_config(self.config(drop_after_bytes, extra))

    def mid(self, kind: str) -> str:
        self.serial += 1
        return f"<{kind}-{self.serial}-{os.getpid()}@torture.test>"

    def outbound(self, rnd: random.Random, n: int, sizes=(300, 12000)) -> list[tuple[str, str, bytes]]:
        out = []
        for _ in range(n):
            mid = self.mid("out")
            rcpt = f"partner{self.serial}@elsewhere.test"
            out.append((mid, rcpt, make_message(mid, rcpt, rnd.randint(*sizes))))
        return out

    def place_at_isp(self, rnd: random.Random, n: int, ledger, sizes=(300, 12000)) -> int:
        msgs = []
        for _ in range(n):
            mid = self.mid("in")
            user = rnd.choice(USERS)
            msgs.append(make_message(mid, f"{user}@office.test", rnd.randint(*sizes), sender="someone@outside.test",
                                     delivered_to=True))
            ledger.expect_local(user, mid)
        if msgs:
            self.dovecot.save_many(ISP_USER, msgs)
        return sum(len(m) for m in msgs)

    def left_at_isp(self) -> int:
        return self.dovecot.message_count(ISP_USER)


def spool_dir(site: Site) -> Path:
    return site.spool
