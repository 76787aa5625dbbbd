"""Where refused fetched mail goes: the Maildir ``<spool>/mail/quarantine``, never nowhere.

Mail fetched from the ISP has already left the sender's hands, so refusing it would lose
it: a block-listed, infected or oversized fetched message is kept once (whatever its
number of recipients) in this Maildir with an ``X-Dialmail-Quarantine:`` header giving
the reason and the intended recipients, and a log line.  The administrator reads it like
any mailbox: add a user called ``quarantine`` to fetch it by POP3, or look in the
directory.  ``release`` (the web console's Release button) gives a message back to the
recipients it was kept from, past the check that stopped it: a person has looked.
"""
from __future__ import annotations

from dataclasses import dataclass
from email.parser import BytesHeaderParser
from pathlib import Path

from gateway.delivery.stages import mailbox
from gateway.mail import address
from gateway.office.directory import Directory
from spool.maildir import Maildir, mailbox_path
from spool.queue import LOCAL, RELAY, Message, Queue

MAILBOX = "quarantine"
# The queue origin of a released message: the delivery pipeline does not screen it again.
RELEASED = "released"
_NOTE = (b"x-dialmail-quarantine", b"x-dialmail-original-recipients")


def keep(spool_dir: Path, queue: Queue, msg: Message, rcpts: list[str], reason: str, retry: bool) -> Path:
    note = (f"X-Dialmail-Quarantine: {reason}\r\n"
            f"X-Dialmail-Original-Recipients: {', '.join(rcpts)}\r\n").encode("utf-8", "surrogateescape")
    return mailbox.deliver(spool_dir, queue, msg, "quarantine", MAILBOX, retry, extra_headers=note)


class NotQuarantined(LookupError):
    pass


@dataclass(frozen=True)
class Kept:
    """One quarantined message as the administrator sees it."""
    key: str  # its Maildir file name
    path: Path
    author: str  # From:
    subject: str
    reason: str
    recipients: str
    size: int


def kept(spool_dir: Path) -> list[Kept]:
    """What the quarantine holds (``dialmail quarantine list``, the console's quarantine page)."""
    md = Maildir(mailbox_path(spool_dir, MAILBOX))
    out = []
    for path in (md.messages() if md.exists() else []):
        try:
            with open(path, "rb") as f:
                head = BytesHeaderParser().parse(f)
            size = path.stat().st_size
        except OSError:
            continue  # taken away while listing
        out.append(Kept(path.name, path, str(head.get("From", "")), str(head.get("Subject", "")),
                        str(head.get("X-Dialmail-Quarantine", "")),
                        str(head.get("X-Dialmail-Original-Recipients", "")), size))
    return out


def find(spool_dir: Path, key: str) -> Path:
    for k in kept(spool_dir):
        if k.key == key:
            return k.path
    raise NotQuarantined(f"{key} is not in the quarantine")


def delete(spool_dir: Path, key: str) -> None:
    find(spool_dir, key).unlink(missing_ok=True)


def release(queue: Queue, directory: Directory, path: Path) -> str:
    """Queue a quarantined message again for its original recipients, without the
    quarantine's notes; returns the queue id.  It leaves the quarantine only once it is in
    the queue: a crash in between leaves a copy in both, never in neither."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotQuarantined(f"{path.name} is not in the quarantine") from None
    head = BytesHeaderParser().parsebytes(data)
    rcpts = [r.strip() for r in str(head.get("X-Dialmail-Original-Recipients", "")).split(",") if r.strip()]
    if not rcpts:
        raise NotQuarantined(f"{path.name} does not say whom it was for")
    sender = address.normalise(str(head.get("Return-Path", "")).strip().strip("<>"))
    routes = [(r, LOCAL if directory.is_local(r) else RELAY) for r in rcpts]
    qid = queue.enqueue(sender, routes, _without_notes(data), origin=RELEASED, client=path.name)
    path.unlink()
    return qid


def _without_notes(data: bytes) -> bytes:
    """The message without the quarantine's header lines (and their folded continuations)
    and without the Delivered-To that named the quarantine."""
    end = data.find(b"\r\n\r\n")
    end = len(data) if end < 0 else end + 2
    kept, dropping = [], False
    for line in data[:end].splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        name = line.split(b":", 1)[0].strip().lower()
        dropping = name in _NOTE or line.strip().lower() == f"delivered-to: {MAILBOX}".encode()
        if not dropping:
            kept.append(line)
    return b"".join(kept) + data[end:]
