"""What the SMTP listener does once per listener instead of once per connection.

aiosmtpd's protocol ``__init__`` inspects the class and the handler on every connection;
dialmail builds one pattern protocol per listener and copies it.  These tests hold the
real server (aiosmtpd + SubmissionHandler on a real socket, in this process) to that,
and prove that the copies share no connection state: each has its own session,
envelope, command methods and AUTH.
"""
from __future__ import annotations

import asyncio
import base64
import inspect
import smtplib
import socket
import threading

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.harness import Site

pytestmark = pytest.mark.timeout(60)


class InProcessSubmission:
    """dialmail's SMTP listener on the site's port, on an event loop in a thread."""

    def __init__(self, site: Site):
        from gateway.config import load
        from gateway.daemon import Spool
        from gateway.smtp.server import SubmissionHandler, start_servers
        self.cfg = load(site.config_path)
        self.spool = Spool(self.cfg)
        handler = self.handler = SubmissionHandler(self.cfg, self.spool.queue, self.spool.directory, self.spool.users)
        self.loop = asyncio.new_event_loop()
        self.servers = []
        ready = threading.Event()

        failed: list[BaseException] = []

        def run():
            asyncio.set_event_loop(self.loop)
            try:
                self.servers = self.loop.run_until_complete(start_servers(self.cfg, handler))
            except BaseException as exc:  # noqa: BLE001 - reported by the test's thread below
                failed.append(exc)
                return
            finally:
                ready.set()
            self.loop.run_forever()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(30), "the listener did not start within 30 s"
        if failed:
            raise failed[0]
        self.port = site.smtp_port

    def close(self) -> None:
        if not self.thread.is_alive():
            return  # closed already
        async def stop():
            for s in self.servers:
                s.close()
            await self.handler.close()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.spool.close()


@pytest.fixture
def listener(tmp_path, monkeypatch):
    inspected = []
    real = inspect.getmembers

    def counting(obj, *args):
        inspected.append(type(obj).__name__)
        return real(obj, *args)
    monkeypatch.setattr(inspect, "getmembers", counting)  # the library call aiosmtpd makes per protocol
    site = Site(tmp_path)
    site.add_user("alice", "alice-pw")
    server = InProcessSubmission(site)
    server.inspected = inspected
    yield server
    server.close()


def test_the_handler_is_inspected_once_per_listener_not_per_connection(listener):
    for n in range(6):
        with smtplib.SMTP("127.0.0.1", listener.port, timeout=20) as s:
            s.login("alice", "alice-pw")  # AUTH PLAIN: the handler's mechanism
            s.sendmail("alice@office.test", ["alice@office.test"], f"Subject: {n}\r\n\r\nbody {n}\r\n")
    # aiosmtpd's __init__ looks at the protocol and at the handler: once, for the pattern
    assert sorted(listener.inspected) == ["SubmissionHandler", "SubmissionProtocol"]


def test_copied_protocols_share_no_connection_state(listener):
    def wire():
        sock = socket.create_connection(("127.0.0.1", listener.port), timeout=20)
        f = sock.makefile("rb")
        assert f.readline().startswith(b"220 ")
        return sock, f

    def say(conn, line: bytes) -> bytes:
        sock, f = conn
        sock.sendall(line + b"\r\n")
        reply = f.readline()
        while reply[3:4] == b"-":
            reply = f.readline()
        return reply

    a, b = wire(), wire()
    assert say(a, b"EHLO a.test").startswith(b"250 ")
    assert say(b, b"EHLO b.test").startswith(b"250 ")
    token = base64.b64encode(b"\0alice\0alice-pw")
    assert say(a, b"AUTH PLAIN " + token) == b"235 2.7.0 Authentication successful\r\n"
    assert say(a, b"MAIL FROM:<alice@office.test>") == b"250 2.1.0 Ok\r\n"
    # b is neither authenticated nor inside a transaction
    assert say(b, b"RCPT TO:<alice@office.test>") == b"503 5.5.1 Error: need MAIL command\r\n"
    assert say(b, b"AUTH PLAIN " + token) == b"235 2.7.0 Authentication successful\r\n"
    assert say(a, b"AUTH PLAIN " + token) == b"503 5.5.1 Already authenticated\r\n"
    assert say(b, b"HELP NOOP") == b"214 2.0.0 Syntax: NOOP [ignored]\r\n"
    assert say(a, b"QUIT") == b"221 2.0.0 Bye\r\n"
    assert say(b, b"MAIL FROM:<alice@office.test>") == b"250 2.1.0 Ok\r\n"
    assert say(b, b"QUIT") == b"221 2.0.0 Bye\r\n"
    for sock, f in (a, b):
        f.close()
        sock.close()


