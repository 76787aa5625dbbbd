"""What a dial session reports as it goes: one small value per kind of event.

The session and the daemon's runner emit them, ``ProgressView`` renders them and the
transcript writes them down; only the control socket turns them into JSON lines
(``gateway.control``), so the daemon's view and connect-now's own run show the same
objects.  ``kind`` is the event's name on the wire and in the transcript.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from spool.sessions import SessionRecord


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str]


@dataclass(frozen=True)
class Started(Event):
    """The session holds the line's lock and has a number in the session log."""
    kind = "session"
    id: int
    trigger: str
    mode: str


@dataclass(frozen=True)
class Refused(Event):
    """Another session holds the line."""
    kind = "refused"
    reason: str


@dataclass(frozen=True)
class Stopping(Event):
    """Both sides were asked to stop at the next safe point (max_time, carrier loss, interrupt)."""
    kind = "stopping"
    reason: str


@dataclass(frozen=True)
class Error(Event):
    kind = "error"
    message: str


@dataclass(frozen=True)
class Info(Event):
    kind = "info"
    message: str


@dataclass(frozen=True)
class Hook(Event):
    """The before- or after-session command ran."""
    kind = "hook"
    which: str  # before | after
    command: str
    status: int | None
    output: str


@dataclass(frozen=True)
class Dialing(Event):
    kind = "dialing"
    backend: str


@dataclass(frozen=True)
class ModemLine(Event):
    """One line of the link's own account of itself (AT dialogue, pon output), credentials masked."""
    kind = "modem"
    text: str


@dataclass(frozen=True)
class Connected(Event):
    kind = "connected"
    rate: int | None  # bits per second reported at CONNECT
    description: str


@dataclass(frozen=True)
class Hangup(Event):
    """Both sides are done with the line; it is being taken down."""
    kind = "hangup"


@dataclass(frozen=True)
class HungUp(Event):
    """The line is down, and how it was taken down."""
    kind = "hungup"
    how: str


@dataclass(frozen=True)
class Etrn(Event):
    """The smarthost's answer to ETRN for one domain (RFC 1985)."""
    kind = "etrn"
    domain: str
    code: int
    reply: str


@dataclass(frozen=True)
class EtrnFailed(Event):
    kind = "etrn"
    error: str


@dataclass(frozen=True)
class Sent(Event):
    """The smarthost took one message."""
    kind = "send"
    qid: str
    size: int  # bytes of this message
    total: int  # bytes sent so far in this session
    seconds: float  # since sending began
    done: int  # messages sent so far
    left: int  # messages still to go


@dataclass(frozen=True)
class Fetched(Event):
    """One message from the ISP is safely in the spool."""
    kind = "fetch"
    uid: str  # account/folder/uid
    size: int
    total: int
    done: int
    left: int


@dataclass(frozen=True)
class FetchedPiece(Event):
    """A chunk of a large message being fetched."""
    kind = "fetch-piece"
    uid: int
    size: int
    done_bytes: int


@dataclass(frozen=True)
class SendDone(Event):
    kind = "send-done"
    sent: int
    deferred: int
    bounced: int
    bytes: int
    error: str | None  # why sending stopped early; it goes with the counts


@dataclass(frozen=True)
class FetchDone(Event):
    kind = "fetch-done"
    fetched: int
    errors: tuple[str, ...]


@dataclass(frozen=True)
class Retry(Event):
    """The line dropped; the session is tried again after a pause."""
    kind = "retry"
    in_: float  # seconds until the next try ("in" on the wire)
    attempt: int
    of: int


@dataclass(frozen=True)
class Summary:
    """The session log's record of a session, as the people watching it see it."""
    trigger: str = ""
    mode: str = "both"
    outcome: str = "failed"
    rate: int | None = None
    connected_seconds: float = 0.0
    sent: int = 0
    deferred: int = 0
    bounced: int = 0
    fetched: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    cost: float = 0.0
    errors: tuple[str, ...] = ()

    @classmethod
    def of(cls, rec: SessionRecord) -> Summary:
        return cls(trigger=rec.trigger, mode=rec.mode, outcome=rec.outcome, rate=rec.connect_rate,
                   connected_seconds=round(rec.connected_seconds, 1), sent=rec.sent, deferred=rec.deferred,
                   bounced=rec.bounced, fetched=rec.fetched, bytes_up=rec.bytes_up, bytes_down=rec.bytes_down,
                   cost=rec.cost, errors=tuple(rec.errors))


@dataclass(frozen=True)
class Done(Event):
    """The session is over and logged."""
    kind = "done"
    id: int
    outcome: str  # ok | partial | failed | interrupted
    record: Summary


@dataclass(frozen=True)
class End(Event):
    """The runner is done with this session and its retries: the last event of a connect."""
    kind = "end"
    outcome: str
