"""Stage 6, mailbox delivery: one recipient's copy into one local Maildir, exactly once.

Each (queue id, recipient, mailbox) gets a fixed Maildir name, and a recipient whose
earlier claim was cut short is delivered with ``check_existing`` so the copy that may
already be in new/ or cur/ is found instead of duplicated.
"""
from __future__ import annotations

import hashlib
from email.message import Message as EmailHeaders
from itertools import chain
from pathlib import Path

from spool.maildir import Batch, Maildir, mailbox_path
from spool.queue import Message, Queue

READ = 256 * 1024


def trace(sender: str, rcpt: str, headers: EmailHeaders | None = None) -> bytes:
    """The final-delivery trace lines: Return-Path and Delivered-To (RFC 5321 4.4).

    Mail fetched from the ISP was finally delivered there already: its Return-Path is the
    ISP's record of the envelope sender (ours would only repeat it, or claim a null sender
    where the ISP wrote none), and a Delivered-To naming the same recipient is not
    written a second time.
    """
    lines = []
    if headers is None or headers.get("Return-Path") is None:
        lines.append(f"Return-Path: <{sender}>")
    if headers is None or rcpt.lower() not in (str(v).strip().lower() for v in headers.get_all("Delivered-To", [])):
        lines.append(f"Delivered-To: {rcpt}")
    return "".join(line + "\r\n" for line in lines).encode("utf-8", "surrogateescape")


def deliver(spool_dir: Path, queue: Queue, msg: Message, rcpt: str, user: str, retry: bool,
            extra_headers: bytes = b"", headers: EmailHeaders | None = None, batch: Batch | None = None) -> Path:
    """Stream the queued body into ``user``'s Maildir; returns the file's path.

    ``headers`` (the message's own) lets the trace lines skip what is already there.
    With a ``batch`` the file is in new/, on disk, only once ``batch.commit()`` returns.
    """
    box = Maildir(mailbox_path(spool_dir, user))
    key = hashlib.sha1(f"{rcpt}\0{user}".encode()).hexdigest()[:10]
    unique = box.unique_name(msg.arrival, f"Q{msg.id}R{key}")
    with queue.open_body(msg.id) as body:
        return box.deliver(chain([trace(msg.sender, rcpt, headers) + extra_headers], iter(lambda: body.read(READ), b"")),
                           unique, check_existing=retry, batch=batch)
