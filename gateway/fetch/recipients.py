"""Who gets a fetched copy: the local recipients of an ISP mailbox's mail, or review.

A single-drop account belongs to one person (``deliver_to``).  A multidrop account
collects mail for many, and the envelope recipient comes from the header the ISP wrote
(``gateway.fetch.envelope``); addresses of the account's ISP-side ``domains`` are read as
the same local part here.  Whatever cannot be placed goes to the postmaster with a
review reason (``X-Dialmail-Review``), never dropped and never bounced to a sender
outside, who would learn nothing useful from it.
"""
from __future__ import annotations

from dataclasses import dataclass

from gateway.config import Config, FetchConfig
from gateway.fetch.envelope import envelope_recipients
from gateway.mail import address
from gateway.office.directory import Directory
from spool.queue import LOCAL, RELAY


@dataclass(frozen=True)
class Routing:
    """The recipients of one copy with their queue routes, and why the postmaster must
    look at it (None when every recipient is known)."""
    recipients: tuple[tuple[str, str], ...]
    review: str | None = None

    @property
    def addresses(self) -> list[str]:
        return [rcpt for rcpt, _ in self.recipients]


def review_header(reason: str) -> bytes:
    """The header put on top of a copy sent for review, read by the delivery's review stage."""
    return f"X-Dialmail-Review: {reason}\r\n".encode("utf-8", "surrogateescape")


class Recipients:
    """The recipient rules of one ``[[fetch]]`` account."""

    def __init__(self, config: Config, account: FetchConfig, directory: Directory):
        self.config = config
        self.account = account
        self.directory = directory

    def local_address(self, addr: str) -> str | None:
        """An address the ISP wrote, as a local address, or None if it is nobody's here."""
        addr = address.normalise(addr)
        local, domain = address.split(addr)
        if self.account.domains and domain in self.account.domains:
            addr = f"{local}@{self.config.server.domains[0]}"
        if not self.directory.is_local(addr) or not self.directory.exists(addr):
            return None
        return addr

    def route(self, addr: str) -> tuple[str, str]:
        if "@" not in addr:
            addr = f"{addr}@{self.config.server.domains[0]}"
        addr = address.normalise(addr)
        return addr, (LOCAL if self.directory.is_local(addr) else RELAY)

    def postmaster(self) -> tuple[str, str]:
        return self.route(self.config.server.postmaster)

    def of(self, block: bytes) -> Routing:
        """The routing of the copy whose header block is ``block``."""
        a = self.account
        name = a.name
        postmaster = self.postmaster()
        if a.mode == "single":
            target = self.route(a.deliver_to)
            if target[1] == LOCAL and not self.directory.exists(target[0]):
                # local delivery would bounce it to a sender outside: the postmaster gets it instead
                return Routing((postmaster,), f"deliver_to {target[0]} is nobody here (account {name})")
            return Routing((target,))
        env = envelope_recipients(block, a.envelope_header, a.envelope_skip, a.guess_from_headers)
        if env is None:
            where = f"{a.envelope_header}[{a.envelope_skip}]" if a.envelope_header else "To/Cc"
            return Routing((postmaster,), f"no envelope recipient in {where} (account {name})")
        local, unknown = [], []
        for addr in env.recipients:
            mapped = self.local_address(addr)
            (local if mapped else unknown).append(mapped or addr)
        rcpts = tuple(self.route(r) for r in dict.fromkeys(local))
        if unknown and env.source == "To/Cc guess" and rcpts:
            return Routing(rcpts)  # outside addresses on To/Cc are expected when guessing
        if unknown:
            reason = f"no local user for {', '.join(unknown)} ({env.source}, account {name})"
            return Routing(rcpts + (postmaster,), reason)
        return Routing(rcpts)

    def of_notice(self, block: bytes) -> tuple[tuple[str, str], ...]:
        """Who is told about a copy the size policy kept back: its recipients, or the
        postmaster when they cannot be told."""
        routing = self.of(block)
        return (self.postmaster(),) if routing.review else routing.recipients
