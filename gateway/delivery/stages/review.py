"""The last resort: mail that can be neither delivered nor returned is kept for the postmaster.

Two kinds of mail have nobody to return a failure to:

* mail fetched from the ISP: its copy there is already deleted, so a bounce would leave
  the only copy in a notification the sender may never read, or in nothing when the
  sender is the null one;
* null-sender mail (bounces, automatic replies, notices): RFC 5321 section 4.5.5 forbids
  answering it.

When such a message cannot reach a recipient (nobody by that name, a members-only
group, an ``[server] postmaster`` that names nobody), it is delivered into the review
mailboxes instead, with an ``X-Dialmail-Review:`` header saying why and for whom.
The review mailboxes are the local mailboxes ``postmaster@<first domain>`` resolves to,
and when that is nobody here (or only outside addresses), the Maildir
``<spool>/mail/postmaster``, which always exists: this stage only ever writes local
Maildirs, so it cannot fail for any reason but the disk, and a full disk defers.
"""
from __future__ import annotations

from pathlib import Path

from gateway.config import Config
from gateway.delivery.stages import mailbox
from gateway.office.directory import Directory
from spool.queue import Message, Queue

FALLBACK = "postmaster"
SMTP_ORIGIN = "smtp"  # gateway.smtp.server's queue origin; its client is "IP" or "IP user=NAME"


def sender_trusted(config: Config, msg: Message) -> bool:
    """Whether the envelope sender is unlikely to be forged: mail fetched from the office's
    own ISP account, written on this machine, or from an SMTP client in mynetworks or
    logged in.  Anyone else can write any sender, and a reply or a bounce to it would go
    to a stranger through the office's smarthost account (backscatter)."""
    if msg.origin != SMTP_ORIGIN:
        return True
    ip, _, login = (msg.client or "").partition(" ")
    return login.startswith("user=") or config.server.in_mynetworks(ip)


def mailboxes(config: Config, directory: Directory) -> list[str]:
    """The local mailboxes that read the postmaster's mail, or the fallback Maildir."""
    res = directory.resolve(f"postmaster@{config.server.domains[0]}")
    return list(res.mailboxes) if res and res.mailboxes else [FALLBACK]


def keep(config: Config, directory: Directory, queue: Queue, msg: Message, rcpt: str, reason: str | None,
         retry: bool) -> list[Path]:
    """Deliver ``msg`` (meant for ``rcpt``) into the review mailboxes; returns the files."""
    note = b""
    if reason:
        note = (f"X-Dialmail-Review: {' '.join(reason.split())}\r\n"
                f"X-Dialmail-Original-Recipient: {rcpt}\r\n").encode("utf-8", "surrogateescape")
    return [mailbox.deliver(config.spool_dir, queue, msg, rcpt, user, retry, extra_headers=note)
            for user in mailboxes(config, directory)]
