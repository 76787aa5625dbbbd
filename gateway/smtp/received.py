"""Our Received: trace header (RFC 5321 §4.4), built from parts checked one by one.

    Received: from client.test ([192.0.2.7])
    	by mail.office.test (dialmail) with ESMTPSA
    	for <alice@office.test>; Sat, 28 Nov 2026 10:00:00 +0100

* ``from`` is the HELO/EHLO argument when it is a domain or an address literal; anything
  else (``HELO my laptop (home``) would break the header's syntax, so ``from`` is then the
  client's address literal alone and the argument follows in a comment with its parentheses
  and backslashes quoted (RFC 5322 §3.2.2), so every comment is closed.
* The client's address is an address literal: ``[192.0.2.7]``, ``[IPv6:2001:db8::1]``
  (RFC 5321 §4.1.3); an IPv4 client seen through an IPv6 socket is shown as IPv4.
* ``with`` names the protocol as registered by RFC 3848 and RFC 6531: SMTP after HELO,
  ESMTP after EHLO, S for TLS, A for AUTH, UTF8SMTP* when the transaction used SMTPUTF8.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

# RFC 5321 §4.1.2 Domain: sub-domains of letters, digits and inner hyphens.
_DOMAIN = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?")


def address_literal(ip: str) -> str:
    """``192.0.2.7`` -> ``[192.0.2.7]``; ``::1`` -> ``[IPv6:::1]``; not an IP -> ``[unknown]``."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return "[unknown]"
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return f"[{addr}]" if addr.version == 4 else f"[IPv6:{addr.compressed}]"


def is_helo_name(text: str) -> bool:
    """A HELO/EHLO argument fit to stand after ``from``: a domain or an address literal."""
    if _DOMAIN.fullmatch(text) and len(text) <= 255:
        return True
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1]
        if inner[:5].lower() == "ipv6:":
            return _is_ip(inner[5:], 6)
        return _is_ip(inner, 4)
    return False


def _is_ip(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def comment_text(text: str) -> str:
    """``text`` made safe inside a comment: ``(``, ``)`` and ``\\`` quoted, anything not
    printable ASCII shown as ``?``."""
    out = []
    for c in text:
        if c in "()\\":
            out.append("\\" + c)
        elif " " <= c <= "~":
            out.append(c)
        else:
            out.append("?")
    return "".join(out)


def protocol(extended: bool, tls: bool, authenticated: bool, smtputf8: bool) -> str:
    """The ``with`` keyword (RFC 3848, RFC 6531 §4.3)."""
    if not extended:
        return "SMTP"
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    suffix = ("S" if tls else "") + ("A" if authenticated else "")
    return base + suffix


@dataclass(frozen=True)
class Received:
    helo: str | None  # the client's HELO/EHLO argument as it gave it
    client_ip: str
    by: str  # our host name
    with_protocol: str
    date: str  # RFC 5322 date-time
    recipient: str | None = None  # the ``for`` clause, given only for a single recipient

    def header(self) -> str:
        literal = address_literal(self.client_ip)
        helo = self.helo or ""
        if is_helo_name(helo):
            source = f"from {helo} ({literal})"
        else:
            source = f"from {literal}" + (f"\r\n\t(helo={comment_text(helo)})" if helo else "")
        for_part = f"\r\n\tfor <{self.recipient}>" if self.recipient else ""
        return (f"Received: {source}\r\n\tby {self.by} (dialmail) with {self.with_protocol}{for_part};"
                f"\r\n\t{self.date}\r\n")
