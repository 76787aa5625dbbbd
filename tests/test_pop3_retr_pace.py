"""RETR without a worker-thread hop when the message is in the page cache, and the same
bytes on the wire when it is not (read in a worker thread then)."""
from __future__ import annotations

import asyncio
import os

from gateway.config import loads
from gateway.pop3.server import POP3Server
from gateway.pop3.wire import CHUNK
from spool.maildir import Maildir, mailbox_path
from spool.users import Users

SMALL = b"Subject: small\r\n\r\n.leading dot\r\nbody\r\n"
BIG = b"Subject: big\r\n\r\n" + b"".join(b"%078d\r\n" % i for i in range(2 * CHUNK // 80 + 7))


def _serve(tmp_path):
    config = loads(f"""
[server]
hostname = "mail.office.test"
domains = ["office.test"]
spool_dir = "{tmp_path}"

[pop3]
listen = ["127.0.0.1:0"]
""")
    users = Users(tmp_path)
    users.add("alice", "alice-retr-pw")
    box = Maildir(mailbox_path(tmp_path, "alice")).create()
    box.deliver(SMALL, "1700000001.Qa.host")
    box.deliver(BIG, "1700000002.Qb.host")
    return config, users


def _evict(tmp_path) -> None:
    """As after a reboot or under memory pressure: the messages are on disk only."""
    for path in Maildir(mailbox_path(tmp_path, "alice")).messages():
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def _retrieve(config, users, hops: list[str], evict=None) -> bytes:
    real_to_thread = asyncio.to_thread

    async def counting_to_thread(func, *args, **kwargs):
        hops.append(getattr(func, "__name__", repr(func)))
        return await real_to_thread(func, *args, **kwargs)

    async def dialogue() -> bytes:
        server = POP3Server(config, users)
        await server.start()
        port = server.listeners[0].sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.readline()
            writer.write(b"USER alice\r\nPASS alice-retr-pw\r\n")
            await reader.readline()
            await reader.readline()
            if evict is not None:
                evict(config.spool_dir)
            asyncio.to_thread = counting_to_thread  # from here on: the RETRs only
            try:
                writer.write(b"RETR 1\r\nRETR 2\r\nQUIT\r\n")
                async with asyncio.timeout(20):
                    out = await reader.read()
            finally:
                asyncio.to_thread = real_to_thread
            writer.close()
            return out
        finally:
            await server.stop()
    return asyncio.run(dialogue())


def _expected() -> bytes:
    return (b"+OK %d octets\r\n" % len(SMALL) + SMALL.replace(b"\r\n.", b"\r\n..") + b".\r\n"
            + b"+OK %d octets\r\n" % len(BIG) + BIG + b".\r\n"
            + b"+OK dialmail POP3 server signing off (0 deleted, 2 left)\r\n")


def test_retr_of_cached_messages_takes_no_worker_thread_hop(tmp_path):
    config, users = _serve(tmp_path)
    hops: list[str] = []
    assert _retrieve(config, users, hops) == _expected()
    assert hops == ["remove"]  # QUIT's UPDATE only


def test_retr_of_messages_not_in_the_page_cache_sends_the_same_bytes(tmp_path):
    config, users = _serve(tmp_path)
    hops: list[str] = []
    assert _retrieve(config, users, hops, evict=_evict) == _expected()
    # Read in a worker thread: the event loop never waited for the disk.
    assert "_open_and_read" in hops