# ------------------------------------------------------------------ paths

PATH_CHARS = "ab.Z09-_+=@<> ()\t\"'%!/[]:;,\\é"


def aiosmtpd_reads(arg: str):
    from aiosmtpd.smtp import SMTP

    class Plain:
        local_part_limit = 0
    return SMTP._getaddr(Plain(), arg)


def ours_reads(arg: str):
    from gateway.smtp.server import SubmissionProtocol
    proto = object.__new__(SubmissionProtocol)
    return proto._getaddr(arg)


@settings(max_examples=3000, deadline=None)
@given(st.one_of(
    st.text(alphabet=PATH_CHARS, max_size=40),
    st.builds(lambda local, domain, rest: f"<{local}@{domain}>{rest}",
              st.text(alphabet="ab.Z09-_+=%!'/é", min_size=1, max_size=12),
              st.text(alphabet="ab.Z09-[]é", min_size=1, max_size=12),
              st.text(alphabet=" \tSIZE=10(x)\"BODY", max_size=12))))
@example("<alice@office.test>")
@example("<alice@office.test> SIZE=2048 BODY=8BITMIME")
@example("<a@b.c> (comment) SIZE=1")
@example("<a@b.c>\tSIZE=1")
@example("<a@b.c.>")
@example("<a..b@c>")
@example("<a@b..c>")
def test_a_path_reads_as_aiosmtpd_reads_it(arg):
    assert outcome(ours_reads, arg) == outcome(aiosmtpd_reads, arg)


def outcome(read, arg: str):
    """The reading, or the exception it ends in (the header parser has its own: the same)."""
    try:
        return read(arg)
    except Exception as exc:
        return type(exc)


def test_a_plain_path_skips_the_header_parser(listener, monkeypatch):
    import aiosmtpd.smtp
    parsed = []
    real = aiosmtpd.smtp.get_angle_addr

    def counting(value):
        parsed.append(value)
        return real(value)
    monkeypatch.setattr(aiosmtpd.smtp, "get_angle_addr", counting)
    with smtplib.SMTP("127.0.0.1", listener.port, timeout=20) as s:
        s.sendmail("alice@office.test", ["alice@office.test"], "Subject: plain\r\n\r\nbody\r\n")
        assert s.docmd("MAIL FROM:<alice@office.test> (a comment)") == (250, b"2.1.0 Ok")
    assert parsed == ["<alice@office.test> (a comment)"]  # only the one the quick reading leaves alone


def test_a_small_message_never_crosses_to_a_thread(listener, monkeypatch):
    """A message smaller than DATA's buffer stays in memory to its dot, its header block
    is parsed there, and the queue's writer process writes, fsyncs and commits it (with
    whatever else reached its dot meanwhile).  Free space at MAIL is a statvfs of
    counters in memory: no hop either."""
    hops = []
    real = asyncio.to_thread

    def counting(func, *args, **kwargs):
        hops.append(getattr(func, "__qualname__", repr(func)))
        return real(func, *args, **kwargs)
    monkeypatch.setattr(asyncio, "to_thread", counting)
    with smtplib.SMTP("127.0.0.1", listener.port, timeout=20) as s:
        s.sendmail("alice@office.test", ["alice@office.test"], "Subject: hops\r\n\r\n" + "body\r\n" * 300)
    assert hops == []
    assert listener.handler.writer.batches == 1
    assert listener.spool.queue.cat.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 1


def test_the_data_timer_is_not_pushed_back_for_every_line(listener, monkeypatch):
    """Each line of DATA only notes the time; the silence limit itself is
    tests/test_hostile_data.py's (a steady client never cut, a silent one cut)."""
    moved = []
    real = asyncio.Timeout.reschedule

    def counting(self, when):
        moved.append(when)
        return real(self, when)
    monkeypatch.setattr(asyncio.Timeout, "reschedule", counting)
    with smtplib.SMTP("127.0.0.1", listener.port, timeout=20) as s:
        s.sendmail("alice@office.test", ["alice@office.test"], "Subject: lines\r\n\r\n" + "line\r\n" * 300)
    assert len(moved) <= 2, f"{len(moved)} timer moves for one message"
