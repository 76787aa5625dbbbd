"""A stored message on the POP3 wire: CRLF line ends, dot-stuffing, the final ``.``.

Stored files are normally CRLF already (our local delivery writes CRLF) but Maildirs
written by others use bare LF, so every bare LF becomes CRLF.  A lone CR that is not
followed by LF is message content and passes through unchanged.  The encoder is fed
the file chunk by chunk, so a message is never held whole in memory; ``octets`` counts
what it produced before dot-stuffing, which is the size POP3 STAT/LIST report.
"""
from __future__ import annotations

import re
from typing import BinaryIO

CHUNK = 64 * 1024
TERMINATOR = b".\r\n"

_BARE_LF = re.compile(rb"(?<!\r)\n")


class MessageEncoder:
    """Feed stored bytes with ``encode(chunk)``, finish with ``end()``.

    ``body_lines`` (TOP) limits the output to the header, the blank line and that many
    body lines; once reached, ``done`` is true and further input is ignored.
    """

    def __init__(self, body_lines: int | None = None, stuff: bool = True, verbatim: bool = False):
        self.body_lines = body_lines
        self.stuff = stuff
        # The stored bytes are already the wire's (``scan`` said so, and no TOP limit):
        # pass them through, no CRLF check and no dot-stuffing pass per chunk.
        self.verbatim = verbatim and body_lines is None
        self.octets = 0  # produced so far, before dot-stuffing
        self.done = False
        self._last_in = b""  # last input byte: tells whether a leading LF ends a CRLF pair
        self._line_start = True  # the output so far ends a line (or is empty)
        self._partial = b""  # TOP only: the unfinished line carried to the next chunk
        self._in_body = False
        self._sent_body_lines = 0

    def encode(self, chunk: bytes) -> bytes:
        if self.done or not chunk:
            return b""
        if self.verbatim:
            self.octets += len(chunk)
            return chunk
        text = self._to_crlf(chunk)
        if self.body_lines is not None:
            text = self._limit(text)
        return self._emit(text)

    def end(self) -> bytes:
        """The rest of the message: a missing final line end, then the terminator."""
        if self.verbatim:
            self.done = True
            return TERMINATOR if self.stuff else b""
        tail = b""
        if self.body_lines is not None and self._partial and not self.done:
            tail, self._partial = self._partial, b""
        out = self._emit(tail)
        if not self._line_start:
            out += self._emit(b"\r\n")
        self.done = True
        return out + (TERMINATOR if self.stuff else b"")

    def _to_crlf(self, chunk: bytes) -> bytes:
        if chunk[:1] == b"\n":
            head = b"\n" if self._last_in == b"\r" else b"\r\n"
            text = head + _BARE_LF.sub(b"\r\n", chunk[1:])
        elif chunk.count(b"\n") == chunk.count(b"\r\n"):
            text = chunk  # CRLF throughout, as our own delivery stores it: no regex pass
        else:
            text = _BARE_LF.sub(b"\r\n", chunk)
        self._last_in = chunk[-1:]
        return text

    def _limit(self, text: bytes) -> bytes:
        """Keep the header, the blank line and ``body_lines`` lines of the body."""
        lines = (self._partial + text).split(b"\n")
        self._partial = lines.pop()  # after the last LF: unfinished
        kept = []
        for line in lines:
            line += b"\n"
            if self._in_body:
                if self._sent_body_lines >= self.body_lines:
                    self.done = True
                    break
                self._sent_body_lines += 1
            elif line == b"\r\n":
                self._in_body = True
            kept.append(line)
        if self._in_body and self._sent_body_lines >= self.body_lines:
            self.done = True
        if self.done:
            self._partial = b""
        return b"".join(kept)

    def _emit(self, text: bytes) -> bytes:
        if not text:
            return b""
        self.octets += len(text)
        if self.stuff:
            text = text.replace(b"\n.", b"\n..")
            if self._line_start and text[:1] == b".":
                text = b"." + text
        self._line_start = text[-1:] == b"\n"
        return text


def wire_octets(stream: BinaryIO, chunk: int = CHUNK) -> int:
    """The size of a stored message as POP3 sends it (CRLF, before dot-stuffing)."""
    return scan(stream, chunk)[0]


def scan(stream: BinaryIO, chunk: int = CHUNK) -> tuple[int, bool]:
    """(wire size as ``wire_octets``, verbatim): verbatim when the stored bytes are
    exactly what RETR sends before the terminator (CRLF throughout, ending in CRLF, no
    line that starts with a dot), as our own delivery nearly always stores them."""
    encoder = MessageEncoder()
    stored = sent = 0
    while data := stream.read(chunk):
        stored += len(data)
        sent += len(encoder.encode(data))
    sent += len(encoder.end()) - len(TERMINATOR)
    # Every change the encoder makes adds bytes (a CR, a dot, a final CRLF): the same
    # length means the same bytes.
    return encoder.octets, sent == stored
