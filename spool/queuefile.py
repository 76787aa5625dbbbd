"""Queue files: every queued message carries its own envelope on disk, beside its body.

The catalogue (``dialmail.db``) is an index of the queue, fast to search and update; the
files are the truth it can be rebuilt from, as Postfix's queue files carry their
envelope records.  A message is two files:

    queue/msg/<qid>    the body, byte for byte as accepted
    queue/env/<qid>    its envelope journal: JSON, one record per line

The first line is the envelope as accepted: sender, recipients with their route and
ORCPT, arrival, origin, client, Message-ID, subject, SMTPUTF8 and urgent flags, the
body's size and SHA-256, and (``then``) what the queueing stood for in the catalogue (an
ISP copy taken, a bounce reported...) so a rebuild records that too.

Every later line is appended, and fsynced, *before* the catalogue commit that makes
the same change, so the journal is never behind the catalogue:

    {"final": rcpt, "status": ..., "code": ..., "reply": ...}   a recipient is done
    {"dropped": rcpt}          a recipient taken back (it had this fetched message already)
    {"reported": [rcpts], "notice": qid}   the sender was told of these bounces
    {"hold": true|false}       an administrator's (or a damaged body's) hold
    {"warned": true}           the delay warning went
    {"accepted": size, "sha256": ...}   an administrator released a damaged body as it is
    {"removed": true}          the message left the queue (deleted, settled)

Waiting states (deferrals, attempts, next retry) are not journalled: after a rebuild a
waiting recipient is simply tried again.  A line cut short by a crash is ignored: the
change it started never reached the catalogue either.

Order of operations at enqueue (see ``spool.queue``): body fsynced, envelope written to
``queue/tmp/<qid>.env`` and fsynced, body renamed into ``msg/``, envelope into
``env/``, both directories fsynced, then the catalogue commit, then 250.  So a body
without an envelope is a write that was never acknowledged (the only thing recovery may
delete), and a body with one is a complete message whatever the catalogue says.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from spool.fsio import create_written, fsync_paths, write_file

VERSION = 1


@dataclass(frozen=True)
class EnvelopeRecipient:
    rcpt: str
    route: str
    orcpt: str | None = None


@dataclass(frozen=True)
class Envelope:
    qid: str
    sender: str
    arrival: float
    size: int
    sha256: str | None
    origin: str
    client: str | None
    message_id: str | None
    subject: str | None
    urgent: bool
    smtputf8: bool
    recipients: tuple[EnvelopeRecipient, ...]
    then: dict[str, Any] | None = None  # the queueing's own catalogue step, replayable

    def to_line(self) -> bytes:
        data = {"v": VERSION, "envelope": {
            "qid": self.qid, "sender": self.sender, "arrival": self.arrival, "size": self.size,
            "sha256": self.sha256, "origin": self.origin, "client": self.client, "message_id": self.message_id,
            "subject": self.subject, "urgent": self.urgent, "smtputf8": self.smtputf8,
            "recipients": [[r.rcpt, r.route, r.orcpt] for r in self.recipients]}, "then": self.then}
        return _line(data)

    @classmethod
    def from_record(cls, rec: dict) -> "Envelope":
        e = rec["envelope"]
        return cls(qid=str(e["qid"]), sender=str(e["sender"]), arrival=float(e["arrival"]), size=int(e["size"]),
                   sha256=e.get("sha256"), origin=str(e["origin"]), client=e.get("client"),
                   message_id=e.get("message_id"), subject=e.get("subject"), urgent=bool(e.get("urgent")),
                   smtputf8=bool(e.get("smtputf8")),
                   recipients=tuple(EnvelopeRecipient(str(r[0]), str(r[1]), r[2]) for r in e["recipients"]),
                   then=rec.get("then"))


@dataclass(frozen=True)
class Final:
    status: str
    code: int | None
    reply: str | None


@dataclass
class QueueFile:
    """An envelope journal read back: the envelope plus every change recorded since."""
    envelope: Envelope
    finals: dict[str, Final] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)
    reported: dict[str, str] = field(default_factory=dict)  # bounced recipient -> notice qid
    hold: bool | None = None  # None: never held nor released since it was queued
    warned: bool = False
    removed: bool = False
    accepted: tuple[int, str] | None = None  # a damaged body released as it is: its new size, digest

    @property
    def size(self) -> int:
        return self.accepted[0] if self.accepted else self.envelope.size

    @property
    def sha256(self) -> str | None:
        return self.accepted[1] if self.accepted else self.envelope.sha256


class Unreadable(Exception):
    """An envelope journal whose first record cannot be read: its body goes to lost+found."""


def _line(data: dict) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogateescape") + b"\n"


def body_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def write(path: Path, envelope: Envelope) -> None:
    """Create the journal at ``path`` (a tmp path) with the envelope, fsynced."""
    write_file(path, envelope.to_line())


def create(path: Path, envelope: Envelope) -> int:
    """Create the journal at ``path`` (a tmp path) with the envelope, not yet fsynced: its
    descriptor, for the caller to fsync before renaming it into env/, and to close."""
    return create_written(path, envelope.to_line())


def append(path: Path, records: Iterable[dict]) -> None:
    """Append records and fsync; a message whose journal is gone (removed) is left alone.

    One write per call, so the records of one catalogue transaction land together.
    """
    data = b"".join(_line(r) for r in records)
    if not data:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except FileNotFoundError:
        return
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def append_many(journals: dict[Path, list[dict]]) -> None:
    """``append`` to several journals with their fsyncs side by side (``fsync_paths``):
    a batch of messages costs a few disk flushes instead of one each.  Every journal is
    on disk when this returns."""
    written = []
    for path, records in journals.items():
        data = b"".join(_line(r) for r in records)
        if not data:
            continue
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            continue
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        written.append(path)
    fsync_paths(written)


def final(rcpt: str, status: str, code: int | None, reply: str | None) -> dict:
    return {"final": rcpt, "status": status, "code": code, "reply": reply}


def read(path: Path) -> QueueFile:
    """Read a journal; raises ``Unreadable`` when its envelope line is damaged."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    try:
        first = json.loads(lines[0].decode("utf-8", "surrogateescape"))
        qf = QueueFile(Envelope.from_record(first))
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise Unreadable(f"{path}: envelope record unreadable ({exc})") from None
    if not raw.endswith(b"\n"):
        lines = lines[:-1]  # the last append was cut short: its change never committed either
    for line in lines[1:]:
        if not line:
            continue
        try:
            rec = json.loads(line.decode("utf-8", "surrogateescape"))
        except ValueError:
            continue
        if "final" in rec:
            qf.finals[rec["final"]] = Final(rec["status"], rec.get("code"), rec.get("reply"))
        elif "dropped" in rec:
            qf.dropped.add(rec["dropped"])
        elif "reported" in rec:
            for rcpt in rec["reported"]:
                qf.reported[rcpt] = rec.get("notice") or ""
        elif "hold" in rec:
            qf.hold = bool(rec["hold"])
        elif "warned" in rec:
            qf.warned = True
        elif "removed" in rec:
            qf.removed = True
        elif "accepted" in rec:
            qf.accepted = (int(rec["accepted"]), str(rec.get("sha256") or ""))
    return qf
