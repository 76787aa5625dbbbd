"""Carrier drops at random byte offsets: many dial sessions, each through the simulated
modem and the line shaper, the line cut after a random number of bytes (so inside SMTP
DATA, IMAP FETCH, STORE, EXPUNGE, or between them), new mail arriving both ways in
between.  Then sessions on a clean line drain everything and the checker counts."""
import asyncio
import random
import time

import pytest

from gateway.config import load
from gateway.daemon import Spool
from gateway.session.session import Session, SessionContext
from spool.queue import RELAY
from tests.harness import wait_for
from tests.torture.checker import Ledger, check
from tests.torture.rig import Rig

pytestmark = [pytest.mark.peer, pytest.mark.timeout(1800)]


# Commands whose answer is cut off on its way back: the moments a byte offset seldom hits
# (a few bytes each) and the ones that matter most (STORE \Deleted, EXPUNGE, the final dot).
TRIGGERS = [("imap", rb" UID STORE ")] * 3 + [("imap", rb" UID EXPUNGE")] * 3 + [("smtp", b"\r\n.\r\n")] * 3 + [
    ("imap", rb" UID FETCH "), ("imap", rb" EXPUNGE\r\n"), ("smtp", b"\r\nDATA\r\n"), ("smtp", b"RCPT TO:")]


def cut_every_line() -> None:
    # The test's own sessions run the simulated modems; dropping carrier on them is what a
    # line fault does (SimLine methods are thread-safe).
    from modem import simulator
    with simulator._lines_lock:
        lines = list(simulator._lines.values())
    for line in lines:
        line.drop_carrier("torture: line cut after a chosen command")


async def one_session(rig: Rig, spool: Spool, drop: int | None, mode: str = "both"):
    rig.write(drop)
    cfg = load(rig.site.config_path)
    return await Session(SessionContext(cfg, spool), "manual", mode).run()


def test_carrier_drops_lose_and_duplicate_nothing(site, smtp_sink, dovecot, torture_long, torture_report):
    target = 500 if torture_long else 50
    seed = int(time.time())
    rnd = random.Random(seed)
    rig = Rig(site, smtp_sink, dovecot)
    rig.write()
    spool = Spool(load(site.config_path))
    ledger = Ledger()
    started = time.monotonic()

    async def run():
        sessions = 0
        while ledger.drops < target:
            sessions += 1
            assert sessions < target * 4, f"only {ledger.drops} drops in {sessions} sessions"
            traffic = 0
            for mid, rcpt, data in rig.outbound(rnd, rnd.randint(0, 3)):
                await asyncio.to_thread(spool.queue.enqueue, "alice@office.test", [(rcpt, RELAY)], data,
                                        origin="torture", message_id=mid)
                ledger.outbound.add(mid)
                traffic += len(data)
            traffic += await asyncio.to_thread(rig.place_at_isp, rnd, rnd.randint(0, 3), ledger)
            if rnd.random() < 0.4:
                # Right after a chosen command reached the ISP, before its answer is back.
                which, pattern = rnd.choice(TRIGGERS)
                tap = rig.imap_tap if which == "imap" else rig.smtp_tap
                tap.arm(pattern, rnd.randint(1, 2), cut_every_line)
                drop = None
            else:
                # Offsets across the whole conversation, now and then past its end (no drop).
                tap = None
                drop = rnd.randint(200, int(traffic * 1.15) + 3000)
            rec = await one_session(rig, spool, drop, rnd.choice(("both", "both", "send", "fetch")))
            if tap is not None:
                tap.disarm()
            if rec.carrier_lost:
                ledger.drops += 1
        # A clean line until everything has gone both ways.
        for _ in range(10):
            rec = await one_session(rig, spool, None)
            assert not rec.carrier_lost, rec.errors
            if spool.queue.counts()["messages"] == 0 and rig.left_at_isp() == 0:
                break
        return sessions

    try:
        sessions = asyncio.run(run())
        wait_for(lambda: rig.smtp_tap.idle() and rig.imap_tap.idle(), timeout=20, what="the taps to settle")
        report = check(ledger, smtp_sink.messages(), site.spool, rig.smtp_tap.snapshot(),
                       rig.imap_tap.snapshot(), left_at_isp=rig.left_at_isp())
    finally:
        spool.close()
        rig.close()
    print(f"\ncarrier drops: seed {seed}, {sessions} sessions, {time.monotonic() - started:.0f}s\n" + report.format())
    torture_report(f"carrier drops (seed {seed})", report)
    assert report.problems() == [], report.format()
    assert report.submitted_out > 0 and report.expected_local > 0
    assert ledger.drops >= target
