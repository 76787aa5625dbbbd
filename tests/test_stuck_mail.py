"""No failure leaves mail stuck: a message whose file is gone, a full disk, a worker that
died -- none leaves a recipient claimed, and one failing message never stops the others."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest

from gateway.config import load
from gateway.daemon import Spool
from gateway.relay.expiry import expire
from spool.queue import DEFERRED, LOCAL, RELAY, Catalogue, Queue
from tests.torture.checker import mailbox_ids, make_message


@pytest.fixture
def queue(tmp_path):
    cat = Catalogue(tmp_path / "spool")
    yield Queue(cat)
    cat.close()


@pytest.fixture
def spool(site):
    s = Spool(load(site.config_path))
    yield s
    s.close()


def _local(spool: Spool, n: int, size: int = 2000) -> list[str]:
    """Queue ``n`` fetched-looking messages for alice; their Message-IDs."""
    mids = []
    for i in range(n):
        mid = f"<stuck-{i}-{time.monotonic_ns()}@outside.test>"
        spool.queue.enqueue("x@outside.test", [("alice@office.test", LOCAL)],
                            make_message(mid, "alice@office.test", size, sender="x@outside.test"),
                            origin="smtp", message_id=mid)
        mids.append(mid)
    return mids


def test_a_message_whose_file_is_gone_is_deferred_visibly_and_the_others_are_delivered(site, spool):
    mids = _local(spool, 4)
    lost = spool.queue.messages()[0].id
    os.unlink(spool.queue.body_path(lost))

    spool.delivery.run_once()

    assert Counter(mailbox_ids(site.spool)["alice"]) == Counter(mids[1:])
    assert spool.queue.claim_owners("") == []
    [r] = spool.queue.get(lost).recipients
    assert r.status == DEFERRED and f"queue/msg/{lost} is missing" in r.last_reply
    assert r.next_retry > time.time() + 60  # not tried again at every pass
    shown = site.cli("queue", "list").stdout.decode()
    assert lost in shown and "is missing from the spool" in shown

    # New mail still goes, at the next pass as after a restart.
    later = _local(spool, 1)
    spool.delivery.run_once()
    assert Counter(mailbox_ids(site.spool)["alice"]) == Counter(mids[1:] + later)
    assert spool.queue.claim_owners("") == []

    # It expires like any message: bounced to its sender, and it leaves the queue.
    expired = expire(spool.config, spool.queue, time.time() + spool.config.queue.queue_lifetime + 1)
    assert expired.bounced == [lost]
    assert spool.queue.get(lost) is None
    [notice] = spool.queue.messages()
    assert notice.sender == "" and notice.recipients[0].rcpt == "x@outside.test"


def test_a_failing_message_releases_its_claims_and_those_of_the_rest_of_the_pass(site, spool):
    """A message that cannot even be read (its file turned into a directory) fails alone."""
    mids = _local(spool, 3)
    broken = spool.queue.messages()[1].id
    path = spool.queue.body_path(broken)
    os.unlink(path)
    path.mkdir()

    assert spool.delivery.run_once() == 2
    assert Counter(mailbox_ids(site.spool)["alice"]) == Counter([mids[0], mids[2]])
    assert spool.queue.claim_owners("") == []
    # Released unrecorded: due again (an attempt counted), and it fails alone again.
    [r] = spool.queue.get(broken).recipients
    assert r.attempts == 1 and spool.delivery.run_once() == 0
    assert spool.queue.claim_owners("") == []


CLAIMER = """
import sys
from pathlib import Path
from spool.queue import Catalogue, Queue, RELAY
q = Queue(Catalogue(Path(sys.argv[1])))
owner = q.new_claimant("relay")
print(owner, q.claim(RELAY, owner), flush=True)
"""


def test_claims_of_dead_processes_and_of_retired_owners_are_released(queue, tmp_path):
    for i in range(4):
        queue.enqueue("a@x.test", [(f"r{i}@y.test", RELAY)], b"x", origin="smtp")
    # A process that claimed and died without releasing.
    out = subprocess.run([sys.executable, "-c", CLAIMER, str(queue.cat.root)], capture_output=True, check=True,
                         cwd=Path(__file__).parent.parent, text=True)
    dead = out.stdout.split()[0]
    # A live process, but not the one that claimed: its pid was reused after a restart.
    reused = f"relay:1:{'9' * 12}:beef"
    # This process: one owner at work, one whose release failed and was given up.
    working = queue.new_claimant("relay")
    retired = queue.new_claimant("local")
    queue.cat.execute("UPDATE recipients SET claim=? WHERE rcpt='r1@y.test'", (reused,))
    queue.cat.execute("UPDATE recipients SET claim=? WHERE rcpt='r2@y.test'", (working,))
    queue.cat.execute("UPDATE recipients SET claim=? WHERE rcpt='r3@y.test'", (retired,))
    queue.cat.execute("UPDATE recipients SET claim=NULL WHERE claim=? AND rcpt!='r0@y.test'", (dead,))
    type(queue)._claimants_here.discard(retired)

    assert sorted(queue.release_dead_claims()) == sorted([dead, reused, retired])
    assert queue.claim_owners("") == [working]
    assert queue.retire_claimant(working) == 1 and queue.claim_owners("") == []


@contextmanager
def small_disk(site, size: str):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    site.spool.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(site.spool)], check=True)
    try:
        yield
    finally:
        site.stop()
        subprocess.run(["umount", "-l", str(site.spool)])


def fill(path: Path) -> Path:
    """Take every free byte of the file system holding ``path``."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.timeout(120)
