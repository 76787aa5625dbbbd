"""Stage 6, mailbox delivery: one recipient's copy into one local Maildir, exactly once.

Each (queue id, recipient, mailbox) gets a fixed Maildir name, and a recipient whose
earlier claim was cut short is delivered with ``check_existing`` so the copy that may
already be in new/ or cur/ is found instead of duplicated.
"""
from __future__ import annotations

import hashlib
from itertools import chain
from pathlib import Path

from spool.maildir import Maildir
from spool.queue import Message, Queue

READ = 256 * 1024


def mailbox_path(spool_dir: Path, user: str) -> Path:
    return Path(spool_dir) / "mail" / user


def trace(sender: str, rcpt: str) -> bytes:
    return f"Return-Path: <{sender}>\r\nDelivered-To: {rcpt}\r\n".encode("utf-8", "surrogateescape")


def deliver(spool_dir: Path, queue: Queue, msg: Message, rcpt: str, user: str, retry: bool,
            extra_headers: bytes = b"") -> Path:
    """Stream the queued body into ``user``'s Maildir; returns the file's path."""
    box = Maildir(mailbox_path(spool_dir, user))
    key = hashlib.sha1(f"{rcpt}\0{user}".encode()).hexdigest()[:10]
    unique = box.unique_name(msg.arrival, f"Q{msg.id}R{key}")
    with queue.open_body(msg.id) as body:
        return box.deliver(chain([trace(msg.sender, rcpt) + extra_headers], iter(lambda: body.read(READ), b"")),
                           unique, check_existing=retry)
