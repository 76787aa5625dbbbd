"""Local delivery runs in a process of its own (gateway/delivery/process.py): started by
the daemon, kicked by every local message, started again if it dies, stopped with the
daemon, and gone with a daemon killed outright; exactly once throughout."""
from __future__ import annotations

import signal
import smtplib

import psutil
import pytest

from tests.harness import Site, wait_for

pytestmark = pytest.mark.timeout(120)


def _delivery_process(site: Site) -> psutil.Process:
    def found():
        return [p for p in psutil.Process(site.proc.pid).children()
                if "gateway.delivery.process" in p.cmdline()]
    procs = wait_for(found, what="the local delivery process")
    assert len(procs) == 1
    return procs[0]


def _send(site: Site, n: int) -> None:
    with smtplib.SMTP("127.0.0.1", site.smtp_port, timeout=30) as s:
        s.sendmail("x@outside.test", ["alice@office.test"],
                   f"Subject: local {n}\r\nMessage-ID: <local-{n}@outside.test>\r\n\r\nhello {n}\r\n")


def _subjects(site: Site) -> list[bytes]:
    return sorted(line for m in site.mail_of("alice") for line in m.split(b"\r\n") if line.startswith(b"Subject:"))


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    s.add_user("alice", "alice-pw")
    s.start()
    yield s
    s.stop()


def test_a_killed_delivery_process_is_started_again_and_delivers_exactly_once(site):
    _send(site, 1)
    wait_for(lambda: len(site.mail_of("alice")) == 1, what="the first message delivered")
    first = _delivery_process(site)
    first.kill()
    first.wait(10)
    _send(site, 2)
    wait_for(lambda: len(site.mail_of("alice")) == 2, timeout=30, what="the second message, by a new process")
    assert _delivery_process(site).pid != first.pid
    assert "the local delivery process exited (killed by signal 9); starting it again" in site.log()
    assert _subjects(site) == [b"Subject: local 1", b"Subject: local 2"]


def test_the_delivery_process_stops_with_the_daemon_and_goes_with_a_killed_one(site):
    _send(site, 1)
    wait_for(lambda: len(site.mail_of("alice")) == 1, what="the message delivered")
    child = _delivery_process(site)
    assert site.stop() == 0
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    site.start()
    child = _delivery_process(site)
    site.proc.send_signal(signal.SIGKILL)
    site.proc.wait(10)
    gone, alive = psutil.wait_procs([child], timeout=10)
    assert gone and not alive


def test_without_a_delivery_process_the_daemon_delivers_on_a_thread_and_says_so(tmp_path, unrunnable_python, caplog):
    import asyncio

    from gateway.config import load
    from gateway.delivery.worker import DeliveryWorker, LocalDelivery
    from gateway.office.directory import Directory
    from spool.queue import LOCAL, Catalogue, Queue
    from spool.users import Users

    unrunnable = unrunnable_python
    s = Site(tmp_path)
    s.add_user("alice", "alice-pw")
    cfg = load(s.config_path)
    queue = Queue(Catalogue(cfg.spool_dir))

    async def scenario() -> None:
        worker = DeliveryWorker(LocalDelivery(cfg, queue, Directory(cfg, Users(cfg.spool_dir))))
        task = asyncio.create_task(worker.run())
        try:
            await asyncio.wait_for(worker.idle.wait(), 30)
            queue.enqueue("x@outside.test", [("alice@office.test", LOCAL)], b"Subject: by thread\r\n\r\nhi\r\n",
                          origin="smtp")
            worker.idle.clear()
            worker.kick()
            await asyncio.wait_for(worker.idle.wait(), 30)
        finally:
            await worker.stop()
            task.cancel()
    try:
        asyncio.run(scenario())
    finally:
        queue.cat.close()
    assert _subjects(s) == [b"Subject: by thread"]
    assert f"cannot start the local delivery process ({unrunnable}: Permission denied): delivering on a thread " \
           "of the daemon instead" in caplog.text
