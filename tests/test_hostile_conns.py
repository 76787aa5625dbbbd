"""Connections as a hostile client makes them, against the real daemon.

Outside clients connect from 127.0.0.2 (not in the test site's mynetworks) to the same
listening socket as the loopback admin on 127.0.0.1, so they share its accept queue.
"""
import logging
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time

import pytest

from gateway.daemon import AcceptFailures
from gateway.pop3.protocol import NOOP_LIMIT
from tests.harness import ROOT, Site, wait_for
from tests.peers import wait_port

pytestmark = pytest.mark.timeout(180)

OUTSIDE = "127.0.0.2"
SMTP_TOO_MANY = b"421 4.7.0 mail.office.test Error: too many connections, try again later\r\n"
POP3_TOO_MANY = b"-ERR [SYS/TEMP] too many connections, try again later\r\n"
SMTP_JUNK = b"421 4.7.0 mail.office.test Error: too many commands that move no mail, closing connection\r\n"
POP3_JUNK = b"-ERR [SYS/TEMP] Too many NOOP commands, closing connection\r\n"


def make_site(tmp_path, smtp: str = "", pop3: str = "") -> Site:
    """A site whose SMTP and POP3 listen on 127.0.0.1 only, with extra [smtp]/[pop3] keys."""
    site = Site(tmp_path)
    text = site.config_path.read_text()
    text = text.replace(f'listen = ["127.0.0.1:{site.smtp_port}", "127.0.0.2:{site.smtp_port}"]\n',
                        f'listen = ["127.0.0.1:{site.smtp_port}"]\n{smtp}\n')
    text = text.replace(f'listen = ["127.0.0.1:{site.pop3_port}"]\n', f'listen = ["127.0.0.1:{site.pop3_port}"]\n{pop3}\n')
    site.config_path.write_text(text)
    return site


def start_limited(site: Site, nofile: int) -> subprocess.Popen:
    """Start the site's daemon with its open file limit (soft and hard) at ``nofile``."""
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    with open(site.log_path, "ab") as log:
        site.proc = subprocess.Popen([sys.executable, "-m", "gateway", "-c", str(site.config_path), "run"],
                                     stdout=log, stderr=log, cwd=ROOT, preexec_fn=limit)
    wait_port("127.0.0.1", site.smtp_port, proc=site.proc)
    wait_port("127.0.0.1", site.pop3_port, proc=site.proc)
    return site.proc


