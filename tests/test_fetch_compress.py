"""IMAP COMPRESS=DEFLATE: the stream on its own, then fetching from a Dovecot that offers it."""
from __future__ import annotations

import base64
import imaplib
import random
import re
import socket
import zlib

import pytest

from gateway.fetch.compress import MAX_LINE, WireCount, WireStream
from tests.test_connect_now_cli import smarthost
from tests.test_fetch_dovecot import (
    ISP_PASSWORD,
    CuttingProxy,
    FetchSite,
    fill,
    message,
)

SYNC = b"\x00\x00\xff\xff"  # what a sync flush ends with (RFC 1951 empty stored block)


class Connection:
    """What imaplib's connection offers WireStream: read, readline, send, sock and its errors."""
    error = imaplib.IMAP4.error
    abort = imaplib.IMAP4.abort

    def __init__(self, sock):
        self.sock = sock
        self.file = sock.makefile("rb")

    def read(self, size):
        return self.file.read(size)

    def readline(self):
        return self.file.readline()

    def send(self, data):
        self.sock.sendall(data)


@pytest.fixture
def pair():
    ours, server = socket.socketpair()
    ours.settimeout(5)
    server.settimeout(5)
    yield ours, server
    ours.close()
    server.close()


def test_writes_are_raw_deflate_flushed_at_the_end_of_each_line(pair):
    ours, server = pair
    count = WireCount()
    conn = Connection(ours)
    stream = WireStream(conn, count)
    stream.deflate()
    conn.send(b"a1 UID FETCH 1:* (BODY.PEEK[])")   # imapclient writes a command in pieces
    conn.send(b"\r\n")
    wire = server.recv(65536)
    assert wire.endswith(SYNC)
    assert zlib.decompressobj(wbits=-15).decompress(wire) == b"a1 UID FETCH 1:* (BODY.PEEK[])\r\n"
    assert count.up == len(wire) and count.compressed


def test_a_piece_without_line_end_waits_for_the_rest_of_the_command(pair):
    ours, server = pair
    conn = Connection(ours)
    WireStream(conn, WireCount()).deflate()
    conn.send(b"a2 NOOP")
    server.setblocking(False)
    with pytest.raises(BlockingIOError):
        server.recv(65536)  # nothing yet: the server could not act on half a command


def test_reads_inflate_lines_and_literals_whatever_the_pieces(pair):
    ours, server = pair
    count = WireCount()
    conn = Connection(ours)
    WireStream(conn, count).deflate()
    literal = base64.b64encode(random.Random(1).randbytes(6_000)) + b"\r\n"  # fits the socket buffer
    plain = (b"* 1 FETCH (UID 7 BODY[] {%d}\r\n" % len(literal)) + literal + b")\r\na1 OK done\r\n"
    deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
    wire = deflater.compress(plain) + deflater.flush(zlib.Z_SYNC_FLUSH)
    for i in range(0, len(wire), 777):  # the server's writes arrive in odd pieces
        server.sendall(wire[i:i + 777])
    assert conn.readline() == b"* 1 FETCH (UID 7 BODY[] {%d}\r\n" % len(literal)
    assert conn.read(len(literal)) == literal
    assert conn.readline() == b")\r\n"
    assert conn.readline() == b"a1 OK done\r\n"
    assert count.down == len(wire)


def test_a_corrupt_stream_is_the_servers_error(pair):
    ours, server = pair
    conn = Connection(ours)
    WireStream(conn, WireCount()).deflate()
    server.sendall(b"\xff" * 64)
    with pytest.raises(imaplib.IMAP4.abort, match="compressed stream is corrupt"):
        conn.readline()


def test_a_line_that_inflates_without_end_stops_at_the_line_limit(pair):
    ours, server = pair
    conn = Connection(ours)
    WireStream(conn, WireCount()).deflate()
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    server.sendall(deflater.compress(b"x" * (4 * MAX_LINE)) + deflater.flush(zlib.Z_SYNC_FLUSH))  # 4 kB on the wire
    with pytest.raises(imaplib.IMAP4.error, match="got more than"):
        conn.readline()


