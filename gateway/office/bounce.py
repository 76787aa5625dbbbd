"""Bounces and delay warnings (RFC 3464 delivery status notifications), and the one
place where a message whose recipients are all final leaves the queue.

``settle(config, queue, qid)`` is called by every worker after it records outcomes
(the relay after each message, local delivery, expiry, the admin's ``queue bounce``):

* bounced recipients the sender has not been told about yet get ONE bounce, at once,
  even while other recipients still wait;
* when every recipient is final the message is removed -- in the same transaction that
  queues its bounce, so a crash can neither lose nor duplicate a bounce;
* the bounce goes from the null sender to the envelope sender: on the ``local`` route
  when the sender lives here (the caller kicks local delivery), else out via the relay.

Never a bounce of a bounce, and never a message lost: a message from the null sender
(a bounce, an automatic reply, a notice) that fails cannot go back to anyone, so the
report goes to the postmaster instead, with the whole message attached
(``message/rfc822``), queued as a ``double-bounce`` that local delivery only ever puts
into local Maildirs (gateway.delivery.stages.review): it can neither leave nor fail again.
Postfix drops double bounces by default; here the postmaster reads them.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from itertools import chain

from gateway.config import Config
from gateway.mail import address, dsn, headers
from gateway.mail.dsn import DELAYED, FAILED, Entry
from gateway.mail.outcome import Outcome, enhanced_status
from spool import notices
from spool.queue import BOUNCED, LOCAL, RELAY, Message, Queue, Recipient

log = logging.getLogger("dialmail.bounce")

ORIGIN = "bounce"
DOUBLE_BOUNCE = "double-bounce"  # a failed null-sender message, whole, for the postmaster
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


@dataclass(frozen=True)
class Settled:
    removed: bool = False
    bounce_id: str | None = None
    local: bool = False  # the notice was queued for local delivery: kick it


def read_headers(queue: Queue, qid: str) -> bytes:
    try:
        with queue.open_body(qid) as f:
            return headers.read(f)
    except FileNotFoundError:
        return b""


def entry(r: Recipient) -> Entry:
    """A failed recipient's DSN line, from its outcome as stored in the spool: a stored reply
    code means a server said it (``smtp;``), none means dialmail decided it (``X-Dialmail;``)."""
    reply = r.last_reply or ""
    # The stored reply leads with the status chosen when the outcome was made; fall back to
    # the basic code's class.
    first = reply.split()[0] if reply.split() else ""
    status = first if _STATUS.fullmatch(first) else \
        enhanced_status(r.last_code or (554 if r.status == BOUNCED else 451), reply)
    if not reply:
        return Entry(r.rcpt, r.orcpt, status, None)
    if r.last_code:
        return Entry(r.rcpt, r.orcpt, status, f"{r.last_code} {reply}")
    ours = reply[len(first):].strip() if _STATUS.fullmatch(first) else reply
    return Entry(r.rcpt, r.orcpt, status, ours, dsn.LOCAL_DIAGNOSTIC)


# ---------------------------------------------------------------- leaving the queue


def notice_route(config: Config, sender: str) -> str:
    return LOCAL if config.server.is_local_domain(address.split(sender)[1]) else RELAY


def settle(config: Config, queue: Queue, qid: str, now: float | None = None) -> Settled:
    """Report new bounced recipients and remove the message once every recipient is final."""
    for _ in range(5):
        try:
            return _settle_once(config, queue, qid, now)
        except notices.QueueChanged:
            continue
    log.warning("%s: queue kept changing while settling; will settle on the next pass", qid)
    return Settled()


def _settle_once(config: Config, queue: Queue, qid: str, now: float | None) -> Settled:
    msg = queue.get(qid)
    if msg is None:
        return Settled()
    told = notices.reported(queue, qid)
    fresh = [r for r in msg.recipients if r.status == BOUNCED and r.rcpt not in told]
    done = not msg.pending
    if not fresh:
        return Settled(removed=queue.remove_if_done(qid)) if done else Settled()
    expect = sorted(r.rcpt for r in fresh)
    if not msg.sender:
        return _double_bounce(config, queue, msg, fresh, expect, now)
    data = bytes(dsn.build(hostname=config.server.hostname, sender=msg.sender, qid=qid, arrival=msg.arrival,
                           action=FAILED, entries=[entry(r) for r in fresh],
                           original_headers=read_headers(queue, qid), now=now))
    route = notice_route(config, msg.sender)
    sent = notices.queue_bounce(queue, notices.Notice(qid, msg.sender, route, data, ORIGIN,
                                                      "Undelivered Mail Returned to Sender",
                                                      smtputf8=not msg.sender.isascii()), expect)
    log.info("%s: sender non-delivery notification: %s (to <%s> for %s)", qid, sent.notice_id, msg.sender,
             ", ".join(expect))
    return Settled(removed=sent.removed, bounce_id=sent.notice_id, local=route == LOCAL)


def _double_bounce(config: Config, queue: Queue, msg: Message, fresh: list[Recipient], expect: list[str],
                   now: float | None) -> Settled:
    """A null-sender message failed: the postmaster gets the report with the whole message."""
    postmaster = f"postmaster@{config.server.domains[0]}"
    report = dsn.build(hostname=config.server.hostname, sender=postmaster, qid=msg.id, arrival=msg.arrival,
                       action=FAILED, entries=[entry(r) for r in fresh], now=now, whole_message=True)
    with queue.open_body(msg.id) as body:
        data = chain([report.head], iter(lambda: body.read(256 * 1024), b""), [report.tail])
        sent = notices.queue_bounce(queue, notices.Notice(msg.id, postmaster, LOCAL, data, DOUBLE_BOUNCE,
                                                          "Undelivered Mail Returned to Postmaster"), expect)
    for r in fresh:
        log.warning("%s: to=<%s> failed and the sender is the null one: kept for the postmaster as %s (%s %s)",
                    msg.id, r.rcpt, sent.notice_id, r.last_code or "", r.last_reply or "")
    return Settled(removed=sent.removed, bounce_id=sent.notice_id, local=True)


def bounce_now(config: Config, queue: Queue, qid: str, outcome: Outcome, now: float | None = None) -> Settled:
    """Fail every recipient still waiting with ``outcome`` and settle (``dialmail queue bounce``)."""
    queue.fail_waiting(qid, lambda _r: outcome, in_flight_too=True)
    return settle(config, queue, qid, now=now)


# ---------------------------------------------------------------- delay warnings


def warn_delayed(config: Config, queue: Queue, msg: Message, now: float | None = None) -> Settled:
    """Send the sender ONE delay warning for ``msg``'s waiting recipients (never for bounces)."""
    now = time.time() if now is None else now
    waiting = msg.pending
    if not msg.sender or not waiting:
        queue.set_warned(msg.id)
        return Settled()
    retry_until = msg.arrival + config.queue.queue_lifetime
    entries = [_delayed_entry(r) for r in waiting]
    data = bytes(dsn.build(hostname=config.server.hostname, sender=msg.sender, qid=msg.id, arrival=msg.arrival,
                           action=DELAYED, entries=entries, original_headers=read_headers(queue, msg.id),
                           now=now, retry_until=retry_until))
    route = notice_route(config, msg.sender)
    try:
        notice_id = notices.queue_warning(queue, notices.Notice(msg.id, msg.sender, route, data, ORIGIN,
                                                                "Delayed Mail (still being retried)",
                                                                smtputf8=not msg.sender.isascii()))
    except notices.QueueChanged:
        return Settled()
    log.info("%s: sender delay notification: %s", msg.id, notice_id)
    return Settled(bounce_id=notice_id, local=route == LOCAL)


def _delayed_entry(r: Recipient) -> Entry:
    if r.last_reply:
        e = entry(r)
        return Entry(e.rcpt, e.orcpt, e.status if e.status.startswith("4") else "4.0.0", e.diagnostic,
                     e.diagnostic_type)
    return Entry(r.rcpt, r.orcpt, "4.4.1", "not sent yet: waiting for the link to the Internet",
                 dsn.LOCAL_DIAGNOSTIC)