"""Stage 4, alias and group expansion: one recipient address -> mailboxes and outside addresses.

The rules live in gateway.office.directory (shared with the RCPT-time existence check); this
stage adds what only delivery knows: the envelope sender for members-only groups, and
the round-robin turn, taken from the spool so it is fair across restarts and concurrent
deliveries and fixed per (message, recipient) so a retried delivery keeps its member; and
the forwarding users set for themselves, kept in the spool.
"""
from __future__ import annotations

from gateway.office.directory import Directory, Resolution
from spool.policystate import PolicyState
from spool.queue import Message


def resolve(directory: Directory, state: PolicyState, msg: Message, rcpt: str) -> Resolution | None:
    return directory.resolve(rcpt, sender=msg.sender,
                             pick=lambda group, members: state.pick(group, tuple(members), msg.id, rcpt),
                             stored=state.forward)