def test_the_end_of_the_stream_gives_a_short_line_as_imaplib_does(pair):
    ours, server = pair
    conn = Connection(ours)
    WireStream(conn, WireCount()).deflate()
    deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
    server.sendall(deflater.compress(b"* BYE") + deflater.flush(zlib.Z_SYNC_FLUSH))
    server.shutdown(socket.SHUT_WR)
    assert conn.readline() == b"* BYE"
    assert conn.readline() == b""


def test_without_deflate_the_stream_only_counts(pair):
    ours, server = pair
    count = WireCount()
    conn = Connection(ours)
    WireStream(conn, count)
    conn.send(b"a1 NOOP\r\n")
    assert server.recv(100) == b"a1 NOOP\r\n"
    server.sendall(b"a1 OK\r\n{3}\r\nabc")
    assert conn.readline() == b"a1 OK\r\n"
    assert conn.readline() == b"{3}\r\n" and conn.read(3) == b"abc"
    assert (count.up, count.down, count.compressed) == (9, 15, False)


# ---------------------------------------------------------------- against Dovecot with imap_zlib


def text_mail(n: int, size: int) -> bytes:
    """A reply with quotes: text as offices write it, which deflate shrinks a lot."""
    rnd = random.Random(n)
    words = ("thanks", "invoice", "meeting", "tomorrow", "please", "attached", "the", "order", "we", "will",
             "confirm", "delivery", "Monday", "regards", "price", "quote", "as", "discussed")
    lines = []
    while sum(len(x) for x in lines) < size:
        line = " ".join(rnd.choice(words) for _ in range(rnd.randint(6, 12)))
        lines.append(("> " if rnd.random() < 0.4 else "") + line + "\r\n")
    return message(n, subject=f"re: order {n}") + "".join(lines).encode()


