"""kill -9 of the real daemon at random moments: while clients submit mail over SMTP,
while local delivery works through a burst, and while a dial session flushes the queue
to the smarthost and fetches from the ISP.  After each kill the daemon is started again
and clients send again whatever did not get its 250.  At the end, clean sessions drain
everything and the checker counts: every accepted message exactly once, per mailbox."""
import random
import signal
import smtplib
import subprocess
import sys
import threading
import time

import pytest

from tests.harness import ROOT, wait_for
from tests.torture.checker import Ledger, check, make_message
from tests.torture.rig import USERS, Rig

pytestmark = [pytest.mark.peer, pytest.mark.timeout(3000)]


class Submitter:
    """An SMTP client that keeps a message until it has seen 250 for it, then forgets it."""

    def __init__(self, rig: Rig, ledger: Ledger, rnd: random.Random):
        self.rig, self.ledger, self.rnd = rig, ledger, rnd
        self.unacked: list[tuple[str, str, bytes]] = []
        self.tries: dict[str, int] = {}

    def new(self, n: int, local_share: float = 0.5) -> None:
        for _ in range(n):
            mid = self.rig.mid("smtp")
            if self.rnd.random() < local_share:
                rcpt = f"{self.rnd.choice(USERS)}@office.test"
            else:
                rcpt = f"partner{self.rig.serial}@elsewhere.test"
            self.unacked.append((mid, rcpt, make_message(mid, rcpt, self.rnd.randint(300, 6000))))

    def send(self, stop: threading.Event | None = None) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", self.rig.site.smtp_port, timeout=10) as c:
                while self.unacked and not (stop and stop.is_set()):
                    mid, rcpt, data = self.unacked[0]
                    self.tries[mid] = self.tries.get(mid, 0) + 1
                    if self.tries[mid] > 1:
                        self.ledger.resent.add(mid)
                    c.sendmail("alice@office.test", [rcpt], data)
                    self.unacked.pop(0)
                    if rcpt.endswith("@office.test"):
                        self.ledger.expect_local(rcpt.split("@")[0], mid)
                    else:
                        self.ledger.outbound.add(mid)
        except (OSError, smtplib.SMTPException):
            pass  # the daemon went away: what has no 250 is sent again later


def start(site) -> None:
    site.start()


def kill(site, ledger: Ledger, phase: str) -> None:
    site.stop(signal.SIGKILL)
    ledger.kills += 1
    ledger.kill_phases[phase] += 1


def queue_empty(site) -> bool:
    return site.cli("queue", "list").stdout.decode().startswith("queue is empty")


def test_kill_9_loses_and_duplicates_nothing(site, smtp_sink, dovecot, torture_long, torture_report):
    target = 200 if torture_long else 20
    seed = int(time.time())
    rnd = random.Random(seed)
    rig = Rig(site, smtp_sink, dovecot)
    rig.write()
    ledger = Ledger()
    client = Submitter(rig, ledger, rnd)
    started = time.monotonic()
    try:
        start(site)
        while ledger.kills < target:
            phase = rnd.choice(("ingest", "delivery", "session", "session"))
            if phase == "ingest":
                client.new(rnd.randint(3, 10))
                stop = threading.Event()
                t = threading.Thread(target=client.send, args=(stop,))
                t.start()
                time.sleep(rnd.uniform(0.0, 0.4))
                kill(site, ledger, phase)
                stop.set()
                t.join(20)
            elif phase == "delivery":
                client.new(rnd.randint(5, 15), local_share=1.0)
                client.send()
                time.sleep(rnd.uniform(0.0, 0.3))
                kill(site, ledger, phase)
            else:
                client.new(rnd.randint(1, 4), local_share=0.0)
                client.send()
                rig.place_at_isp(rnd, rnd.randint(1, 4), ledger)
                before = len(rig.smtp_tap.conversations) + len(rig.imap_tap.conversations)
                cli = subprocess.Popen([sys.executable, "-m", "gateway", "-c", str(site.config_path),
                                        "connect-now"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
                try:
                    wait_for(lambda: len(rig.smtp_tap.conversations) + len(rig.imap_tap.conversations) > before,
                             timeout=30, what="the session to reach the ISP")
                    time.sleep(rnd.uniform(0.0, 0.6))
                finally:
                    # Which side of the session was moving mail at the kill: flush, fetch, both.
                    busy = [name for name, tap in (("flush", rig.smtp_tap), ("fetch", rig.imap_tap))
                            if not tap.idle()]
                    phase = "+".join(busy) or "session (between)"
                    kill(site, ledger, phase)
                    cli.wait(30)
            start(site)
            client.send()  # what lost its 250 goes again
        # Clean sessions until both ways are drained, then local delivery.
        client.send()
        assert not client.unacked
        for _ in range(10):
            assert site.cli("connect-now", timeout=120).returncode in (0, 1)
            if queue_empty(site) and rig.left_at_isp() == 0:
                break
        try:
            wait_for(lambda: queue_empty(site), timeout=60, what="an empty queue")
        except TimeoutError:
            raise AssertionError("the queue did not drain:\n" + site.cli("queue", "list").stdout.decode()
                                 + "\n--- daemon log (tail) ---\n" + site.log()[-6000:]) from None
        wait_for(lambda: rig.smtp_tap.idle() and rig.imap_tap.idle(), timeout=20, what="the taps to settle")
        report = check(ledger, smtp_sink.messages(), site.spool, rig.smtp_tap.snapshot(),
                       rig.imap_tap.snapshot(), left_at_isp=rig.left_at_isp())
    finally:
        site.stop()
        rig.close()
    print(f"\nkill -9: seed {seed}, {time.monotonic() - started:.0f}s\n" + report.format())
    torture_report(f"kill -9 (seed {seed})", report)
    assert report.problems() == [], report.format() + "\n" + site.log()[-3000:]
    assert ledger.kills >= target
