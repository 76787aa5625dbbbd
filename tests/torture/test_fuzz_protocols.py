"""Fuzzing with hypothesis: POP3 dialogues against the sans-IO machine, the Hayes result
stream in arbitrary pieces, SMTP command sequences against the real submission server
(aiosmtpd with dialmail's handler, its spool on disk)."""
from __future__ import annotations

import asyncio
import base64
import re
import socket
import threading

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.pop3.protocol import Close, Session, State, Update
from modem.hayes import Info, Result, ResultParser
from tests.test_pop3_protocol import MAILDROP, Shell
from tests.torture import budget

# ------------------------------------------------------------------ POP3

POP3_WORDS = ["USER alice", "USER bob", "PASS pw", "PASS wrong", "PASS", "STAT", "LIST", "LIST 1", "LIST 2",
              "LIST 3", "LIST 0", "LIST -1", "LIST x", "RETR 1", "RETR 2", "RETR 9", "DELE 1", "DELE 2", "DELE 1",
              "DELE 7", "RSET", "TOP 1 0", "TOP 2 1", "TOP 1 -3", "TOP 1", "UIDL", "UIDL 2", "NOOP", "CAPA",
              "STLS", "AUTH", "AUTH PLAIN", "AUTH PLAIN " + base64.b64encode(b"\0alice\0pw").decode(),
              "AUTH PLAIN =", "AUTH PLAIN !!!", "*", "AUTH CRAM-MD5", "APOP alice 0123", "QUIT", "quit", "", " ",
              "user alice", "pass pw", "RETR 99999999999999999999", "DELE 1 2"]

pop3_command = st.one_of(st.sampled_from(POP3_WORDS),
                         st.text(max_size=40).filter(lambda t: "\n" not in t and "\r" not in t),
                         st.just("X" * 5000))


@settings(max_examples=budget.examples(300, 3000), deadline=None)
@given(st.lists(pop3_command, max_size=30), st.booleans(), st.booleans())
def test_pop3_any_dialogue_answers_every_line_and_deletes_only_at_quit(commands, tls, plaintext):
    shell = Shell(Session(tls_available=tls, plaintext_allowed=plaintext))
    marked: set[str] = set()
    quit_seen = False
    for cmd in commands:
        if shell.closed:
            break
        before = shell.session.state
        out = shell.say(cmd)
        word = cmd.split(" ")[0].upper() if cmd.strip() else ""
        if before is State.TRANSACTION and word == "DELE" and out.startswith(b"+OK"):
            marked.add(MAILDROP[int(cmd.split()[1]) - 1].uid)
        if before is State.TRANSACTION and word == "RSET" and out.startswith(b"+OK"):
            marked.clear()
        if before is State.TRANSACTION and word == "QUIT":
            quit_seen = True
        if out and before is not State.AUTH_PLAIN:
            assert out[:3] in (b"+OK", b"-ER", b"+ \r"), (cmd, out)
    # Deletions happen only through the UPDATE of a QUIT in TRANSACTION, exactly the marked ones.
    if quit_seen:
        assert len(shell.updates) == 1 and {m.uid for m in shell.updates[0].deleted} == marked
    else:
        assert shell.updates == []


@settings(max_examples=budget.examples(300, 3000), deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(1, 50), max_size=30))
def test_pop3_arbitrary_bytes_never_break_the_machine(data, cuts):
    session = Session()
    pos = 0
    for n in cuts + [len(data)]:
        session.receive_data(data[pos:pos + n])
        pos += n
        while (action := session.next_action()) is not None:
            assert not isinstance(action, Update)  # nobody logged in
            if isinstance(action, Close):
                break
    assert session.state in (State.AUTHORIZATION, State.AUTH_PLAIN, State.CHECKING, State.STARTING_TLS,
                             State.CLOSED)


# ------------------------------------------------------------------ Hayes result codes

RESULT_LINES = [b"OK", b"ERROR", b"RING", b"BUSY", b"NO CARRIER", b"NO DIALTONE", b"NO DIAL TONE", b"NO ANSWER",
                b"CONNECT", b"CONNECT 33600", b"CONNECT 33600/ARQ/V34/LAPM/V42BIS", b"CONNECT 2400/REL",
                b"CARRIER 28800", b"PROTOCOL: LAPM", b"COMPRESSION: V.42BIS", b"ATDT5550100", b"ATZ", b"0", b"1",
                b"2", b"3", b"4", b"5", b"6", b"7", b"8", b"10", b"19", b"99", b"DELAYED", b"BLACKLISTED",
                b"connect 9600", b"CONNECT\xff\xfe", b"\x00", b"+++", b"CONNECT 1200 garbage"]

hayes_stream = st.lists(st.tuples(st.one_of(st.sampled_from(RESULT_LINES), st.binary(max_size=20)),
                                  st.sampled_from([b"\r\n", b"\r", b"\n", b"\n\r", b"", b"\r\r\n"])),
                        max_size=20).map(lambda parts: b"".join(a + b for a, b in parts))


def parse_in_pieces(data: bytes, cuts: list[int]):
    p = ResultParser()
    events = []
    pos = 0
    for n in cuts:
        events += p.feed(data[pos:pos + n])
        pos += n
    events += p.feed(data[pos:])
    return events, p.online, bytes(p.trailing), p.pending


