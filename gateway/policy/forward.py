"""Stage 5, forwarding: outside addresses of a recipient get one copy through the outbound queue.

Aliases, groups and ``[forward]`` rules that point outside all end here.  The copy keeps
the original envelope sender (bounces go to whoever wrote the message) and the queue id
of the copy is remembered in the same transaction that queues it, so a delivery retried
after a crash does not queue a second copy.  Local targets were already turned into
mailboxes by the expansion stage.
"""
from __future__ import annotations

import logging

from spool.policystate import PolicyState
from spool.queue import RELAY, Message, Queue

log = logging.getLogger("dialmail.deliver")

ORIGIN = "forward"


def forward(queue: Queue, state: PolicyState, msg: Message, rcpt: str, targets: list[str]) -> str:
    """Queue the copy for ``targets`` (once); returns its queue id."""
    done = state.forwarded(msg.id, rcpt)
    if done:
        return done
    with queue.open_body(msg.id) as body:
        new_qid = queue.enqueue(msg.sender, [(t, RELAY) for t in targets], body, origin=ORIGIN, client=msg.id,
                                in_txn=lambda conn, q: state.mark_forwarded(conn, msg.id, rcpt, q),
                                orcpts={t: rcpt for t in targets})
    log.info("%s: to=<%s> status=forwarded as %s to %s", msg.id, rcpt, new_qid, ", ".join(targets))
    return new_qid
