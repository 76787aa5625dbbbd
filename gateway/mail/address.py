"""Mail addresses in the few shapes dialmail needs: split, normalise, compare."""
from __future__ import annotations

import re

# RFC 5321 dot-atom local part; anything else (quoted strings, %, !, source routes)
# is refused for local delivery, which also closes the classic open-relay tricks.
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$&'*+/=?^_`{|}~-]+)*")
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


def needs_smtputf8(address: str) -> bool:
    return not address.isascii()


def is_null_or_daemon(sender: str) -> bool:
    """The senders an automatic message must never be sent back to (RFC 3834 §2)."""
    if not sender:
        return True
    local = split(sender)[0].lower()
    return local in ("mailer-daemon", "postmaster") or local.startswith("owner-") or local.endswith("-request")