def connect(port: int, source: str = OUTSIDE, timeout: float = 10) -> socket.socket:
    s = socket.socket()
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def read_line(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def read_all(s: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def flood(port: int, count: int, timeout: float = 30) -> list[socket.socket]:
    """``count`` idle connections from OUTSIDE, each connected (or refused) before this returns.

    Opened a hundred at a time (the listen backlog), so the kernel does not drop SYNs.
    """
    held: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    for start in range(0, count, 100):
        batch = []
        with selectors.DefaultSelector() as sel:
            for _ in range(min(100, count - start)):
                s = socket.socket()
                s.setblocking(False)
                s.bind((OUTSIDE, 0))
                s.connect_ex(("127.0.0.1", port))
                sel.register(s, selectors.EVENT_WRITE)
                batch.append(s)
            waiting = len(batch)
            while waiting:
                assert time.monotonic() < deadline, "the flood could not connect"
                for key, _ in sel.select(timeout=1):
                    sel.unregister(key.fileobj)
                    waiting -= 1
        held += batch
    return held


@pytest.fixture
def many_descriptors():
    """This test process holds thousands of client sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 5000:
        pytest.skip(f"needs an open file limit of 5000, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 10000)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_loopback_client_is_served_during_an_idle_flood_past_the_descriptor_limit(tmp_path, many_descriptors, figure):
    # Caps far above what 256 descriptors allow: the daemon has to fit them itself.
    site = make_site(tmp_path, smtp="max_connections = 1000\nmax_connections_per_client = 1000",
                     pop3="max_connections = 1000\nmax_connections_per_client = 1000")
    start_limited(site, 256)
    sockets: list[socket.socket] = []
    try:
        lines_before = len(site.log().splitlines())
        sockets += flood(site.smtp_port, 1000)
        sockets += flood(site.pop3_port, 1000)

        waits = []
        for port, greeting in ((site.smtp_port, b"220 mail.office.test"), (site.pop3_port, b"+OK dialmail")):
            started = time.monotonic()
            with connect(port, source="127.0.0.1", timeout=5) as admin:
                assert read_line(admin).startswith(greeting)
            waits.append(time.monotonic() - started)
        assert max(waits) < 1.0

        refused = [s for s in sockets[:1000] if _first_line(s) == SMTP_TOO_MANY]
        assert len(refused) > 500  # the cap, not the descriptor limit, turned them away
        assert [s for s in sockets[1000:] if _first_line(s) == POP3_TOO_MANY]
        flood_log = site.log().splitlines()[lines_before:]
        assert len(flood_log) < 100, "\n".join(flood_log[:20])
        figure("idle flood of 2,000 connections from 127.0.0.2, daemon limited to 256 descriptors",
               f"loopback client greeted in {max(waits) * 1000:.0f} ms (SMTP and POP3), "
               f"{len(flood_log)} log lines written during the flood")
        assert "out of system resource" not in site.log()
        assert "smtp.max_connections lowered from 1000 to 64, pop3.max_connections from 1000 to 64" in site.log()
    finally:
        for s in sockets:
            s.close()
        site.stop()


def _first_line(s: socket.socket) -> bytes:
    s.setblocking(True)
    s.settimeout(0.2)
    try:
        return read_line(s)
    except OSError:  # held idle by the daemon: no greeting refused, nothing to read yet is fine
        return b""


def test_connection_past_the_per_client_cap_is_refused(tmp_path):
    site = make_site(tmp_path, smtp="max_connections_per_client = 3", pop3="max_connections_per_client = 3")
    site.start()
    try:
        for port, greeting, refusal in ((site.smtp_port, b"220 ", SMTP_TOO_MANY),
                                        (site.pop3_port, b"+OK ", POP3_TOO_MANY)):
            held = [connect(port) for _ in range(3)]
            for s in held:
                assert read_line(s).startswith(greeting)
            with connect(port) as fourth:
                assert read_all(fourth) == refusal
            with connect(port, source="127.0.0.1") as other_client:
                assert read_line(other_client).startswith(greeting)
            held.pop().close()
            # the slot comes back once the daemon has seen the close
            again = wait_for(lambda: _greeted_or_none(port, greeting), what="a freed slot")
            again.close()
            for s in held:
                s.close()
    finally:
        site.stop()


def test_clients_in_mynetworks_are_held_only_by_the_total_cap(tmp_path):
    # Postfix exempts mynetworks from its per-client limits (smtpd_client_event_limit_exceptions):
    # a terminal server or a NAT inside the office is many people behind one address.
    site = make_site(tmp_path, smtp="max_connections_per_client = 3", pop3="max_connections_per_client = 3")
    site.start()
    try:
        for port, greeting in ((site.smtp_port, b"220 "), (site.pop3_port, b"+OK ")):
            held = [connect(port, source="127.0.0.1") for _ in range(6)]
            try:
                assert [read_line(s)[:len(greeting)] for s in held] == [greeting] * 6
            finally:
                for s in held:
                    s.close()
    finally:
        site.stop()


def _greeted_or_none(port: int, greeting: bytes):
    s = connect(port)
    if read_line(s).startswith(greeting):
        return s
    s.close()
    return None


def test_smtp_junk_commands_past_the_limit_end_the_connection(tmp_path):
    site = make_site(tmp_path)
    site.add_user("alice")
    site.start()
    try:
        with connect(site.smtp_port) as s:
            read_line(s)
            s.sendall(b"HELO outside.test\r\n" + b"NOOP\r\n" * 101)
            replies = read_all(s).split(b"\r\n")
        assert replies[0].startswith(b"250 ")
        assert replies[1:101] == [b"250 2.0.0 Ok"] * 100
        assert replies[101:] == [SMTP_JUNK.rstrip(b"\r\n"), b""]

        # A message sent starts the count again: a client that says RSET between messages
        # is not cut off in a long session.
        with connect(site.smtp_port) as s:
            read_line(s)
            message = (b"MAIL FROM:<x@outside.test>\r\nRCPT TO:<alice@office.test>\r\nDATA\r\n"
                       b"Subject: hi\r\n\r\nhello\r\n.\r\n")
            s.sendall(b"HELO outside.test\r\n" + b"RSET\r\n" * 60 + message + b"RSET\r\n" * 60 + b"QUIT\r\n")
            replies = read_all(s).split(b"\r\n")
        assert replies[-2].startswith(b"221 ")
        assert not [r for r in replies if r.startswith(b"421")]
    finally:
        site.stop()


def test_pop3_noops_past_the_limit_end_the_connection(tmp_path):
    site = make_site(tmp_path)
    site.add_user("alice", "alice-pw")
    site.start()
    try:
        with connect(site.pop3_port, source="127.0.0.1") as s:
            read_line(s)
            s.sendall(b"USER alice\r\nPASS alice-pw\r\n" + b"NOOP\r\n" * (NOOP_LIMIT + 1))
            replies = read_all(s).split(b"\r\n")
        assert replies[1].startswith(b"+OK Logged in")
        assert replies[2:2 + NOOP_LIMIT] == [b"+OK"] * NOOP_LIMIT
        assert replies[2 + NOOP_LIMIT:] == [POP3_JUNK.rstrip(b"\r\n"), b""]
    finally:
        site.stop()


def test_sigterm_with_fifty_open_connections_exits_quickly_and_keeps_every_accepted_message(tmp_path, figure):
    site = make_site(tmp_path, smtp="max_connections = 100\nmax_connections_per_client = 100")
    site.add_user("alice")
    for n in range(5):
        site.add_user(f"reader{n}")
    site.start()
    open_: list[socket.socket] = []
    accepted: list[bytes] = []
    try:
        def message(n: int) -> bytes:
            return f"Subject: message {n}\r\n\r\nbody of message {n}\r\n".encode()

        def begin(s: socket.socket, n: int) -> None:
            assert read_line(s).startswith(b"220 ")
            s.sendall(b"HELO outside.test\r\nMAIL FROM:<x@outside.test>\r\nRCPT TO:<alice@office.test>\r\nDATA\r\n")
            assert [read_line(s) for _ in range(4)][-1].startswith(b"354 ")

        for n in range(5):  # messages answered 250 on connections left open
            s = connect(site.smtp_port)
            begin(s, n)
            s.sendall(message(n) + b".\r\n")
            assert read_line(s).startswith(b"250 2.0.0 Ok: queued as ")
            accepted.append(f"message {n}".encode())
            open_.append(s)
        in_data = []
        for n in range(5, 15):  # in DATA, the message not finished
            s = connect(site.smtp_port)
            begin(s, n)
            s.sendall(message(n)[:20])
            in_data.append((n, s))
            open_.append(s)
        for _ in range(10):  # a transaction begun, then silence
            s = connect(site.smtp_port)
            read_line(s)
            s.sendall(b"HELO outside.test\r\nMAIL FROM:<x@outside.test>\r\n")
            open_.append(s)
        idle = []
        while len(open_) < 45:  # greeted, then silence
            s = connect(site.smtp_port)
            read_line(s)
            open_.append(s)
            idle.append(s)
        readers = []
        for n in range(5):  # POP3 clients logged in
            s = connect(site.pop3_port, source="127.0.0.1")
            read_line(s)
            s.sendall(f"USER reader{n}\r\nPASS secret\r\n".encode())
            read_line(s)
            assert read_line(s).startswith(b"+OK Logged in")
            open_.append(s)
            readers.append(s)
        assert len(open_) == 50

        started = time.monotonic()
        site.proc.send_signal(signal.SIGTERM)
        # one message in DATA is finished during the grace: it is answered and kept
        n, late = in_data[0]
        late.sendall(message(n)[20:] + b".\r\n")
        if read_line(late).startswith(b"250 "):
            accepted.append(f"message {n}".encode())
        site.proc.wait(timeout=30)
        took = time.monotonic() - started
        assert took < 10, f"the daemon took {took:.1f} s to exit after SIGTERM"
        figure("SIGTERM with 50 open connections (10 in DATA, 10 after MAIL FROM, 5 POP3)",
               f"exited in {took:.1f} s")
        site.proc = None
        for s in idle:
            assert read_all(s) == b"421 4.3.2 Service shutting down, try again later\r\n"
        for s in readers:
            assert read_all(s) == b"-ERR [SYS/TEMP] Server shutting down, try again later\r\n"
    finally:
        for s in open_:
            s.close()
        site.stop()

    site.start()
    try:
        wait_for(lambda: len(site.mail_of("alice")) >= len(accepted), what="delivery after the restart")
        delivered = site.mail_of("alice")
        for subject in accepted:
            assert [m for m in delivered if re.search(rb"Subject: " + subject + rb"\r?\n", m)], subject
    finally:
        site.stop()


def test_asyncio_accept_errors_are_logged_once_a_minute_with_a_count():
    """asyncio's own accept loop (any asyncio server in the daemon) logs a traceback per
    failed accept(); the daemon's filter lets one a minute through."""
    log = logging.getLogger("test.asyncio-accept")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)
    keep = Keep()
    log.addHandler(keep)
    log.propagate = False
    log.addFilter(AcceptFailures(every=60))
    try:
        for _ in range(1000):
            log.error("socket.accept() out of system resource\nsocket: <socket>")
        log.error("something else")
    finally:
        log.removeHandler(keep)
    assert [r.getMessage().splitlines()[0] for r in records] == [
        "socket.accept() out of system resource", "something else"]