def test_disk_full_during_local_delivery_leaves_nothing_claimed_and_everything_goes_once_there_is_room(site):
    with small_disk(site, "4m"):
        site.add_user("alice", "alice-pw")
        spool = Spool(load(site.config_path))
        try:
            mids = _local(spool, 8, size=20_000)
            filler = fill(site.spool)
            # A little room at a time: each pass runs out somewhere else (the claim, a
            # Maildir file, recording an outcome, settling the message).
            for _ in range(12):
                spool.delivery._leftovers_checked = None
                spool.delivery.run_once()  # never raises, never spins
                # A release the full disk refused is no pass's any more: the next pass
                # with room frees it.
                assert not set(spool.queue.claim_owners("")) & Queue._claimants_here
                assert not spool.catalogue.conn.in_transaction
                os.truncate(filler, max(0, filler.stat().st_size - 12_000))
            filler.unlink()
            # Room again: the next passes (the worker's next kick or minute) deliver the rest
            # and settle whatever the full disk left half done.
            spool.delivery._leftovers_checked = None  # as after a failed pass
            while spool.delivery.run_once():
                pass
            assert spool.queue.claim_owners("") == []
            # What the full disk deferred is due again within a minute; a minute later:
            waiting = [r for m in spool.queue.messages() for r in m.pending]
            assert all(r.next_retry <= time.time() + 60 for r in waiting), waiting
            for m in spool.queue.messages():
                spool.queue.reschedule(m.id, 0)
            while spool.delivery.run_once():
                pass
            assert Counter(mailbox_ids(site.spool)["alice"]) == Counter(mids)
            assert spool.queue.messages() == []
        finally:
            spool.close()


def _always_on(site, sink_port: int) -> None:
    site.write_config(f"""
        [smarthost]
        host = "127.0.0.1"
        port = {sink_port}
        starttls = "off"

        [link]
        type = "always-on"
        """)


@pytest.mark.timeout(150)
def test_a_full_disk_never_leaves_the_session_lock_taken(site, smtp_sink):
    """Whatever the full disk refuses (the lock's pid, the session log, the transcript, the
    relay's records), the session ends, the lock is free and the next session runs."""
    import asyncio

    from gateway.session.session import Session, SessionContext
    from spool.sessions import SessionLock
    with small_disk(site, "4m"):
        _always_on(site, smtp_sink.port)
        config = load(site.config_path)
        spool = Spool(config)
        try:
            for i in range(6):
                spool.queue.enqueue("alice@office.test", [(f"friend{i}@example.com", RELAY)],
                                    make_message(f"<out-{i}@office.test>", f"friend{i}@example.com", 3000,
                                                 sender="alice@office.test"), origin="smtp")
            filler = fill(site.spool)
            outcomes = []
            for _ in range(10):
                rec = asyncio.run(Session(SessionContext(config, spool), "manual", "send").run())
                outcomes.append(rec.outcome)
                assert rec.outcome != "refused", rec.errors
                assert SessionLock(site.spool).holder() is None
                assert spool.queue.claim_owners("") == []
                os.truncate(filler, max(0, filler.stat().st_size - 8_000))
            filler.unlink()
            rec = asyncio.run(Session(SessionContext(config, spool), "manual", "send").run())
            assert rec.outcome == "ok", rec.errors
            # Nothing went twice, and all of it went.
            got = Counter(m.message["Message-ID"] for m in smtp_sink.wait_messages(6))
            assert got == Counter(f"<out-{i}@office.test>" for i in range(6)), (got, outcomes)
            assert spool.queue.messages() == []
        finally:
            spool.close()


@pytest.mark.timeout(120)
def test_queue_flush_on_a_full_disk_says_so_in_one_line_and_sends_nothing(site, smtp_sink):
    with small_disk(site, "4m"):
        _always_on(site, smtp_sink.port)
        q = Queue(Catalogue(site.spool))
        qid = q.enqueue("alice@office.test", [("friend@example.com", RELAY)],
                        make_message("<full@office.test>", "friend@example.com", 2000,
                                     sender="alice@office.test"), origin="smtp")
        filler = fill(site.spool)
        r = site.cli("queue", "flush")
        err = r.stderr.decode()
        assert r.returncode == 75, r.stdout.decode() + err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "disk is full" in err
        assert smtp_sink.messages() == []
        filler.unlink()
        r = site.cli("queue", "flush")
        assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
        assert len(smtp_sink.wait_messages(1)) == 1 and q.get(qid) is None
        q.cat.close()