@settings(max_examples=budget.examples(500, 5000), deadline=None)
@given(hayes_stream, st.lists(st.integers(0, 12), max_size=40))
@example(b"CONNECT 33600\n\n", [2, 12])  # an LF after CONNECT's LF was eaten as framing when read at once
def test_hayes_stream_in_any_pieces_parses_the_same(data, cuts):
    whole = parse_in_pieces(data, [])
    pieces = parse_in_pieces(data, cuts)
    events, online, trailing, pending = whole
    assert all(isinstance(e, (Result, Info)) for e in events)
    # Stops at CONNECT: nothing after it is taken for a result code.
    if online:
        assert isinstance(events[-1], Result) and events[-1].code.name == "CONNECT"
    # How the modem's output was split into reads must not matter.
    assert pieces[:3] == whole[:3], (data, cuts)


# ------------------------------------------------------------------ SMTP

class SubmissionServer:
    """dialmail's real SMTP submission server (aiosmtpd + SubmissionHandler) in a thread."""

    def __init__(self, site):
        from gateway.config import load
        from gateway.daemon import Spool
        from gateway.smtp.server import SubmissionHandler, start_servers
        self.cfg = load(site.config_path)
        self.spool = Spool(self.cfg)
        self.handler = SubmissionHandler(self.cfg, self.spool.queue, self.spool.directory, self.spool.users)
        self.loop = asyncio.new_event_loop()
        self.servers = []
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.servers = self.loop.run_until_complete(start_servers(self.cfg, self.handler))
            ready.set()
            self.loop.run_forever()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)
        self.port = site.smtp_port

    def close(self):
        async def stop():
            for s in self.servers:
                s.close()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.spool.close()


@pytest.fixture(scope="module")
def smtp_server(tmp_path_factory):
    from tests.harness import Site
    site = Site(tmp_path_factory.mktemp("fuzz-smtp"))
    site.add_user("alice", "alice-pw")
    server = SubmissionServer(site)
    yield server
    server.close()


SMTP_WORDS = ["EHLO fuzz.test", "HELO fuzz.test", "EHLO", "MAIL FROM:<alice@office.test>", "MAIL FROM:<>",
              "MAIL FROM:<x@outside.test> SIZE=999999999999", "MAIL FROM:<x@outside.test> BODY=8BITMIME",
              "MAIL FROM:<x@outside.test> SMTPUTF8", "MAIL FROM:alice@office.test", "MAIL FROM:<<>>",
              "RCPT TO:<alice@office.test>", "RCPT TO:<nobody@office.test>", "RCPT TO:<x@elsewhere.test>",
              "RCPT TO:<>", "RCPT TO:<\"q@x\"@office.test>", "RCPT TO:<alice@office.test> NOTIFY=NEVER",
              "DATA", "RSET", "NOOP", "VRFY alice", "EXPN staff", "HELP", "STARTTLS", "AUTH PLAIN",
              "AUTH PLAIN " + base64.b64encode(b"\0alice\0alice-pw").decode(), "AUTH PLAIN AAAA", "AUTH LOGIN",
              "AUTH CRAM-MD5", "*", "BDAT 10 LAST", "ETRN office.test", "TURN", "X" * 2000, "MAIL", "RCPT",
              "MAIL FROM:<" + "a" * 300 + "@x.test>", "\x00", "EHLO \xff"]

smtp_body = st.one_of(st.binary(max_size=300), st.sampled_from([
    b"Subject: x\r\n\r\nbody", b"\n.\nMAIL FROM:<m@x>\r\n", b"\r.\r", b"..\r\n.x", b"\x00\x00", b""]))

smtp_step = st.one_of(st.sampled_from(SMTP_WORDS), st.text(max_size=30).filter(lambda t: not set(t) & set("\r\n")))

REPLY = re.compile(rb"^\d{3}[ -]")


@settings(max_examples=budget.examples(80, 800), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.tuples(smtp_step, smtp_body), max_size=14))
def test_smtp_any_command_sequence_gets_well_formed_replies_and_no_internal_error(smtp_server, steps):
    before = len(smtp_server.spool.queue.messages())
    queued = 0
    s = socket.create_connection(("127.0.0.1", smtp_server.port), timeout=10)
    f = s.makefile("rb")
    last = b""

    def reply() -> list[bytes]:
        lines = []
        while True:
            try:
                line = f.readline()
            except ConnectionResetError:
                line = b""
            if not line:
                return lines
            assert REPLY.match(line), line
            assert not line.startswith(b"500 Error: ("), line  # an exception inside the handler
            lines.append(line)
            if line[3:4] != b"-":
                return lines
    try:
        assert reply()[0].startswith(b"220")
        for cmd, body in steps:
            try:
                s.sendall(cmd.encode("utf-8", "surrogateescape") + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                lines = []
            else:
                lines = reply()
            if lines:
                last = lines[-1]
            # The server may hang up only after saying so (QUIT, too many errors or calls).
            closing = last[:3] in (b"221", b"421") or last.startswith(b"502 5.5.1 Too many")
            if not lines or closing:
                assert closing, (cmd, last)
                break
            if last.startswith(b"354"):
                s.sendall(body + b"\r\n.\r\n")
                lines = reply()
                if lines:
                    last = lines[-1]
                    queued += last.startswith(b"250")
        else:
            if steps and lines and last.startswith(b"334"):
                # The server waits for AUTH data: "*" cancels the exchange (RFC 4954).
                s.sendall(b"*\r\n")
                reply()
            s.sendall(b"NOOP\r\n")
            assert reply()[-1].startswith(b"250")
    finally:
        s.close()
    # A 250 after DATA is a message on disk; nothing else is.
    assert len(smtp_server.spool.queue.messages()) - before == queued
