"""Stage 2, block lists: server-wide senders and domains refused, with an allow list.

Entries are ``user@domain``, ``domain`` (that domain only) or ``*.domain`` (every
subdomain, not the domain itself; list both to cover both).  The allow list wins over
the block list.  The null sender (bounces) is never blocked, or our own mail's bounces
would be lost.  Checked against the envelope sender (at RCPT time for the LAN) and the
From: header (at DATA time, and for fetched mail, whose envelope sender the ISP chose).
"""
from __future__ import annotations

from email.utils import getaddresses

from gateway.config.policy import BlockList
from gateway.mail import address
from gateway.policy.verdict import ACCEPT, Verdict, reject


def matches(pattern: str, addr: str) -> bool:
    addr = addr.lower()
    if "@" in pattern:
        return addr == pattern
    domain = address.split(addr)[1]
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return domain == pattern


class SenderFilter:
    def __init__(self, lists: BlockList):
        self.lists = lists

    def blocked_by(self, sender: str) -> str | None:
        """The block list entry ``sender`` matches (and no allow entry does), else None."""
        sender = address.normalise(sender or "")
        if not sender or "@" not in sender:
            return None
        if any(matches(p, sender) for p in self.lists.allow):
            return None
        return next((p for p in self.lists.senders if matches(p, sender)), None)

    def check(self, sender: str, header_from: str | None = None) -> Verdict:
        for who in (sender, *header_addresses(header_from)):
            entry = self.blocked_by(who)
            if entry:
                return reject(550, "5.7.1", f"sender {who} is blocked by local policy ({entry})")
        return ACCEPT


def header_addresses(value: str | None) -> list[str]:
    if not value:
        return []
    try:
        return [a for _, a in getaddresses([str(value)]) if "@" in a]
    except Exception:
        return []
