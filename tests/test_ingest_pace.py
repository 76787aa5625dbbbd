"""SMTP ingest keeps pace: messages that reach their final dot while others are on their
way to disk are queued together, sharing the file system's flushes (the files' fsyncs
side by side, one fsync per queue directory, one catalogue COMMIT), and still nobody
hears 250 before their own message is on disk (spool/intake.py)."""
from __future__ import annotations

import os
import smtplib
import threading
import time
from pathlib import Path

import pytest

from tests.harness import Site
from tests.test_submit_per_connection import InProcessSubmission

pytestmark = pytest.mark.timeout(60)

N = 6


def _send(port: int, n: int, answered: list[int], failed: list[BaseException]) -> None:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.sendmail("x@outside.test", ["alice@office.test"],
                       f"Subject: pace {n}\r\nMessage-ID: <pace-{n}@outside.test>\r\n\r\n" + f"body {n}\r\n" * 50)
        answered.append(n)
    except BaseException as exc:  # noqa: BLE001 - reported by the test below
        failed.append(exc)


def test_messages_reaching_their_dot_together_share_the_disks_flushes(tmp_path, monkeypatch):
    site = Site(tmp_path)
    site.add_user("alice", "alice-pw")
    server = InProcessSubmission(site)
    try:
        queue = server.spool.queue
        answered: list[int] = []
        failed: list[BaseException] = []
        synced: list[str] = []
        held: list[list[int]] = []
        real_fsync = os.fsync
        first = threading.Lock()

        def fsync(fd: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            # the first message's body and journal are fsynced side by side: hold one of them
            if path.startswith(f"{queue.tmp}/") and first.acquire(blocking=False):
                # The first message is on its way to disk: hold it there until the other
                # five have reached their dot and wait for the intake.
                deadline = time.monotonic() + 20
                while queue.intake.waiting < N - 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
                held.append(list(answered))  # who had heard 250 by then: nobody
            synced.append(path)
            real_fsync(fd)
        monkeypatch.setattr(os, "fsync", fsync)
        writes: list[str] = []
        conn = queue.cat.conn
        conn.set_trace_callback(lambda sql: writes.append(sql[:40]) if (
            sql.startswith("BEGIN") or (not conn.in_transaction and sql.split()[0].upper()
                                        in ("INSERT", "UPDATE", "DELETE"))) else None)

        clients = [threading.Thread(target=_send, args=(server.port, n, answered, failed)) for n in range(N)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(40)
        conn.set_trace_callback(None)

        assert not failed, failed
        assert sorted(answered) == list(range(N))
        assert held == [[]]  # nobody was answered before the first message was on disk
        # The first message alone, then the five that waited meanwhile, together.
        assert queue.intake.batches == 2
        assert writes == ["BEGIN IMMEDIATE", "BEGIN IMMEDIATE"]
        dirs = sorted(p for p in synced if Path(p).is_dir())
        assert dirs == sorted([str(queue.msg), str(queue.env)] * 2)
        files = [p for p in synced if not Path(p).is_dir()]
        assert len(files) == 2 * N  # each body and each envelope journal, once
        assert len({os.path.basename(p).removesuffix(".env") for p in files}) == N
        ids = {m.message_id for m in queue.messages()}
        assert ids == {f"<pace-{n}@outside.test>" for n in range(N)}
        assert len(list(queue.msg.iterdir())) == len(list(queue.env.iterdir())) == N
    finally:
        server.close()


def test_a_message_id_added_to_lan_mail_is_the_one_the_queue_records(tmp_path):
    """The header block is parsed once, from DATA's buffer, after the missing headers
    were added: the catalogue lists the Message-ID the stored message carries."""
    site = Site(tmp_path)
    server = InProcessSubmission(site)
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
            s.sendmail("alice@office.test", ["partner@elsewhere.test"], "Subject: bare\r\n\r\nhello\r\n")
        (msg,) = server.spool.queue.messages()
        stored = (server.spool.queue.msg / msg.id).read_bytes().split(b"\r\n\r\n", 1)[0]
        assert msg.message_id and f"\r\nMessage-ID: {msg.message_id}\r\n".encode() in stored + b"\r\n"
        assert msg.message_id.endswith(f".{msg.id}@{server.cfg.server.hostname}>")
        assert msg.subject == "bare"
    finally:
        server.close()