def attachment_mail(n: int, size: int) -> bytes:
    """Base64 of random bytes: about 3/4 of it survives deflate (the alphabet's 6 bits of 8)."""
    raw = random.Random(n).randbytes(size * 3 // 4)
    b64 = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    return message(n, subject=f"scan {n}") + b64


@pytest.fixture
def fs(tmp_path):
    s = FetchSite(tmp_path)
    yield s
    s.site.stop()


@pytest.fixture
def isp(dovecot_zlib):
    dovecot_zlib.add_user("office", ISP_PASSWORD)
    return dovecot_zlib


@pytest.mark.parametrize("tls", ["off", "starttls"])
def test_fetch_uses_compress_when_offered_and_moves_less_than_the_mail(fs, isp, tls):
    msgs = [text_mail(i, 20_000) for i in range(8)]
    fill(isp, "office", msgs)
    fs.configure(fs.account("isp", isp.imap_port, "office", deliver_to="alice", tls=tls,
                            ca_file=str(isp.cert), batch_size=3))
    result = fs.fetch()
    assert result.errors == [] and result.fetched == 8
    assert sorted(fs.mail("alice")) == sorted(msgs)
    wire = result.accounts[0].wire
    assert wire.compressed
    assert wire.down < 0.4 * result.bytes, (wire.down, result.bytes)
    assert isp.message_count("office") == 0


def test_compress_off_moves_the_mail_as_it_is(fs, isp):
    msgs = [text_mail(i, 20_000) for i in range(4)]
    fill(isp, "office", msgs)
    fs.configure(fs.account("isp", isp.imap_port, "office", deliver_to="alice", compress="off"))
    result = fs.fetch()
    assert result.errors == [] and result.fetched == 4
    wire = result.accounts[0].wire
    assert not wire.compressed
    assert result.bytes < wire.down < result.bytes + 4000


def test_compress_auto_without_the_capability_fetches_uncompressed(fs, dovecot):
    dovecot.add_user("office", ISP_PASSWORD)
    msgs = [text_mail(i, 5_000) for i in range(3)]
    fill(dovecot, "office", msgs)
    fs.configure(fs.account("isp", dovecot.imap_port, "office", deliver_to="alice"))
    result = fs.fetch()
    assert result.errors == [] and sorted(fs.mail("alice")) == sorted(msgs)
    assert not result.accounts[0].wire.compressed


def test_cut_in_a_compressed_literal_resumes_where_it_stopped(fs, isp):
    big = attachment_mail(1, 2_000_000)
    fill(isp, "office", [big])
    proxy = CuttingProxy(isp.imap_port)
    try:
        fs.configure(fs.account("isp", proxy.port, "office", deliver_to="alice", chunk_size="64KB"))
        proxy.limit = 900_000  # compressed bytes from the server: in the middle of a piece's literal
        first = fs.fetch()
        assert first.fetched == 0 and "connection lost" in first.errors[0]
        assert first.accounts[0].wire.compressed
        partial_dir = fs.config.spool_dir / "fetch-partial"
        kept = sum(p.stat().st_size for p in partial_dir.iterdir())
        assert kept % 64_000 == 0 and 900_000 < kept < 1_300_000, kept  # whole pieces only, as uncompressed
        proxy.limit = None
        events = []
        second = fs.fetch(progress=events.append)
        assert second.fetched == 1 and second.errors == []
        assert events[0].partial and events[0].done_bytes == kept + 64_000
        assert fs.mail("alice") == [big]
        assert list(partial_dir.iterdir()) == [] and isp.message_count("office") == 0
    finally:
        proxy.close()


@pytest.mark.timeout(240)
def test_compressed_fetch_cut_again_and_again_loses_nothing_and_duplicates_nothing(fs, isp):
    rnd = random.Random(9)
    msgs = [rnd.choice([text_mail, attachment_mail])(i, rnd.choice([600, 4000, 30_000])) for i in range(20)]
    msgs.append(attachment_mail(99, 300_000))
    fill(isp, "office", msgs)
    proxy = CuttingProxy(isp.imap_port)
    try:
        fs.configure(fs.account("isp", proxy.port, "office", deliver_to="alice", batch_size=4,
                                chunk_size="64KB"))
        runs = cuts = 0
        limit = 300
        while True:
            proxy.limit = limit
            result = fs.fetch()
            runs += 1
            cuts += bool(result.errors)
            delivered = fs.mail("alice")
            on_server = isp.message_count("office")
            assert len(delivered) == len(set(delivered))
            assert len(delivered) + on_server >= len(msgs), (limit, len(delivered), on_server)
            if on_server == 0 and not result.errors:
                break
            limit = int(limit * rnd.uniform(1.3, 2.0))
            if limit > 2_000_000:
                proxy.limit = None
            assert runs < 50
        assert cuts >= 4
        assert sorted(delivered) == sorted(msgs)
        assert fs.queued() == 0
    finally:
        proxy.close()


@pytest.mark.timeout(120)
def test_log_and_status_show_what_the_fetch_moved_per_byte_of_mail(site, isp, smtp_sink):
    msgs = [text_mail(i, 30_000) for i in range(5)]
    fill(isp, "office", msgs)
    site.write_config(smarthost(smtp_sink.port)
                      + site.fetch_account(isp.imap_port, "office", ISP_PASSWORD, deliver_to='"alice"'))
    r = site.cli("connect-now", timeout=90)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    log = site.cli("log").stdout.decode()
    ratio = float(re.search(r" 5 +(0\.\d\d) ", log).group(1))
    assert 0.05 < ratio < 0.4, log
    status = site.cli("status").stdout.decode()
    assert f"fetched 5 (the fetch moved {ratio:.2f} x the mail's bytes)" in status, status
