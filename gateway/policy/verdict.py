"""What a policy stage decides about a message, as a value.

``accept`` lets the message go on to the next stage; ``quarantine`` keeps it out of the
recipients' mailboxes but never loses it (see gateway.delivery.stages.quarantine); ``reject`` is
an SMTP-time refusal or, at delivery, a bounce; ``defer`` tries again later.  Each carries
an SMTP code, an RFC 3463 status and a reason for the log and the notice.
"""
from __future__ import annotations

from dataclasses import dataclass

ACCEPT_ACTION, QUARANTINE_ACTION, REJECT_ACTION, DEFER_ACTION = "accept", "quarantine", "reject", "defer"


@dataclass(frozen=True)
class Verdict:
    action: str
    code: int = 250
    dsn: str = "2.0.0"
    reason: str = ""
    virus: str | None = None  # the detection name, for the postmaster's notice

    @property
    def accepted(self) -> bool:
        return self.action == ACCEPT_ACTION

    @property
    def reply(self) -> str:
        return f"{self.dsn} {self.reason}"


ACCEPT = Verdict(ACCEPT_ACTION)


def quarantine(reason: str, virus: str | None = None) -> Verdict:
    return Verdict(QUARANTINE_ACTION, 250, "2.0.0", reason, virus)


def reject(code: int, dsn: str, reason: str, virus: str | None = None) -> Verdict:
    return Verdict(REJECT_ACTION, code, dsn, reason, virus)


def defer(code: int, dsn: str, reason: str) -> Verdict:
    return Verdict(DEFER_ACTION, code, dsn, reason)
