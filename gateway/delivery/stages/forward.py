"""Stage 5, forwarding: outside addresses of a recipient get one copy through the outbound queue.

Aliases, groups and ``[forward]`` rules that point outside all end here.  The queue id
of the copy is remembered in the same transaction that queues it, so a delivery retried
after a crash does not queue a second copy.  Local targets were already turned into
mailboxes by the expansion stage.

The copy's envelope sender is the forwarding address (the local recipient whose alias,
group or forward rule sent it out), not the original sender and not SRS:

* the ISP's smarthost takes mail only from the office's own senders (a foreign sender
  meets "553 Sender address rejected: not owned by user", and SPF fails at the far
  end), and the forwarding address passes ``[smarthost.rewrite]`` like any office mail;
* a bounce of the copy comes back to a local mailbox, whose owner set up the forward
  and can fix it; the original sender could not;
* SRS would need the ISP to hand back mail for SRS addresses, which a mailbox fetched
  over IMAP does not do, and the rewrite would replace the SRS address anyway.

A message that must never be answered (the null sender: a bounce, an automatic reply)
keeps the null sender, so its copy can neither bounce nor loop.  Mail fetched without
a Return-Path has an unknown sender, not a null one: it is forwarded like any other
unless its headers mark it as automatic.
"""
from __future__ import annotations

import logging
from email.message import Message as EmailHeaders

from spool.policystate import Forwarded, PolicyState
from spool.queue import RELAY, Message, Queue

log = logging.getLogger("dialmail.deliver")

ORIGIN = "forward"
FETCHED = "fetch"  # gateway.fetch.ORIGIN


def copy_sender(msg: Message, rcpt: str, headers: EmailHeaders) -> str:
    """The envelope sender of the forwarded copy (see the module doc for why)."""
    if msg.sender:
        return rcpt
    if msg.origin != FETCHED:
        return ""  # MAIL FROM:<> or one of our own notices
    explicit_null = str(headers.get("Return-Path", "") or "").strip() == "<>"
    automatic = str(headers.get("Auto-Submitted", "") or "").strip().lower() not in ("", "no")
    report = str(headers.get("Content-Type", "") or "").strip().lower().startswith("multipart/report")
    return "" if explicit_null or automatic or report else rcpt


def forward(queue: Queue, state: PolicyState, msg: Message, rcpt: str, targets: list[str],
            headers: EmailHeaders) -> str:
    """Queue the copy for ``targets`` (once); returns its queue id."""
    done = state.forwarded(msg.id, rcpt)
    if done:
        return done
    with queue.open_body(msg.id) as body:
        new_qid = queue.enqueue(copy_sender(msg, rcpt, headers), [(t, RELAY) for t in targets], body,
                                origin=ORIGIN, client=msg.id,
                                then=Forwarded(msg.id, rcpt),
                                orcpts={t: rcpt for t in targets})
    log.info("%s: to=<%s> status=forwarded as %s to %s", msg.id, rcpt, new_qid, ", ".join(targets))
    return new_qid
