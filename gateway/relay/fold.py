"""Lines too long for SMTP, folded on the way to the smarthost (Postfix's smtp_line_length_limit).

SMTP submission takes lines longer than RFC 5321's 1,000 octets (copiers' scan-to-mail and
scripts' HTML mail send them, and refusing them loses the mail), but a smarthost may
refuse or cut them.  So, as Postfix does, every line over ``LIMIT`` octets is broken:
* in the body by inserting CRLF + SPACE every ``LIMIT`` octets (what Postfix inserts; the
  reader of an HTML or base64 body does not mind the extra space);
* in the header block at the last whitespace that fits, so unfolding (RFC 5322 2.2.3)
  gives back the header exactly; a header with no whitespace to fold at is broken like
  a body line.
Line ends are counted the way aiosmtplib sends them: CRLF, bare LF and bare CR alike.
A message with no long line is returned as it is, without a copy.
"""
from __future__ import annotations

import re

from gateway.mail import headers

LIMIT = 998  # octets per line, without the CRLF (RFC 5321 4.5.3.1.6)

_LONG_LINE = re.compile(rb"[^\r\n]{%d}" % (LIMIT + 1))
_LINE_END = re.compile(rb"(\r\n|\n|\r(?!\n))")
_WHITESPACE = re.compile(rb"[ \t]")


def long_lines(message: bytes, limit: int = LIMIT) -> bytes:
    """``message`` with no line longer than ``limit`` octets."""
    if not _LONG_LINE.search(message):
        return message
    _block, body_start = headers.split(message)
    return _fold(message[:body_start], _header_line, limit) + _fold(message[body_start:], _body_line, limit)


def _fold(text: bytes, fold_line, limit: int) -> bytes:
    if len(text) <= limit or not _LONG_LINE.search(text):
        return text
    parts = _LINE_END.split(text)  # line, end, line, end, ..., last line
    for i in range(0, len(parts), 2):
        if len(parts[i]) > limit:
            parts[i] = fold_line(parts[i], limit)
    return b"".join(parts)


def _body_line(line: bytes, limit: int) -> bytes:
    out = [line[:limit]]
    rest = line[limit:]
    while rest:
        out.append(b" " + rest[:limit - 1])
        rest = rest[limit - 1:]
    return b"\r\n".join(out)


def _header_line(line: bytes, limit: int) -> bytes:
    out = []
    while len(line) > limit:
        # the last whitespace that keeps this piece within the limit, and not the one a
        # continuation line starts with (folding there would leave an empty line)
        cut = max((m.start() for m in _WHITESPACE.finditer(line, 1, limit + 1)), default=0)
        if cut == 0:
            out.append(line[:limit])
            line = b" " + line[limit:]
            continue
        out.append(line[:cut])
        line = line[cut:]
    out.append(line)
    return b"\r\n".join(out)
