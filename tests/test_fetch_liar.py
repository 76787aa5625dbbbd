"""A hostile or broken ISP IMAP server is that account's error, bounded in memory.

A tiny IMAP server in the test lies: it announces RFC822.SIZE 120 and then a 200 MB
literal, leaves RFC822.SIZE out, or answers for a UID nobody asked for.  The fetcher
must not read the lie into memory, must say what the server did, and must go on with
the next account (real Dovecot here).
"""
from __future__ import annotations

import socket
import threading
import tracemalloc

import pytest

from tests.test_fetch_dovecot import FetchSite, fill, message

pytestmark = [pytest.mark.timeout(120)]

HUGE = 200_000_000
STREAMED_AT_MOST = 20 * 1024 * 1024


class LyingIMAP:
    """One-connection-at-a-time IMAP server on 127.0.0.1 that lies in the way it is told."""

    def __init__(self, lie: str):
        self.lie = lie
        self.sent_of_literal = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self._talk(conn)
                except OSError:
                    pass

    def _talk(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        conn.sendall(b"* OK [CAPABILITY IMAP4rev1 UIDPLUS] liar ready\r\n")
        while line := f.readline():
            tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
            cmd = rest.upper()
            if cmd.startswith(b"LOGOUT"):
                conn.sendall(b"* BYE\r\n" + tag + b" OK\r\n")
                return
            if cmd.startswith(b"CAPABILITY"):
                conn.sendall(b"* CAPABILITY IMAP4rev1 UIDPLUS\r\n")
            elif cmd.startswith((b"SELECT", b"EXAMINE")):
                conn.sendall(b"* 1 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT 2] ok\r\n")
            elif cmd.startswith(b"UID SEARCH") or cmd.startswith(b"SEARCH"):
                conn.sendall(b"* SEARCH 1\r\n")
            elif cmd.startswith(b"UID FETCH") and b"RFC822.SIZE" in cmd:
                if self.lie == "no size":
                    conn.sendall(b"* 1 FETCH (UID 1 FLAGS ())\r\n")
                elif self.lie == "wrong uid":
                    conn.sendall(b"* 1 FETCH (UID 99 RFC822.SIZE 120)\r\n")
                else:
                    conn.sendall(b"* 1 FETCH (UID 1 RFC822.SIZE 120)\r\n")
            elif cmd.startswith(b"UID FETCH") and b"BODY" in cmd:
                conn.sendall(b"* 1 FETCH (UID 1 BODY[] {%d}\r\n" % HUGE)
                chunk = b"x" * 65536
                while self.sent_of_literal < STREAMED_AT_MOST:
                    conn.sendall(chunk)
                    self.sent_of_literal += len(chunk)
                return  # the lie ends with the connection
            conn.sendall(tag + b" OK done\r\n")


@pytest.fixture
def fs(tmp_path):
    s = FetchSite(tmp_path, users=("alice",))
    yield s
    s.site.stop()


@pytest.mark.parametrize("lie,said", [
    ("huge literal", "announced a literal of 200000000 bytes"),
    ("no size", "no valid RFC822.SIZE for UID 1"),
    # imapclient drops answers for UIDs not asked for: UID 1 looks expunged meanwhile
    ("wrong uid", None),
])
def test_a_lying_isp_server_is_that_accounts_error_and_the_next_account_is_fetched(fs, isp, lie, said):
    liar = LyingIMAP(lie)
    try:
        fill(isp, "office", [message(1)])
        fs.configure(fs.account("liar", liar.port, "office", deliver_to="alice"),
                     fs.account("honest", isp.imap_port, "office", deliver_to="alice"))
        tracemalloc.start()
        result = fs.fetch()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        liar.close()
    by = {a.account: a for a in result.accounts}
    if said is None:
        assert by["liar"].error is None and by["liar"].fetched == 0
    else:
        assert said in (by["liar"].error or ""), by["liar"].error
    assert by["honest"].error is None and by["honest"].fetched == 1  # the next account still went
    assert [m.split(b"Subject: ")[1].split(b"\r\n")[0] for m in fs.mail("alice")] == [b"message 1"]
    # nothing of the lie was read into memory (the liar pushes up to 20 MB of it): the
    # connection was dropped at the literal's announcement
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes traced while fetching"
