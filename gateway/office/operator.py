"""What the administrator does by hand, said once for the command line and the web console.

Both call these functions, so ``dialmail queue release`` and the console's Release
button change the spool in the same steps, and a rule (a user's domain must be local,
an out-of-office must end after it starts) is checked in one place.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.config import Config
from gateway.config.policy import parse_when
from gateway.mail import address
from gateway.mail.outcome import administrator_bounce
from gateway.office.bounce import Settled, bounce_now
from gateway.office.directory import Directory
from spool.policystate import PolicyState
from spool.queue import Message, Queue
from spool.users import UserError, Users


class NotQueued(LookupError):
    """No message in the queue matches the id the operator gave."""


def lookup(queue: Queue, qid: str) -> Message:
    msg = queue.find(qid)
    if msg is None:
        raise NotQueued(f"no queued message matches {qid!r}")
    return msg


def hold(queue: Queue, qid: str) -> Message:
    msg = lookup(queue, qid)
    queue.set_hold(msg.id, True)
    return msg


def release(queue: Queue, qid: str) -> bool:
    """Release a held message for the next session; True when a body held as damaged now
    goes as it is."""
    msg = lookup(queue, qid)
    changed = queue.accept_body(msg.id)
    queue.set_hold(msg.id, False)
    queue.reschedule(msg.id, 0)
    return changed


def delete(queue: Queue, qid: str) -> Message:
    msg = lookup(queue, qid)
    queue.remove(msg.id)
    return msg


def bounce(config: Config, queue: Queue, qid: str) -> tuple[Message, Settled]:
    """Return a message to its sender now ("deleted by the administrator") and remove it.
    A notice for a local sender waits in the queue for local delivery (``Settled.local``)."""
    msg = lookup(queue, qid)
    return msg, bounce_now(config, queue, msg.id, administrator_bounce())


def retry_all_now(queue: Queue) -> int:
    """Every waiting message goes at the next session, its back-off forgotten; returns how many."""
    msgs = [m for m in queue.messages() if not m.hold]
    for m in msgs:
        queue.reschedule(m.id, 0)
    return len(msgs)


def add_user(config: Config, users: Users, name: str, password: str) -> str:
    """Add a local user; NAME@DOMAIN only in a local domain (mail to any other would be
    relayed out, never into this mailbox)."""
    check_new_user(config, name)
    users.add(name, password)
    return name.strip().lower()


def check_new_user(config: Config, name: str) -> None:
    server = config.server
    domain = name.rpartition("@")[2].strip().lower() if "@" in name else None
    if domain is not None and not server.is_local_domain(domain):
        raise UserError(f"{domain} is not a local domain (have: {', '.join(server.domains)}); add it to "
                        f"[server] domains first, or give the bare name to have a mailbox in every local domain")


@dataclass(frozen=True)
class OutOfOffice:
    """An out-of-office as a person types it: days or times as text, the reply's words."""
    subject: str
    body: str
    start: str | None = None  # 2026-07-01 or 2026-07-01T08:00
    end: str | None = None  # last day, inclusive, or end time
    every: int | None = None  # seconds between two replies to one sender


def set_out_of_office(state: PolicyState, users: Users, user: str, ooo: OutOfOffice) -> None:
    """Turn a user's out-of-office on; ``ValueError`` says what is wrong with the dates."""
    user = user.strip().lower()
    if not users.exists(user):
        raise UserError(f"no such user: {user}")
    t0 = parse_when(ooo.start, end=False).timestamp() if ooo.start else None
    t1 = parse_when(ooo.end, end=True).timestamp() if ooo.end else None
    if t0 and t1 and t1 <= t0:
        raise ValueError("the end is before the start")
    if not ooo.body.strip():
        raise ValueError("the reply needs a text")
    state.set_vacation(user, t0, t1, ooo.subject, ooo.body, ooo.every)


def out_of_office_off(state: PolicyState, users: Users, user: str) -> None:
    user = user.strip().lower()
    if not users.exists(user):
        raise UserError(f"no such user: {user}")
    state.vacation_off(user)


def set_forwarding(directory: Directory, state: PolicyState, user: str, targets: list[str], keep: bool
                   ) -> tuple[str, ...]:
    """Forward a user's mail to ``targets`` (user names or addresses), keeping a copy with
    ``keep``; wins over the configuration's ``[forward]``.  Refused, with ``ValueError``
    saying why, as ``dialmail check`` refuses a ``[forward]`` table: a target that is no
    address, or a local one that reaches nobody (the mail would go to the postmaster)."""
    user = user.strip().lower()
    if not directory.users.exists(user):
        raise UserError(f"no such user: {user}")
    to = tuple(dict.fromkeys(_forward_target(directory, state, user, t) for t in targets if t.strip()))
    if not to:
        raise ValueError("give at least one address to forward to")
    state.set_forward(user, to, keep)
    return to


def forwarding_off(users: Users, state: PolicyState, user: str) -> None:
    """Stop forwarding a user's mail, the configuration's ``[forward]`` entry included."""
    user = user.strip().lower()
    if not users.exists(user):
        raise UserError(f"no such user: {user}")
    state.forward_off(user)


def _forward_target(directory: Directory, state: PolicyState, user: str, target: str) -> str:
    target = target.strip()
    domains = directory.config.server.domains
    if "@" in target:
        norm = address.normalise(target)
        if not address.is_plain(norm):
            raise ValueError(f"{target!r} is not a valid mail address")
        if not directory.is_local(norm):
            return norm  # leaves through the queue; the outside decides
        if directory.user_for(norm) == user:
            raise ValueError(f"{target} is {user}'s own address: to keep a copy, tick keep instead")
        res = directory.resolve(norm, stored=state.forward)
        if res is None or not (res.mailboxes or res.remote or res.rotations):
            raise ValueError(f"{target!r} is nobody here: no user, alias or group of that name")
        return norm
    name = target.lower()
    if not re.fullmatch(r"[a-z0-9][a-z0-9._+-]*", name):
        raise ValueError(f"{target!r} is neither a user name nor a mail address")
    if name == user:
        raise ValueError(f"{target} is {user} itself: to keep a copy, tick keep instead")
    if not directory.users.exists(name):
        for domain in domains:
            res = directory.resolve(f"{name}@{domain}", stored=state.forward)
            if res is None or not (res.mailboxes or res.remote or res.rotations):
                raise ValueError(f"{target!r} is nobody here: no user, alias or group {name!r} in {domain}")
    return name
