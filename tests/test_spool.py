"""The spool: durable order of operations, crash recovery, exactly-once Maildir delivery."""
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from spool import notices
from spool.maildir import Maildir
from spool.queue import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    LOCAL,
    QUEUED,
    RELAY,
    Catalogue,
    Queue,
    new_queue_id,
)
from tests.harness import ROOT


@pytest.fixture
def queue(tmp_path):
    cat = Catalogue(tmp_path / "spool")
    yield Queue(cat)
    cat.close()


def test_queue_ids_are_unique_and_sort_by_arrival():
    ids = [new_queue_id(1_700_000_000 + i * 0.000001) for i in range(1000)]
    assert len(set(ids)) == 1000
    assert ids == sorted(ids)


def test_enqueue_stores_body_and_envelope(queue):
    qid = queue.enqueue("a@x.test", [("b@y.test", RELAY), ("c@office.test", LOCAL)], b"Subject: hi\r\n\r\nbody\r\n",
                        origin="smtp", subject="hi")
    msg = queue.get(qid)
    assert msg.sender == "a@x.test" and msg.size == len(b"Subject: hi\r\n\r\nbody\r\n")
    assert [(r.rcpt, r.route, r.status) for r in msg.recipients] == [("b@y.test", RELAY, QUEUED),
                                                                     ("c@office.test", LOCAL, QUEUED)]
    assert queue.body_path(qid).read_bytes().endswith(b"body\r\n")
    assert os.listdir(queue.tmp) == []


def test_failed_catalogue_commit_leaves_no_body(queue):
    def boom(conn, qid):
        raise RuntimeError("simulated failure inside the transaction")
    with pytest.raises(RuntimeError):
        queue.enqueue("a@x.test", [("b@y.test", RELAY)], b"x", origin="smtp", then=boom)
    assert queue.messages() == []
    assert os.listdir(queue.msg) == [] and os.listdir(queue.tmp) == []


@dataclass(frozen=True)
class Said:
    status: str
    code: int
    reply: str


def test_a_bounced_recipient_keeps_its_message_until_the_bounce_is_queued_with_its_removal(queue):
    qid = queue.enqueue("a@x.test", [("b@y.test", RELAY), ("c@y.test", RELAY)], b"x", origin="smtp")
    removed = queue.record_outcomes(qid, {"b@y.test": Said(DELIVERED, 250, "2.0.0 ok"),
                                          "c@y.test": Said(BOUNCED, 550, "5.1.1 no such user")},
                                    remove_settled=True)
    assert not removed and queue.get(qid) is not None  # nobody told the sender yet
    sent = notices.queue_bounce(queue, notices.Notice(qid, "a@x.test", RELAY, b"bounce", "bounce", "s"),
                                ["c@y.test"])
    assert sent.removed and queue.get(qid) is None and not queue.body_path(qid).exists()
    assert [m.id for m in queue.messages()] == [sent.notice_id]


def test_a_bounce_for_recipients_that_changed_meanwhile_queues_nothing(queue):
    qid = queue.enqueue("a@x.test", [("b@y.test", RELAY), ("c@y.test", RELAY)], b"x", origin="smtp")
    queue.record(qid, "b@y.test", BOUNCED, 550, "5.1.1 no such user")
    queue.record(qid, "c@y.test", BOUNCED, 550, "5.1.1 no such user")
    with pytest.raises(notices.QueueChanged):
        notices.queue_bounce(queue, notices.Notice(qid, "a@x.test", RELAY, b"bounce", "bounce", "s"),
                             ["b@y.test"])
    assert [m.id for m in queue.messages()] == [qid] and notices.reported(queue, qid) == set()
    assert os.listdir(queue.msg) == [qid] and os.listdir(queue.tmp) == []


def test_one_delay_warning_per_message(queue):
    qid = queue.enqueue("a@x.test", [("b@y.test", RELAY)], b"x", origin="smtp")
    warning = notices.Notice(qid, "a@x.test", RELAY, b"warning", "bounce", "s")
    first = notices.queue_warning(queue, warning)
    with pytest.raises(notices.QueueChanged):
        notices.queue_warning(queue, warning)
    assert queue.get(qid).warned and [m.id for m in queue.messages()] == [qid, first]


def test_failing_waiting_recipients_leaves_those_in_flight_unless_told(queue):
    qid = queue.enqueue("a@x.test", [("b@y.test", RELAY), ("c@y.test", RELAY), ("d@y.test", RELAY)], b"x",
                        origin="smtp")
    queue.record(qid, "d@y.test", DELIVERED, 250, "2.0.0 ok")
    queue.record(qid, "b@y.test", DEFERRED, 451, "4.3.0 busy")
    [(_, in_flight)] = queue.claim(RELAY, "relay:1:a", limit=1)
    waiting = ({"b@y.test", "c@y.test"} - {in_flight}).pop()

    def expired(r):
        return Said(BOUNCED, 554, f"4.4.7 expired; last error: {r.last_code}")

    assert queue.fail_waiting(qid, expired) == 1
    assert {r.rcpt: r.status for r in queue.get(qid).recipients} == \
        {waiting: BOUNCED, in_flight: QUEUED if in_flight == "c@y.test" else DEFERRED, "d@y.test": DELIVERED}
    assert queue.claim_owners("relay:") == ["relay:1:a"]
    assert queue.fail_waiting(qid, expired, in_flight_too=True) == 1
    assert [(r.rcpt, r.status, r.last_reply) for r in queue.get(qid).recipients] == [
        ("b@y.test", BOUNCED, "4.4.7 expired; last error: 451"),
        ("c@y.test", BOUNCED, "4.4.7 expired; last error: None"),
        ("d@y.test", DELIVERED, "2.0.0 ok")]
    assert queue.claim_owners("relay:") == []


