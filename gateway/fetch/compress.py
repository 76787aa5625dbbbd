"""IMAP COMPRESS=DEFLATE (RFC 4978) on an imapclient connection, and the count of wire bytes.

Neither imapclient nor imaplib knows COMPRESS.  After the server's OK to ``COMPRESS
DEFLATE`` both directions are raw deflate (RFC 1951: no zlib header, ``wbits=-15``) for
the rest of the connection, inside TLS: compression has to happen before encryption,
which is also why the modem's V.42bis can do nothing for TLS traffic.

imaplib reads and writes only through three public methods of its connection object,
``read(size)``, ``readline()`` and ``send(data)``, from Python 3.11 to 3.14 alike; 3.14
buffers reads itself and made ``file`` read-only, so neither that nor any buffer of
imaplib is touched here.  ``WireStream`` replaces the three methods on the instance and
speaks to ``sock`` (the TLS socket where there is TLS), which every version keeps.
Switching is safe only while imaplib holds nothing unread: right after the tagged OK,
before the next command, the server has nothing more to say.

The deflate stream is flushed (``Z_SYNC_FLUSH``) whenever a write ends a line: every
command, and every continuation, ends with CRLF before the client waits for an answer,
so the server always has the whole of what it must answer; the pieces of a command
written before its CRLF go out together with it.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

CAPABILITY = "COMPRESS=DEFLATE"

RECV_SIZE = 64 * 1024
PLAIN_PIECE = 256 * 1024  # at most this much inflated per step: a small bomb cannot fill memory
MAX_LINE = 1_000_000      # imaplib's own limit for a line that is not a literal


@dataclass
class WireCount:
    """Bytes of the IMAP conversation as they crossed the connection (compressed when it
    was), below TLS's framing: what the line carried for this account, minus TLS."""
    down: int = 0
    up: int = 0
    compressed: bool = False


class WireStream:
    """Reads and writes of one imaplib connection, counted and, once ``deflate()`` is called,
    compressed.  Installed on the instance: ``imap.read``/``readline``/``send`` become ours."""

    def __init__(self, imap, count: WireCount):
        self.imap = imap
        self.count = count
        self._read, self._readline, self._send = imap.read, imap.readline, imap.send
        imap.read, imap.readline, imap.send = self.read, self.readline, self.send
        self.inflater = None  # zlib decompress/compress objects once deflate() is called
        self.deflater = None
        self.plain = bytearray()  # inflated, not yet handed to imaplib

    # ------------------------------------------------------------ switching

    def deflate(self) -> None:
        """From now on both directions are raw deflate (call right after the OK to COMPRESS)."""
        self.inflater = zlib.decompressobj(wbits=-15)
        self.deflater = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
        self.count.compressed = True

    # ------------------------------------------------------------ imaplib's three methods

    def read(self, size: int) -> bytes:
        if self.inflater is None:
            data = self._read(size)
            self.count.down += len(data)
            return data
        while len(self.plain) < size and self._inflate_more():
            pass
        data = bytes(self.plain[:size])
        del self.plain[:size]
        return data  # short only at the end of the stream, as imaplib's own read

    def readline(self) -> bytes:
        if self.inflater is None:
            line = self._readline()
            self.count.down += len(line)
            return line
        start = 0
        while (end := self.plain.find(b"\n", start)) < 0:
            if len(self.plain) > MAX_LINE:
                raise self.imap.error(f"got more than {MAX_LINE} bytes")
            start = len(self.plain)
            if not self._inflate_more():
                end = len(self.plain) - 1  # the end of the stream: imaplib sees the short line
                break
        line = bytes(self.plain[:end + 1])
        del self.plain[:end + 1]
        return line

    def send(self, data: bytes) -> None:
        if self.deflater is None:
            self._send(data)
            self.count.up += len(data)
            return
        out = self.deflater.compress(data)
        if data.endswith(b"\n"):
            out += self.deflater.flush(zlib.Z_SYNC_FLUSH)
        if out:
            self.imap.sock.sendall(out)
            self.count.up += len(out)

    # ------------------------------------------------------------ inflating

    def _inflate_more(self) -> bool:
        """Add inflated bytes to ``plain``; False at the end of the stream."""
        inflater = self.inflater
        while True:
            if inflater.unconsumed_tail:
                raw = inflater.unconsumed_tail
            else:
                raw = self.imap.sock.recv(RECV_SIZE)
                if not raw:
                    return False
                self.count.down += len(raw)
            try:
                plain = inflater.decompress(raw, PLAIN_PIECE)
            except zlib.error as exc:
                # The stream is out of step for good: nothing more on this connection can be read.
                raise self.imap.abort(f"the server's compressed stream is corrupt: {exc}") from None
            if plain:
                self.plain += plain
                return True
            if inflater.eof:  # the server ended its deflate stream: nothing can follow
                return False


def deflate(client, count: WireCount) -> WireStream:
    """Count ``client``'s traffic from now on, and compress it when the server offers
    COMPRESS=DEFLATE and agrees to it (a NO leaves the connection as it was)."""
    imap = client._imap  # imapclient's imaplib connection: the only way to its reads and writes
    stream = WireStream(imap, count)
    if client.has_capability(CAPABILITY):
        typ, _ = imap.xatom("COMPRESS", "DEFLATE")
        if typ == "OK":
            stream.deflate()
    return stream


def count_only(client, count: WireCount) -> WireStream:
    """Count ``client``'s traffic from now on without asking for compression."""
    return WireStream(client._imap, count)
