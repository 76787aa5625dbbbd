"""8-bit mail for a smarthost that does not offer 8BITMIME (RFC 6152 §3, RFC 2045 §6).

A 7-bit hop must never get an octet over 127.  As Postfix does (``disable_mime_output_conversion
= no``), each MIME leaf part whose body holds 8-bit octets is re-encoded: text as
quoted-printable, anything else as base64; every other part, and the header block, go out
as they came.  A message without MIME headers is labelled ``text/plain`` (charset utf-8
when its body is UTF-8, else RFC 1428's unknown-8bit) so the reader can decode it.

What cannot be converted without changing what the message says is refused with the
reason, and the relay keeps it in the queue: 8-bit octets in a header (their charset is
unknown), or inside a signed or encrypted part (RFC 1847: converting breaks the signature).
"""
from __future__ import annotations

import base64
import binascii
import email.policy
from email import message_from_bytes
from email.generator import BytesGenerator
from email.message import Message
from io import BytesIO

from gateway.mail import headers

# Source header lines are written back exactly as they came (no refolding, no new
# wording); only the Content-Transfer-Encoding of a converted part is new.
_POLICY = email.policy.SMTP.clone(refold_source="none", max_line_length=None, cte_type="7bit")
_SEALED = ("multipart/signed", "multipart/encrypted", "application/pkcs7-mime")


class CannotDowngrade(ValueError):
    """The message holds 8-bit data that no re-encoding can carry unchanged."""


def to_7bit(data: bytes) -> bytes:
    """``data`` with every 8-bit MIME part re-encoded; ``data`` itself when it is ASCII."""
    if data.isascii():
        return data
    block, body_start = headers.split(data)
    if not data[:body_start].isascii():
        raise CannotDowngrade("8-bit octets in the message header")
    msg = message_from_bytes(data, policy=_POLICY)
    if msg.get("MIME-Version") is None:
        _label_plain(msg, data[body_start:])
    _convert(msg, sealed=False)
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_POLICY).flatten(msg)
    result = out.getvalue()
    if not result.isascii():
        raise CannotDowngrade("8-bit octets outside any MIME part body (in a part header or between parts)")
    return result


def _label_plain(msg: Message, body: bytes) -> None:
    try:
        body.decode("utf-8")
        charset = "utf-8"
    except UnicodeDecodeError:
        charset = "unknown-8bit"
    msg["MIME-Version"] = "1.0"
    if msg.get("Content-Type") is None:
        msg["Content-Type"] = f"text/plain; charset={charset}"


def _convert(part: Message, sealed: bool) -> None:
    sealed = sealed or part.get_content_type() in _SEALED
    if part.is_multipart():
        for sub in part.get_payload():
            _convert(sub, sealed)
        _say_7bit(part)
        return
    raw = part.get_payload(decode=True) if _cte(part) in ("", "7bit", "8bit", "binary") else None
    if raw is None or raw.isascii():
        return
    if sealed:
        raise CannotDowngrade("8-bit octets inside a signed or encrypted part")
    if part.get_content_maintype() == "text":
        # quoted-printable keeps text readable; line breaks stay line breaks (binascii's C
        # encoder: the email package's own is ~20 times slower on a large text)
        encoded = binascii.b2a_qp(raw, istext=True).decode("ascii")
        cte = "quoted-printable"
    else:
        encoded = base64.encodebytes(raw).decode("ascii")
        cte = "base64"
    part.set_payload(encoded)
    if "Content-Transfer-Encoding" in part:
        part.replace_header("Content-Transfer-Encoding", cte)
    else:
        part["Content-Transfer-Encoding"] = cte


def _say_7bit(part: Message) -> None:
    """A multipart's own encoding may only say what its parts are (RFC 2045 §6.4)."""
    if _cte(part) in ("8bit", "binary"):
        part.replace_header("Content-Transfer-Encoding", "7bit")


def _cte(part: Message) -> str:
    return str(part.get("Content-Transfer-Encoding", "")).strip().lower()