def test_message_leaves_only_when_every_recipient_is_final(queue):
    qid = queue.enqueue("a@x.test", [("b@y.test", RELAY), ("c@y.test", RELAY)], b"x", origin="smtp")
    queue.record(qid, "b@y.test", DELIVERED, 250, "ok")
    assert not queue.remove_if_done(qid)
    queue.record(qid, "c@y.test", DELIVERED, 250, "ok")
    assert queue.remove_if_done(qid)
    assert queue.get(qid) is None and not queue.body_path(qid).exists()


def test_claims_are_exclusive_and_released(queue):
    qid = queue.enqueue("a@x.test", [("b@office.test", LOCAL)], b"x", origin="smtp")
    assert queue.claim(LOCAL, "one") == [(qid, "b@office.test")]
    assert queue.claim(LOCAL, "two") == []
    queue.release_claims("one")
    assert queue.claim(LOCAL, "two") == [(qid, "b@office.test")]


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from spool.queue import Catalogue, Queue, RELAY
    q = Queue(Catalogue(Path(sys.argv[1])))
    body = b"Subject: crash test\\r\\n\\r\\n" + b"x" * 2_000_000 + b"\\r\\n"
    while True:
        qid = q.enqueue("a@x.test", [("b@y.test", RELAY)], body, origin="smtp")
        print(qid, flush=True)
""")


@pytest.mark.timeout(120)
def test_kill_9_mid_write_leaves_complete_messages_or_nothing(tmp_path):
    """Kill a real writer with SIGKILL at random moments; recovery keeps exactly the acknowledged ones."""
    spool = tmp_path / "spool"
    rng = random.Random(4242)
    acknowledged: set[str] = set()
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(spool)], stdout=subprocess.PIPE, cwd=ROOT)
        first = proc.stdout.readline().strip().decode()  # at least one message is in
        acknowledged.add(first)
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0].decode().split()
        acknowledged.update(out)
        proc.wait()
    cat = Catalogue(spool)
    q = Queue(cat)
    report = q.recover()
    ids = {m.id for m in q.messages()}
    assert acknowledged <= ids, "an acknowledged message was lost"
    for m in q.messages():
        assert q.body_path(m.id).stat().st_size == m.size == 2_000_000 + 25
    assert sorted(os.listdir(q.msg)) == sorted(ids), "a body without an envelope survived recovery"
    assert os.listdir(q.tmp) == []
    assert report["missing"] == 0
    cat.close()


def test_maildir_delivery_is_idempotent_by_name(tmp_path):
    md = Maildir(tmp_path / "mb").create()
    unique = md.unique_name(1_700_000_000, "Q1R2")
    first = md.deliver(b"Subject: a\r\n\r\nx\r\n", unique)
    # A reader moved it to cur/ and set flags, as Dovecot or our POP3 server would.
    moved = md.path / "cur" / (first.name + ":2,S")
    os.rename(first, moved)
    again = md.deliver(b"Subject: a\r\n\r\nx\r\n", unique, check_existing=True)
    assert again == moved
    assert len(md.messages()) == 1
    assert os.listdir(md.path / "tmp") == []


def _open_and_write(path: str, barrier, out) -> None:
    barrier.wait()  # every process opens the new spool at the same moment
    try:
        cat = Catalogue(Path(path))
        with cat.transaction() as conn:
            conn.execute("SELECT COUNT(*) FROM messages")
        cat.close()
        out.put("ok")
    except Exception as exc:  # reported to the test, which names it
        out.put(repr(exc))


def test_processes_opening_a_new_spool_at_once_wait_for_each_other():
    """Switching a new catalogue to WAL does not go through SQLite's busy handler: of six
    processes opening a new spool at once, one in seven rounds died "database is locked"."""
    ctx = multiprocessing.get_context("fork")
    failures = []
    for _ in range(40):
        with tempfile.TemporaryDirectory() as d:
            out, barrier = ctx.Queue(), ctx.Barrier(6)
            procs = [ctx.Process(target=_open_and_write, args=(d, barrier, out)) for _ in range(6)]
            for proc in procs:
                proc.start()
            failures += [r for r in (out.get(timeout=60) for _ in procs) if r != "ok"]
            for proc in procs:
                proc.join(30)
    assert failures == []
