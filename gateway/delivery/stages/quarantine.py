"""Where refused fetched mail goes: the Maildir ``<spool>/mail/quarantine``, never nowhere.

Mail fetched from the ISP has already left the sender's hands, so refusing it would lose
it: a block-listed, infected or oversized fetched message is kept once (whatever its
number of recipients) in this Maildir with an ``X-Dialmail-Quarantine:`` header giving
the reason and the intended recipients, and a log line.  The administrator reads it like
any mailbox: add a user called ``quarantine`` to fetch it by POP3, or look in the
directory; to release a message, re-submit it with ``dialmail sendmail``.
"""
from __future__ import annotations

from pathlib import Path

from gateway.delivery.stages import mailbox
from spool.queue import Message, Queue

MAILBOX = "quarantine"


def keep(spool_dir: Path, queue: Queue, msg: Message, rcpts: list[str], reason: str, retry: bool) -> Path:
    note = (f"X-Dialmail-Quarantine: {reason}\r\n"
            f"X-Dialmail-Original-Recipients: {', '.join(rcpts)}\r\n").encode("utf-8", "surrogateescape")
    return mailbox.deliver(spool_dir, queue, msg, "quarantine", MAILBOX, retry, extra_headers=note)
