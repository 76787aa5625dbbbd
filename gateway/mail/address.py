"""Mail addresses in the few shapes dialmail needs: split, normalise, compare."""
from __future__ import annotations

import re

# RFC 5321 dot-atom local part; anything else (quoted strings, %, !, source routes)
# is refused for local delivery, which also closes the classic open-relay tricks.
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$&'*+/=?^_`{|}~-]+)*")
# The same with UTF8-non-ascii allowed as atext (RFC 6531 §3.3), surrogates (undecodable
# bytes) excluded.
_DOT_ATOM_UTF8 = re.compile(r"[A-Za-z0-9!#$&'*+/=?^_`{|}~\u0080-\ud7ff\ue000-\U0010ffff-]+"
                            r"(\.[A-Za-z0-9!#$&'*+/=?^_`{|}~\u0080-\ud7ff\ue000-\U0010ffff-]+)*")
_DOMAIN = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?")

MAILER_DAEMON = "MAILER-DAEMON"


def split(address: str) -> tuple[str, str]:
    """``Alice@Office.Example`` -> (``Alice``, ``office.example``); no domain -> (addr, '')."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain.lower().rstrip(".")


def normalise(address: str) -> str:
    """Lower-case the domain; strip the angle brackets a client may leave in."""
    address = address.strip().strip("<>")
    local, domain = split(address)
    return f"{local}@{domain}" if domain else local


def is_plain(address: str) -> bool:
    """True for ``local@domain`` with a dot-atom local part and a host-name domain."""
    local, domain = split(address)
    return bool(domain) and bool(_DOT_ATOM.fullmatch(local)) and bool(_DOMAIN.fullmatch(domain)) \
        and "%" not in local and "!" not in local


def is_quoted_local(local: str) -> bool:
    """True for an RFC 5321 Quoted-string local part (``"john doe"``, ``"a\\"b"``) without the
    routing characters ``@ % !`` inside: those are refused in quotes as in a dot-atom, so a
    quoted local part is never a way past the relay rules."""
    if len(local) < 2 or local[0] != '"' or local[-1] != '"':
        return False
    inner = local[1:-1]
    i = 0
    while i < len(inner):
        c = inner[i]
        if c == "\\":  # quoted-pairSMTP: a backslash and one printable ASCII character
            if i + 1 >= len(inner) or not " " <= inner[i + 1] <= "~":
                return False
            i += 2
            continue
        if c in '"@%!' or not (" " <= c <= "~" or ord(c) > 0x7F):  # qtextSMTP (RFC 6531: UTF-8 too)
            return False
        i += 1
    return True


def is_relayable(address: str) -> bool:
    """An address dialmail passes on to the smarthost as it is: a dot-atom or quoted-string
    local part (non-ASCII allowed, RFC 6531 §3.3) at a host name, never an address literal."""
    local, domain = split(address)
    try:
        ascii_domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        return False
    if not ascii_domain or not _DOMAIN.fullmatch(ascii_domain):
        return False
    if is_quoted_local(local):
        return True
    return bool(_DOT_ATOM_UTF8.fullmatch(local)) and "%" not in local and "!" not in local


def needs_smtputf8(address: str) -> bool:
    return not address.isascii()


def is_null_or_daemon(sender: str) -> bool:
    """The senders an automatic message must never be sent back to (RFC 3834 §2)."""
    if not sender:
        return True
    local = split(sender)[0].lower()
    return local in ("mailer-daemon", "postmaster") or local.startswith("owner-") or local.endswith("-request")
