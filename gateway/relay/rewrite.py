"""Outgoing sender rewriting (what Postfix's ``smtp_generic_maps`` does).

An office's LAN addresses (``alice@office.lan``) mean nothing outside and many ISPs
refuse them, so on the way to the smarthost the envelope sender and the From,
Reply-To and Sender headers are mapped to the ISP account's address.  Only the relay
calls this: mail that stays on the LAN is never rewritten.

The map comes from ``[smarthost.rewrite]``: a full local address, or ``@domain`` for
every address in that domain, to one outside address; the full address wins.  Only the
header block is touched; the body passes through as bytes.
"""
from __future__ import annotations

import re
from email.utils import getaddresses

from gateway.mail import address, headers

HEADERS = (b"from", b"reply-to", b"sender")


class SenderRewriter:
    def __init__(self, rules: tuple[tuple[str, str], ...] | list[tuple[str, str]]):
        self.exact: dict[str, str] = {}
        self.domains: dict[str, str] = {}
        for local, outside in rules:
            local = local.strip().lower()
            if local.startswith("@"):
                self.domains[local[1:].rstrip(".")] = outside
            else:
                self.exact[address.normalise(local).lower()] = outside

    def __bool__(self) -> bool:
        return bool(self.exact or self.domains)

    def address(self, addr: str) -> str:
        """The outside address for ``addr``, or ``addr`` unchanged (the null sender stays null)."""
        if not addr or "@" not in addr:
            return addr
        key = address.normalise(addr).lower()
        if key in self.exact:
            return self.exact[key]
        return self.domains.get(address.split(key)[1], addr)

    def message(self, data: bytes) -> bytes:
        """``data`` with From/Reply-To/Sender rewritten; the same object when nothing changes."""
        if not self:
            return data
        end = _header_end(data)
        head = data[:end]
        lines = _header_fields(head)
        changed = False
        out = []
        for field in lines:
            name = field.split(b":", 1)[0].strip().lower()
            if name in HEADERS and b":" in field:
                new = self._field(field)
                changed |= new != field
                field = new
            out.append(field)
        if not changed:
            return data
        return b"".join(out) + data[end:]

    def _field(self, field: bytes) -> bytes:
        name, _, value = field.partition(b":")
        text = value.decode("utf-8", "surrogateescape")
        unfolded = re.sub(r"\r?\n[ \t]", " ", text)
        for _, addr in getaddresses([unfolded]):
            new = self.address(addr)
            if addr and new != addr:
                pattern = re.compile(r"(?<![\w.+\-=])" + re.escape(addr) + r"(?![\w\-])", re.IGNORECASE)
                text = pattern.sub(new.replace("\\", "\\\\"), text)
        return name + b":" + text.encode("utf-8", "surrogateescape")


def _header_end(data: bytes) -> int:
    """Offset just past the header block's last line (the empty line and body follow)."""
    return len(headers.split(data)[0])


def _header_fields(head: bytes) -> list[bytes]:
    """Split a header block into fields, each with its continuation lines and line ends."""
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields
