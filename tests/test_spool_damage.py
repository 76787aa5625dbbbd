"""A damaged spool loses no acknowledged mail: the catalogue truncated, deleted, its WAL lost
or cut, a page corrupted, a body truncated.  Each case ends with every acknowledged message
delivered exactly once, or listed by ``dialmail spool check`` with the command that sends it."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.delivery.worker import LocalDelivery
from gateway.office.directory import Directory
from spool import check, rebuild
from spool.queue import CATALOGUE, DELIVERED, RELAY, Catalogue, CatalogueDamaged, Queue
from tests.harness import ROOT, wait_for
from tests.test_relay import Office, message

pytestmark = pytest.mark.peer


# ---------------------------------------------------------------- damage, as the audit did it


def catalogue(o: Office) -> Path:
    return o.cfg.spool_dir / CATALOGUE


def restart(o: Office) -> dict[str, int]:
    """What ``dialmail run`` does at start: open the spool, recover."""
    o.queue.cat.close()
    o.queue = Queue(Catalogue(o.cfg.spool_dir))
    o.delivery = LocalDelivery(o.cfg, o.queue, Directory(o.cfg, o.users))
    return o.queue.recover()


def reopen(o: Office) -> None:
    o.queue.cat.close()
    o.queue = Queue(Catalogue(o.cfg.spool_dir))
    o.delivery = LocalDelivery(o.cfg, o.queue, Directory(o.cfg, o.users))


def snapshot_while_open(o: Office, dest: Path, with_wal: bool) -> None:
    """Copy the catalogue file (and its WAL) as they are now, commits still in the WAL."""
    db = catalogue(o)
    wal = db.with_name(db.name + "-wal")
    assert wal.exists() and wal.stat().st_size > 0, "the test needs commits that are only in the WAL"
    shutil.copyfile(db, dest)
    if with_wal:
        shutil.copyfile(wal, dest.with_name(dest.name + "-wal"))


def restore(o: Office, saved: Path, with_wal: bool) -> None:
    """Put the saved files back in place of the catalogue of the closed spool."""
    db = catalogue(o)
    for suffix in ("-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    shutil.copyfile(saved, db)
    if with_wal:
        shutil.copyfile(saved.with_name(saved.name + "-wal"), db.with_name(db.name + "-wal"))


def corrupt_wal_frame(wal: Path, page_size: int) -> int:
    """Flip bytes inside the page of the middle frame: SQLite stops reading the WAL there."""
    data = bytearray(wal.read_bytes())
    frame = 24 + page_size
    frames = (len(data) - 32) // frame
    assert frames >= 3
    k = frames // 2
    at = 32 + k * frame + 24 + 200
    data[at:at + 16] = bytes(b ^ 0xFF for b in data[at:at + 16])
    wal.write_bytes(bytes(data))
    return k


def corrupt_page(db: Path, page: int, page_size: int) -> None:
    with open(db, "r+b") as f:
        f.seek((page - 1) * page_size)
        f.write(b"\xa5" * page_size)


def cli(o: Office, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", "-c", str(o.path), *args], capture_output=True,
                          timeout=60, cwd=ROOT)


def relay_subjects(sink) -> list[str]:
    return sorted(str(m.message["Subject"]) for m in sink.messages())


def queue_relay(o: Office, n: int, tag: str) -> list[str]:
    return [o.send("alice@office.test", [f"friend{i}@example.com"], message(f"{tag} {i}")) for i in range(n)]


def drained(o: Office, sink, expected_relay: list[str], local: dict[str, list[str]]) -> None:
    """Flush and deliver; every expected message arrived exactly once and the queue is empty."""
    o.flush()
    o.deliver_local()
    if expected_relay:
        sink.wait_messages(len(expected_relay))
    time.sleep(0.2)  # a second copy would arrive within the same flush; give the sink its last read
    assert relay_subjects(sink) == sorted(expected_relay)
    for user, subjects in local.items():
        assert sorted(str(m["Subject"]) for m in o.mailbox(user)) == sorted(subjects)
    assert o.queue.messages() == []


# ---------------------------------------------------------------- the catalogue lost


@pytest.mark.parametrize("damage", ["truncated to 0 bytes", "deleted"])
def test_a_lost_catalogue_is_rebuilt_from_the_queue_files_loudly(office, smtp_sink, damage):
    o = office(smtp_sink.port)
    queue_relay(o, 5, "relay")
    # Half done: the smarthost took the relay recipient, bob's copy still waits.
    mixed = o.send("alice@office.test", ["partner@example.com", "bob@office.test"], message("mixed"))
    o.queue.record(mixed, "partner@example.com", DELIVERED, 250, "2.0.0 ok")
    o.queue.cat.close()
    db = catalogue(o)
    assert not db.with_name(db.name + "-wal").exists()
    if damage == "deleted":
        db.unlink()
    else:
        os.truncate(db, 0)

    report = restart(o)
    assert report["created"] == 1 and report["imported"] == 6 and report["orphans"] == 0
    lines = rebuild.describe(report)
    assert lines[0][0] == logging.ERROR and "rebuilt from them (6 queued again" in lines[0][1]
    assert all(level > logging.INFO for level, _ in lines)
    assert o.status(mixed) == {"partner@example.com": DELIVERED, "bob@office.test": "queued"}
    drained(o, smtp_sink, [f"relay {i}" for i in range(5)], {"bob": ["mixed"]})


def test_a_finished_message_whose_files_outlived_its_row_is_not_sent_again(office, smtp_sink):
    """A kill between the commit that removes a message and the unlink of its files."""
    o = office(smtp_sink.port)
    qid = o.send("alice@office.test", ["friend@example.com"], message("once"))
    body, env = o.queue.body_path(qid).read_bytes(), o.queue.envelope_path(qid).read_bytes()
    o.flush()
    assert relay_subjects(smtp_sink) == ["once"]
    o.queue.body_path(qid).write_bytes(body)
    o.queue.envelope_path(qid).write_bytes(env + b'{"final":"friend@example.com","status":"delivered",'
                                           b'"code":250,"reply":"ok"}\n{"removed":true}\n')
    report = restart(o)
    assert report["settled"] == 1 and not o.queue.body_path(qid).exists()
    drained(o, smtp_sink, ["once"], {})


# ---------------------------------------------------------------- the WAL lost or cut


def test_commits_lost_with_the_wal_are_recovered_from_the_queue_files(office, smtp_sink, tmp_path):
    o = office(smtp_sink.port)
    early = queue_relay(o, 2, "early")
    early_local = o.send("alice@office.test", ["bob@office.test"], message("early local"))
    reopen(o)  # closing checkpointed the early messages into the database file
    late = queue_relay(o, 3, "late")
    o.deliver_local()  # bob's copy delivered: that outcome is only in the WAL too
    assert o.queue.get(early_local) is None
    saved = tmp_path / "db-before"
    snapshot_while_open(o, saved, with_wal=False)
    o.queue.cat.close()
    restore(o, saved, with_wal=False)

    report = restart(o)
    assert report["imported"] == 3, report  # the three answered 250 that the old recovery deleted
    assert {m.id for m in o.queue.messages()} == set(early + late)
    assert o.queue.get(early_local) is None  # its row came back with the file removed: not delivered twice
    assert report["vanished"] == 1
    drained(o, smtp_sink, [f"early {i}" for i in range(2)] + [f"late {i}" for i in range(3)],
            {"bob": ["early local"]})


def test_a_corrupted_wal_frame_loses_no_acknowledged_message(office, smtp_sink, tmp_path):
    o = office(smtp_sink.port)
    queue_relay(o, 2, "early")
    reopen(o)
    queue_relay(o, 6, "late")
    half = o.send("alice@office.test", ["partner@example.com", "bob@office.test"], message("half"))
    o.queue.record(half, "partner@example.com", DELIVERED, 250, "2.0.0 ok")
    saved = tmp_path / "db-before"
    snapshot_while_open(o, saved, with_wal=True)
    page_size = o.queue.cat.execute("PRAGMA page_size").fetchone()[0]
    o.queue.cat.close()
    restore(o, saved, with_wal=True)
    corrupt_wal_frame(catalogue(o).with_name(CATALOGUE + "-wal"), page_size)

    report = restart(o)
    assert report["imported"] + report["reconciled"] >= 1, report
    assert o.status(half)["partner@example.com"] == DELIVERED  # not sent a second time
    drained(o, smtp_sink, [f"early {i}" for i in range(2)] + [f"late {i}" for i in range(6)],
            {"bob": ["half"]})


# ---------------------------------------------------------------- a corrupted catalogue page


def _fill_catalogue_only_table(o: Office) -> int:
    """Enough fetch-dedupe rows for a b-tree with interior pages; returns its root page."""
    from spool.fetchstate import FetchState
    FetchState(o.queue.cat)
    with o.queue.cat.transaction() as conn:
        conn.executemany("INSERT INTO fetch_delivered(rcpt, msgid, account, fetched) VALUES (?,?,?,?)",
                         [(f"user{i}@office.test", f"<{i}.{'x' * 40}@isp.example>", "isp", time.time())
                          for i in range(3000)])
    return o.queue.cat.execute("SELECT rootpage FROM sqlite_master WHERE name='fetch_delivered'").fetchone()[0]


@pytest.mark.parametrize("where", ["an interior page", "the header page"])
def test_a_corrupt_catalogue_stops_the_daemon_with_one_line_and_repair_rebuilds_it(office, smtp_sink, where):
    o = office(smtp_sink.port)
    queue_relay(o, 5, "relay")
    local = o.send("alice@office.test", ["bob@office.test"], message("local"))
    root = _fill_catalogue_only_table(o)
    page_size = o.queue.cat.execute("PRAGMA page_size").fetchone()[0]
    o.queue.cat.close()
    corrupt_page(catalogue(o), root if where == "an interior page" else 1, page_size)

    with pytest.raises(CatalogueDamaged):
        Catalogue(o.cfg.spool_dir)
    for command in (["queue", "list"], ["run"]):
        r = cli(o, *command)
        err = r.stderr.decode()
        said = [line for line in err.splitlines() if line.startswith("dialmail: ")]
        assert r.returncode == 75, err
        assert "Traceback" not in err and len(said) == 1, err
        assert "is damaged" in said[0] and "'dialmail spool repair'" in said[0]
    before = catalogue(o).read_bytes()

    r = cli(o, "spool", "check")
    out = r.stdout.decode()
    assert r.returncode == 1, out + r.stderr.decode()
    assert "the catalogue is damaged" in out and "move it aside as dialmail.db.corrupt-<time>" in out
    assert catalogue(o).read_bytes() == before, "check changed the catalogue"

    r = cli(o, "spool", "repair")
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert "rebuilt: 6 message(s) queued again" in out and out.rstrip().endswith("spool ok")
    aside = [p for p in o.cfg.spool_dir.glob(CATALOGUE + ".corrupt-*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and aside[0].read_bytes() == before  # kept, never deleted

    reopen(o)
    assert {m.id for m in o.queue.messages()} >= {local}
    drained(o, smtp_sink, [f"relay {i}" for i in range(5)], {"bob": ["local"]})


# ---------------------------------------------------------------- a truncated body


def test_a_truncated_body_is_held_listed_by_check_and_sent_when_released(office, smtp_sink, caplog):
    o = office(smtp_sink.port)
    good = o.send("alice@office.test", ["one@example.com"], message("good"))
    data = message("cut", body="x" * 5000)
    cut = o.send("alice@office.test", ["two@example.com"], data)
    os.truncate(o.queue.body_path(cut), 3000)

    with caplog.at_level(logging.ERROR, logger="dialmail.spool"):
        o.flush()
    assert relay_subjects(smtp_sink) == ["good"]
    assert o.queue.get(good) is None and o.queue.get(cut).hold
    assert f"{cut}: held: its body is 3000 bytes, {len(data)} were accepted" in caplog.text

    r = cli(o, "spool", "check")
    out = r.stdout.decode()
    assert r.returncode == 1
    assert f"{cut}: body is 3000 bytes, {len(data)} were accepted" in out
    assert f"'dialmail queue release {cut}' sends it as it is" in out

    assert cli(o, "queue", "release", cut).returncode == 0
    reopen(o)
    drained(o, smtp_sink, ["good", "cut"], {})


def test_a_body_truncated_while_stopped_is_held_at_start(office, smtp_sink):
    o = office(smtp_sink.port)
    cut = o.send("alice@office.test", ["bob@office.test"], message("cut", body="y" * 4000))
    o.queue.cat.close()
    os.truncate(o.queue.body_path(cut), 100)
    report = restart(o)
    assert report["damaged"] == 1 and o.queue.get(cut).hold
    o.deliver_local()
    assert o.mailbox("bob") == []


# ---------------------------------------------------------------- check and repair of the rest


def test_check_lists_every_problem_and_repair_keeps_every_byte(office, smtp_sink):
    o = office(smtp_sink.port)
    spool = o.cfg.spool_dir
    claimed = o.send("alice@office.test", ["friend@example.com"], message("claimed"))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert o.queue.claim(RELAY, f"relay:{gone.pid}:x") == [(claimed, "friend@example.com")]
    lost_body = o.send("alice@office.test", ["x@example.com"], message("lost body"))
    o.queue.body_path(lost_body).unlink()
    partial = o.queue.msg / "0000000000000PARTIAL"
    partial.write_bytes(b"half a message")
    stale = spool / "mail" / "bob" / "tmp" / "1.dead.host"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"a delivery that died")
    old = time.time() - 40 * 3600
    os.utime(stale, (old, old))
    o.queue.cat.close()

    findings = {(f.kind, f.subject) for f in check.check(spool)}
    assert findings == {("claim", f"relay:{gone.pid}:x"), ("missing-body", lost_body),
                        ("partial", partial.name), ("maildir-tmp", "mail/bob/tmp/1.dead.host")}
    r = cli(o, "spool", "check")
    assert r.returncode == 1 and "repair will: release the claim" in r.stdout.decode()

    r = cli(o, "spool", "repair")
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    lost = spool / "lost+found"
    assert (lost / f"{partial.name}.partial").read_bytes() == b"half a message"
    assert (lost / "maildir-tmp" / "mail_bob_tmp_1.dead.host").read_bytes() == b"a delivery that died"
    assert "lost body" in (lost / f"{lost_body}.row.txt").read_text() or lost_body in \
        (lost / f"{lost_body}.row.txt").read_text()
    assert check.check(spool) == []
    reopen(o)
    drained(o, smtp_sink, ["claimed"], {})


def test_repair_refuses_while_the_daemon_runs(site):
    site.start()
    try:
        r = site.cli("spool", "repair")
        assert r.returncode == 75 and "stop it, then repair" in r.stderr.decode()
        assert site.cli("spool", "check").returncode == 0
    finally:
        site.stop()


# ---------------------------------------------------------------- the real daemon


def test_daemon_restarted_on_a_truncated_catalogue_sends_every_acknowledged_message(site, smtp_sink):
    site.write_config(f"""
        [smarthost]
        host = "127.0.0.1"
        port = {smtp_sink.port}
        starttls = "off"
        """)
    site.start()
    try:
        with smtplib.SMTP("127.0.0.1", site.smtp_port, timeout=10) as c:
            for i in range(5):
                c.sendmail("alice@office.test", [f"friend{i}@example.com"], message(f"acked {i}"))
    finally:
        assert site.stop(signal.SIGTERM) == 0
    os.truncate(site.spool / CATALOGUE, 0)

    site.start()
    try:
        wait_for(lambda: "recovery:" in site.log(), what="the recovery report")
        log = site.log()
        assert "ERROR dialmail.daemon: recovery: the catalogue was missing or empty while 5 message(s)" in log
        assert "unacknowledged" not in log and "INFO dialmail.daemon: recovery: removed" not in log
        r = site.cli("queue", "flush")
        assert r.returncode == 0, r.stderr.decode()
        smtp_sink.wait_messages(5)
        time.sleep(0.2)
        assert sorted(str(m.message["Subject"]) for m in smtp_sink.messages()) == [f"acked {i}" for i in range(5)]
    finally:
        site.stop()


def test_an_old_spool_without_queue_envelopes_gets_them_written(office, smtp_sink):
    """Messages queued before queue files carried envelopes: recovery writes them from the rows."""
    o = office(smtp_sink.port)
    qid = o.send("alice@office.test", ["friend@example.com"], message("old"))
    o.queue.envelope_path(qid).unlink()
    report = restart(o)
    assert report["journals"] == 1 and o.queue.envelope_path(qid).exists()
    o.queue.cat.close()
    os.truncate(o.cfg.spool_dir / CATALOGUE, 0)
    assert restart(o)["imported"] == 1
    drained(o, smtp_sink, ["old"], {})


# ---------------------------------------------------------------- what the queueing stood for


def test_a_fetched_message_queued_again_keeps_its_isp_copy_recorded_as_taken(tmp_path):
    """The fetcher must not take the same UID again after the catalogue was lost."""
    from spool.fetchstate import Copy, FetchState, Taking
    spool = tmp_path / "spool"
    cat = Catalogue(spool)
    q = Queue(cat)
    FetchState(cat)
    taking = Taking(Copy("isp", "INBOX", 42, 120, "digest", delete=True), now=time.time(),
                    recipients=("bob@office.test",), msgid="mid-digest")
    qid = q.enqueue("friend@example.com", [("bob@office.test", "local")], b"Subject: x\r\n\r\nx\r\n",
                    origin="fetch", then=taking)
    cat.close()
    os.truncate(spool / CATALOGUE, 0)
    cat = Catalogue(spool)
    try:
        assert Queue(cat).recover()["imported"] == 1
        state = FetchState(cat)
        assert list(state.taken("isp", "INBOX")) == [42] and state.pending_deletion("isp", "INBOX") == [42]
        assert state.delivered_to(["bob@office.test"], "mid-digest") == {"bob@office.test"}
        assert cat.execute("SELECT qid FROM fetch_uids").fetchone()[0] == qid
    finally:
        cat.close()


def test_a_reported_bounce_is_not_reported_again_after_the_catalogue_is_lost(office, smtp_sink):
    from spool import notices
    o = office(smtp_sink.port)
    qid = o.send("alice@office.test", ["gone@example.com", "later@example.com"], message("partly"))
    o.queue.record(qid, "gone@example.com", "bounced", 550, "5.1.1 no such user")
    sent = notices.queue_bounce(o.queue, notices.Notice(qid, "alice@office.test", "local", b"Subject: b\r\n\r\nb\r\n",
                                                        "bounce", "b"), ["gone@example.com"])
    o.queue.cat.close()
    os.truncate(catalogue(o), 0)
    report = restart(o)
    assert report["imported"] == 2
    assert notices.reported(o.queue, qid) == {"gone@example.com"}
    assert o.status(qid) == {"gone@example.com": "bounced", "later@example.com": "queued"}
    assert o.queue.get(sent.notice_id) is not None
