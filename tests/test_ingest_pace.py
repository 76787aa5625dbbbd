"""SMTP ingest keeps pace: messages go on disk in the queue's writer process
(spool/writer.py), and those that reach their final dot while others are on their way
to disk are queued together, sharing the file system's flushes (spool/intake.py); still
nobody hears 250 before their own message is on disk, and a writer that dies loses
nothing and stops nothing for long."""
from __future__ import annotations

import os
import signal
import smtplib
import threading
import time
from pathlib import Path

import psutil
import pytest

from spool.queue import LOCAL, Arrival, Catalogue, Queue
from spool.writer import InMemory
from tests.harness import Site, wait_for
from tests.test_submit_per_connection import InProcessSubmission

pytestmark = pytest.mark.timeout(90)

N = 6


def _message(n: int) -> bytes:
    return f"Subject: pace {n}\r\nMessage-ID: <pace-{n}@outside.test>\r\n\r\n".encode() + f"body {n}\r\n".encode() * 50


def test_messages_reaching_the_intake_together_share_the_disks_flushes(tmp_path, monkeypatch):
    """The batching the writer process runs, in this process so its fsyncs can be seen."""
    queue = Queue(Catalogue(tmp_path))
    try:
        synced: list[str] = []
        held: list[int] = []
        real_fsync = os.fsync
        first = threading.Lock()
        holding = threading.Event()

        def fsync(fd: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            # the first message's body and journal are fsynced side by side: hold one of them
            # until the other five are waiting for the intake
            if path.startswith(f"{queue.tmp}/") and first.acquire(blocking=False):
                holding.set()
                deadline = time.monotonic() + 20
                while queue.intake.waiting < N - 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
                held.append(sum(1 for d in done if d.done()))  # answered by then: none
            synced.append(path)
            real_fsync(fd)
        monkeypatch.setattr(os, "fsync", fsync)
        writes: list[str] = []
        conn = queue.cat.conn
        conn.set_trace_callback(lambda sql: writes.append(sql[:40]) if (
            sql.startswith("BEGIN") or (not conn.in_transaction and sql.split()[0].upper()
                                        in ("INSERT", "UPDATE", "DELETE"))) else None)
        done = []
        for n in range(N):
            qid, tmp = queue.new_body()
            done.append(queue.intake.submit(Arrival(qid, tmp, "x@outside.test", [("alice@office.test", LOCAL)],
                                                    origin="smtp", message_id=f"<pace-{n}@outside.test>",
                                                    body=InMemory(tmp, _message(n)))))
            if n == 0:  # the other five arrive while the first is on its way to disk
                assert holding.wait(20)
        qids = [d.result(30) for d in done]
        conn.set_trace_callback(None)

        assert held == [0]  # nobody was answered before the first message was on disk
        assert queue.intake.batches == 2  # the first alone, then the five that waited, together
        assert writes == ["BEGIN IMMEDIATE", "BEGIN IMMEDIATE"]
        dirs = sorted(p for p in synced if Path(p).is_dir())
        assert dirs == sorted([str(queue.msg), str(queue.env)] * 2)
        files = [p for p in synced if not Path(p).is_dir()]
        assert len(files) == 2 * N  # each body and each envelope journal, once
        assert {m.message_id for m in queue.messages()} == {f"<pace-{n}@outside.test>" for n in range(N)}
        for n, qid in enumerate(qids):
            assert (queue.msg / qid).read_bytes() == _message(n)
        assert not any(queue.tmp.iterdir())
    finally:
        queue.cat.close()


def _send(port: int, n: int, replies: dict[int, object]) -> None:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            replies[n] = s.sendmail("x@outside.test", ["alice@office.test"], _message(n))
    except smtplib.SMTPException as exc:
        replies[n] = exc


@pytest.fixture
def submission(tmp_path):
    """dialmail's SMTP listener in this process, for alice@office.test."""
    site = Site(tmp_path)
    site.add_user("alice", "alice-pw")
    server = InProcessSubmission(site)
    yield server
    server.close()


def test_smtp_clients_at_once_are_queued_by_the_writer_process(submission):
    server = submission
    replies: dict[int, object] = {}
    clients = [threading.Thread(target=_send, args=(server.port, n, replies)) for n in range(N)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(40)
    assert replies == {n: {} for n in range(N)}  # 250 for every one
    writer = server.handler.writer.proc
    assert psutil.Process(writer.pid).ppid() == os.getpid()
    assert 1 <= server.handler.writer.batches <= N
    assert {m.message_id for m in server.spool.queue.messages()} == {f"<pace-{n}@outside.test>" for n in range(N)}
    server.close()
    assert writer.returncode == 0  # it finished and went when the listener closed


def test_a_writer_killed_with_a_message_in_hand_gets_451_and_the_next_message_a_new_writer(submission):
    server = submission
    replies: dict[int, object] = {}
    _send(server.port, 0, replies)
    writer = server.handler.writer
    first = writer.proc.pid
    os.kill(first, signal.SIGSTOP)  # it takes the next request and does nothing with it
    client = threading.Thread(target=_send, args=(server.port, 1, replies))
    client.start()
    wait_for(lambda: writer.waiting, what="the message handed to the stopped writer")
    os.kill(first, signal.SIGKILL)
    client.join(30)
    assert isinstance(replies[1], smtplib.SMTPDataError)
    assert (replies[1].smtp_code, replies[1].smtp_error) == (451, b"4.3.0 Local error in processing, try again later")
    assert not any(server.spool.queue.tmp.iterdir())  # nothing half-written left behind
    _send(server.port, 2, replies)
    assert replies[0] == replies[2] == {}
    assert writer.proc.pid != first
    assert {m.message_id for m in server.spool.queue.messages()} == {"<pace-0@outside.test>",
                                                                     "<pace-2@outside.test>"}


def test_the_writer_dies_with_a_killed_daemon_and_queues_nothing_nobody_was_told_of(tmp_path):
    """Committing a message after the daemon is gone would only turn the client's resend
    into a second copy: the writer holding one goes with the daemon, and the next start
    clears what it left in tmp/."""
    site = Site(tmp_path)
    site.add_user("alice", "alice-pw")
    site.start()
    try:
        replies: dict[int, object] = {}
        _send(site.smtp_port, 0, replies)
        assert replies == {0: {}}
        (writer,) = [p for p in psutil.Process(site.proc.pid).children() if "spool.writer" in p.cmdline()]
        writer.suspend()  # takes the next message and does nothing with it yet
        client = threading.Thread(target=_send, args=(site.smtp_port, 1, replies))
        client.start()
        wait_for(lambda: any(site.spool.joinpath("queue", "tmp").iterdir()) or writer_has_input(writer),
                 what="the message handed to the writer")
        site.proc.kill()
        site.proc.wait(10)
        writer.resume()
        gone, alive = psutil.wait_procs([writer], timeout=10)
        assert gone and not alive
        client.join(30)
        assert isinstance(replies[1], smtplib.SMTPException)  # never told 250
        cat = Catalogue(site.spool)
        try:
            ids = [r[0] for r in cat.execute("SELECT message_id FROM messages")]
        finally:
            cat.close()
        assert "<pace-1@outside.test>" not in ids
    finally:
        site.stop()
    site.start()
    try:
        wait_for(lambda: not any(site.spool.joinpath("queue", "tmp").iterdir()), what="tmp/ cleared at start")
    finally:
        site.stop()


def writer_has_input(writer: psutil.Process) -> bool:
    """Bytes waiting in the writer's stdin pipe (the request it has not read)."""
    import fcntl
    import struct
    import termios
    try:
        with open(f"/proc/{writer.pid}/fd/0", "rb") as pipe:
            return struct.unpack("i", fcntl.ioctl(pipe.fileno(), termios.FIONREAD, b"\0" * 4))[0] > 0
    except OSError:
        return False


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


def test_without_a_writer_process_the_daemon_queues_on_a_thread_and_says_so(unrunnable_python, submission, caplog):
    """A daemon whose interpreter cannot be started again (its file not executable for the
    user it runs as) still takes mail: the same intake, on a thread."""
    server, unrunnable = submission, unrunnable_python
    replies: dict[int, object] = {}
    for n in range(3):
        _send(server.port, n, replies)
    assert replies == {0: {}, 1: {}, 2: {}}
    assert server.handler.writer.inline and server.handler.writer.proc is None
    assert {m.message_id for m in server.spool.queue.messages()} == {f"<pace-{n}@outside.test>" for n in range(3)}
    assert f"cannot start the queue's writer process ({unrunnable}: Permission denied): messages are queued " \
           "on a thread of the daemon instead" in caplog.text
