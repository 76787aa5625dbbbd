"""A message's header block: where it ends and what it says, read the same way everywhere.

The block ends at the first empty line, whether lines end in CRLF or in a bare LF (mail
from the ISP or a script may use either; a bare-LF message must not have its body taken
for headers).  It is read at most ``LIMIT`` bytes into the message, so a hostile message
without an empty line cannot make anything read it whole; what lies beyond the limit
counts as body.  SMTP reads the block once at DATA; the queue keeps Message-ID,
Subject and urgency from it; delivery, the relay and bounces read it from the spool file
through ``read``.
"""
from __future__ import annotations

from email.message import Message as Headers
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import BinaryIO

LIMIT = 256 * 1024

__all__ = ["LIMIT", "Headers", "split", "read", "parse", "of", "crlf"]


def split(data: bytes, limit: int = LIMIT) -> tuple[bytes, int]:
    """(the header block with its line ends, where the body starts, after the empty line).

    Without an empty line within ``limit`` the block is every whole line up to it, and the
    body starts right after that.
    """
    window = data[:limit]
    if window.startswith((b"\r\n", b"\n")):
        return b"", 2 if window.startswith(b"\r\n") else 1
    ends = [i for i in (window.find(b"\n\n"), window.find(b"\n\r\n")) if i >= 0]
    if ends:
        i = min(ends)
        return data[:i + 1], i + (2 if data[i + 1:i + 2] == b"\n" else 3)
    cut = window.rfind(b"\n") + 1 if len(data) > limit else len(window)
    return data[:cut], cut


def read(f: BinaryIO, limit: int = LIMIT) -> bytes:
    """The header block of the message in the open file ``f``, read from its start."""
    block = bytearray()
    while len(block) < limit:
        line = f.readline(limit - len(block))
        if not line or line in (b"\r\n", b"\n"):
            break
        block += line
    return bytes(block)


def parse(block: bytes) -> Headers:
    """The header block as a ``Message`` of headers (compat32: raw values, nothing refused).

    A block Python's parser cannot read gives an empty one: hostile headers must not stop
    delivery, and every caller treats a missing header as absent.
    """
    try:
        return BytesHeaderParser(policy=compat32).parsebytes(block)
    except Exception:  # noqa: BLE001 - any parser failure means "no headers we can use"
        return Headers()


def of(data: bytes) -> Headers:
    """The parsed headers of a whole message held in memory."""
    return parse(split(data)[0])


def crlf(block: bytes) -> bytes:
    """A header block with CRLF line ends (bare LF and bare CR lines alike), for quoting it."""
    return b"".join(line + b"\r\n" for line in block.splitlines())
