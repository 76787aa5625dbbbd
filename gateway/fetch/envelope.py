"""Who a fetched message was for: the envelope recipient of a multidrop ISP mailbox.

An ISP mailbox that collects mail for a whole domain (multidrop) keeps one copy per
delivery, and the only trustworthy record of the SMTP envelope is a header the ISP's
delivery agent wrote on top: ``Delivered-To``, ``X-Original-To``, ``X-Envelope-To``,
``Envelope-To`` or the ``for <addr>`` clause of its own ``Received`` line.  Which one,
and how many copies of it lie above the ISP's own (``skip``: headers added after
delivery, e.g. by the ISP's filter), is configured per account.

To/Cc are not an envelope: a Bcc recipient is in neither and a list message names the
list, so guessing from them (the classic fetchmail failure) is only done when enabled.
When nothing can be determined the caller sends the message to review, never drops it.

Sans-IO: bytes of a header block in, addresses out.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from email.utils import getaddresses

from gateway.mail import headers as mail_headers

# The header block ends at the first empty line; both CRLF and bare LF are accepted.
_ADDR_IN_ANGLES = re.compile(r"<([^<>\s]*)>")
# The "for" clause of a Received line: "for <a@b>" or "for a@b", up to ";" or the end.
_RECEIVED_FOR = re.compile(r"\bfor\s+<?([^\s<>;]+@[^\s<>;]+?)>?\s*(?:;|$|\s)", re.IGNORECASE)

GUESS_HEADERS = ("to", "cc", "resent-to", "resent-cc")


@dataclass(frozen=True)
class Envelope:
    """The recipients found and where they came from (for logs and review notes)."""
    recipients: tuple[str, ...]
    source: str


def header_block(message: bytes) -> bytes:
    """The header part of ``message`` without the empty line that ends it.

    The same bytes come out of a whole message and of an IMAP ``BODY[HEADER]``, which
    makes them usable for a digest computed either way.
    """
    block, body = mail_headers.split(message)
    if body == len(block):  # no empty line: the whole message, as the digests stored before
        return message
    return block[:-2] if block.endswith(b"\r\n") else block[:-1]


def headers(block: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) pairs in order, top first."""
    out: list[tuple[str, str]] = []
    text = block.decode("utf-8", "surrogateescape")
    for line in re.split(r"\r?\n", text):
        if not line:
            break
        if line[0] in " \t":
            if out:
                name, value = out[-1]
                out[-1] = (name, value + " " + line.strip())
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or " " in name.strip():
            continue
        out.append((name.strip().lower(), value.strip()))
    return out


def values(block: bytes, name: str) -> list[str]:
    name = name.lower()
    return [v for n, v in headers(block) if n == name]


def first(block: bytes, name: str) -> str | None:
    found = values(block, name)
    return found[0] if found else None


def addresses(value: str) -> list[str]:
    """Plain addresses in a header value (``a@b, "X" <c@d>`` -> [a@b, c@d])."""
    return [addr.strip() for _, addr in getaddresses([value]) if "@" in addr]


def received_for(value: str) -> str | None:
    """The address of a Received line's ``for`` clause, if it has one."""
    # The date after the last ";" may not contain "for" but comments may; look before it.
    head = value.rsplit(";", 1)[0] if ";" in value else value
    m = _RECEIVED_FOR.search(head + " ")
    return m.group(1) if m else None


def envelope_recipients(block: bytes, header: str | None, skip: int = 0,
                        guess: bool = False) -> Envelope | None:
    """The envelope recipients of a multidrop copy, or None when they cannot be told.

    ``header`` names the ISP's envelope header ("Received" for its ``for`` clause);
    the header at position ``skip`` (0 = the topmost) is the one the ISP wrote.  Only
    that one is read: an older one lower down belongs to an earlier hop (a list server,
    a forwarder) and names someone else.
    """
    if header:
        found = values(block, header)
        if len(found) > skip:
            value = found[skip]
            if header.lower() == "received":
                addr = received_for(value)
                rcpts = [addr] if addr else []
            else:
                rcpts = addresses(value) or [a for a in _ADDR_IN_ANGLES.findall(value) if "@" in a]
            if rcpts:
                return Envelope(tuple(dict.fromkeys(rcpts)), f"{header}[{skip}]")
    if guess:
        rcpts = []
        for name in GUESS_HEADERS:
            for value in values(block, name):
                rcpts.extend(addresses(value))
        if rcpts:
            return Envelope(tuple(dict.fromkeys(rcpts)), "To/Cc guess")
    return None


def return_path(block: bytes) -> str:
    """The envelope sender the ISP recorded, "" for the null sender or when it is absent.

    An absent Return-Path gives "" rather than a guess from From:, so a failed local
    delivery notifies the postmaster instead of a possibly forged author.
    """
    value = first(block, "return-path")
    if value is None:
        return ""
    m = _ADDR_IN_ANGLES.search(value)
    addr = (m.group(1) if m else value).strip()
    return "" if addr.upper() in ("", "MAILER-DAEMON") else addr


def message_id(block: bytes) -> str | None:
    value = first(block, "message-id")
    if not value:
        return None
    m = _ADDR_IN_ANGLES.search(value)
    return f"<{m.group(1)}>" if m else value.split()[0]


def message_digest(block: bytes, size: int) -> str:
    """Identity of one stored copy independent of its UID: size plus the whole header block.

    Used to recognise copies already taken when the server renumbers a folder
    (UIDVALIDITY change); two copies differing in any header (another Delivered-To)
    are different copies.
    """
    h = hashlib.sha256()
    h.update(str(size).encode() + b"\0")
    h.update(block.replace(b"\r\n", b"\n"))
    return h.hexdigest()


def message_id_digest(msgid: str, block: bytes = b"") -> str:
    """Key for "this recipient already has this message": the Message-ID plus the headers
    an author sets once (From, Date, Subject).

    The same message reaching us twice (list mail via two accounts, a re-sent copy)
    agrees on all four; a different message that merely reuses a Message-ID (broken
    senders do) differs in one of them and is delivered rather than taken for a copy.
    """
    parts = [msgid.strip()] + [(first(block, h) or "").strip() for h in ("from", "date", "subject")]
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:32]
