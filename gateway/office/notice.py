"""Notices to the postmaster (virus found, mail quarantined), queued like any message.

From the null sender so a notice can never cause a bounce loop; routed to the local
mailbox or out through the smarthost depending on where ``[server] postmaster`` lives.
"""
from __future__ import annotations

import email.policy
import email.utils
import logging
import time
from email.message import EmailMessage

from gateway.config import Config
from gateway.office.directory import Directory
from spool.queue import LOCAL, RELAY, Queue, Then

log = logging.getLogger("dialmail.policy")

ORIGIN = "notice"


def build(config: Config, subject: str, text: str) -> bytes:
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = f"Mail Delivery System <MAILER-DAEMON@{config.server.hostname}>"
    msg["To"] = config.server.postmaster
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(time.time(), localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=config.server.hostname)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(text)
    return msg.as_bytes()


def notify_postmaster(config: Config, directory: Directory, queue: Queue, subject: str, text: str,
                      then: Then | None = None) -> str:
    """Queue a notice to the postmaster; ``then`` (a spool step) commits with it."""
    pm = config.server.postmaster
    route = LOCAL if directory.is_local(pm) else RELAY
    qid = queue.enqueue("", [(pm, route)], build(config, subject, text), origin=ORIGIN, subject=subject,
                        then=then)
    log.info("%s: notice to postmaster <%s>: %s", qid, pm, subject)
    return qid
