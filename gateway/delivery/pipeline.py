"""The delivery policy: every message delivered locally passes these stages, in this order.

  1. size limits          gateway.policy.size        message-wide
  2. block lists          gateway.policy.blocklist   message-wide (sender, From:)
  3. virus scan           gateway.policy.virus       message-wide (clamd INSTREAM)
  4. alias/group expansion gateway.delivery.stages.expand     per recipient (aliases, groups,
                                                      round-robin, catch-all, members-only)
  5. forwarding           gateway.delivery.stages.forward     per recipient: outside targets -> queue
  6. mailbox delivery     gateway.delivery.stages.mailbox     per recipient: local Maildirs, or
                          gateway.delivery.stages.lmtp        an LMTP server ([delivery] lmtp)
  7. automatic replies    gateway.delivery.stages.autoreply   per recipient: autoresponders, vacation

Stages 1-3 decide about the whole message and return a ``Verdict`` (accept / quarantine /
reject / defer, see gateway.policy.verdict).  For LAN submissions they run at SMTP time
(gateway.smtp.admission: refused at RCPT or DATA, so the sender hears it) and are not
repeated at delivery; for everything else, above all mail fetched from the ISP, they run
here, and what fails them is quarantined (gateway.delivery.stages.quarantine), never dropped, or
deferred when clamd cannot be reached and ``[virus] on_error = "reject"``.

Recipients delivered into mailboxes are recorded in batches (``commit``): the Maildir
files of a whole pass are fsynced side by side and linked into new/, each new/ directory
is fsynced once (spool.maildir.Batch), and then all their outcomes go into the queue in
one transaction.  Nothing counts as delivered before its link into new/ is on disk, and
a pass cut short leaves only claims, which are released as attempts, so the next pass
looks for the copies already linked.

Each recipient is marked done only after stages 5 to 7 have all finished, and each is
idempotent (the forwarded copy is remembered, Maildir names are fixed, a reply is queued
in the same transaction that records the sender as answered), so a crash at any point
leads to a retry that neither loses nor duplicates.  It also means a message's replies
are in the queue before the message counts as delivered.
"""
from __future__ import annotations

import logging
import time
from email.message import Message as EmailHeaders

from gateway.config import Config
from gateway.delivery.stages import (
    autoreply,
    expand,
    forward,
    lmtp,
    mailbox,
    quarantine,
    review,
)
from gateway.mail import headers, outcome
from gateway.mail.outcome import Outcome
from gateway.office import notice
from gateway.office.directory import Directory
from gateway.policy import blocklist, size, virus
from gateway.policy.verdict import ACCEPT, DEFER_ACTION, Verdict
from gateway.policy.verdict import quarantine as quarantined
from spool.fsio import is_disk_full
from spool.maildir import Batch
from spool.policystate import PolicyState
from spool.queue import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    Message,
    Queue,
    Recipient,
    Recorded,
)

log = logging.getLogger("dialmail.deliver")

FETCHED = forward.FETCHED
DOUBLE_BOUNCE = "double-bounce"  # gateway.bounce.DOUBLE_BOUNCE: a failed null-sender message, for review

# Origins whose admission stages already ran at SMTP time, that we wrote ourselves, or that
# an administrator released from the quarantine.
SCREENED = ("smtp", autoreply.ORIGIN, notice.ORIGIN, DOUBLE_BOUNCE, quarantine.RELEASED)
DISK_FULL_RETRY = 60


def read_headers(queue: Queue, qid: str) -> EmailHeaders:
    """The header section of a queued message (bounded: see gateway.mail.headers)."""
    with queue.open_body(qid) as f:
        return headers.parse(headers.read(f))


class Pipeline:
    """Runs the stages for the claimed recipients of one queued message (in a worker thread)."""

    def __init__(self, config: Config, queue: Queue, directory: Directory, state: PolicyState | None = None):
        self.config = config
        self.settings = config.policy
        self.queue = queue
        self.directory = directory
        self.state = state or PolicyState.beside(queue)
        self.senders = blocklist.SenderFilter(self.settings.blocklist)
        self.scanner = virus.ClamdScanner(self.settings.virus)
        self.responder = autoreply.Responder(config, queue, directory, self.state)
        self._expired = 0.0
        # The batch since the last ``commit``: mailbox deliveries not yet recorded, and
        # their Maildir files not yet durable.
        self._delivered: dict[str, dict[str, Outcome]] = {}
        self._maildirs = Batch()

    # ------------------------------------------------------------ stages 1-3

    def admit(self, msg: Message, headers: EmailHeaders) -> Verdict:
        v = size.check(msg.size, self.settings.max_message_size)
        if v.accepted:
            v = self.senders.check(msg.sender, headers.get("From"))
        if v.accepted and self.scanner.enabled:
            if self.scanner.too_big(msg.size):
                log.warning("%s: not scanned for viruses: %d bytes is over virus max_scan_size %d", msg.id,
                            msg.size, self.settings.virus.max_scan_size)
            else:
                with self.queue.open_body(msg.id) as f:
                    result = self.scanner.scan_file(f)
                v = self.scanner.verdict(result, fetched=True, what=msg.id)
        if v.action == "reject":  # nobody to refuse to at delivery: keep it instead
            return quarantined(v.reason, v.virus)
        return v

    # ------------------------------------------------------------ the whole run

    # Outcomes made here are recorded without a reply code: no server said them, and a
    # bounce quotes them as dialmail's own (X-Dialmail), not as an SMTP reply.

    def run(self, msg: Message, rcpts: list[str]) -> None:
        self._expire_markers()
        by_rcpt = {r.rcpt: r for r in msg.recipients}
        headers = read_headers(self.queue, msg.id)
        verdict = ACCEPT if msg.origin in SCREENED else self.admit(msg, headers)
        if verdict.action == DEFER_ACTION:
            retry = time.time() + self.config.queue.retry_min
            for rcpt in rcpts:
                self.queue.record(msg.id, rcpt, DEFERRED, None, verdict.reply, next_retry=retry)
            return
        if not verdict.accepted:
            self._quarantine(msg, rcpts, verdict, retry=any(by_rcpt[r].attempts for r in rcpts))
            return
        for rcpt in rcpts:
            self._deliver(msg, by_rcpt[rcpt], headers)

    def _deliver(self, msg: Message, before: Recipient, headers: EmailHeaders) -> None:
        rcpt, retry = before.rcpt, before.attempts > 0
        if msg.origin == DOUBLE_BOUNCE:  # already the last resort: local Maildirs only, never out
            self._review(msg, rcpt, retry, None)
            return
        resolution = expand.resolve(self.directory, self.state, msg, rcpt)
        if resolution is None:
            if self._unreturnable(msg):
                self._review(msg, rcpt, retry, f"no local user or alias {rcpt}")
                return
            log.info("%s: to=<%s> status=bounced (no such local user)", msg.id, rcpt)
            self.queue.record(msg.id, rcpt, BOUNCED, None, "5.1.1 no such user here")
            return
        if resolution.refused_by:
            if self._unreturnable(msg):
                self._review(msg, rcpt, retry, f"<{msg.sender}> is not a member of {resolution.refused_by}, "
                                               f"which takes mail from its members only")
                return
            log.info("%s: to=<%s> status=bounced (<%s> is not a member of %s)", msg.id, rcpt, msg.sender,
                     resolution.refused_by)
            self.queue.record(msg.id, rcpt, BOUNCED, None, f"5.7.1 only members may post to {resolution.refused_by}")
            return
        done = []
        try:
            if resolution.remote:
                done.append(f"forwarded as {forward.forward(self.queue, self.state, msg, rcpt, resolution.remote, headers)}")
            if resolution.mailboxes and self.config.delivery.lmtp is not None:
                said = self._hand_over(msg, before, resolution.mailboxes, headers)
                if said is None:
                    return  # recorded as deferred, bounced or kept for review
                done.insert(0, said)
            else:
                for user in resolution.mailboxes:
                    path = mailbox.deliver(self.config.spool_dir, self.queue, msg, rcpt, user, retry, headers=headers,
                                           batch=self._maildirs)
                    log.info("%s: to=<%s> mailbox=%s status=delivered (%s)", msg.id, rcpt, user, path.name)
                if resolution.mailboxes:
                    done.insert(0, "delivered to mailbox")
        except OSError as exc:
            reason = "disk full" if is_disk_full(exc) else exc.strerror or str(exc)
            log.warning("%s: to=<%s> status=deferred (local delivery failed: %s)", msg.id, rcpt, reason)
            self.queue.record(msg.id, rcpt, DEFERRED, None, f"4.3.0 local delivery failed: {reason}",
                              next_retry=time.time() + DISK_FULL_RETRY)
            return
        try:
            self.responder.answer(msg, rcpt, resolution, headers)
        except Exception:  # a reply that cannot be built must not undo a delivery
            log.exception("%s: to=<%s>: automatic reply failed", msg.id, rcpt)
        self._delivered.setdefault(msg.id, {})[rcpt] = Outcome(
            DELIVERED, 250, "2.0.0", " and ".join(done) or "answered automatically")

    def commit(self) -> set[str]:
        """Make the batch durable: fsync its Maildir files side by side, link them into
        new/, fsync each new/ once, then record its recipients as delivered in one
        transaction; returns the messages that left the queue.

        Should this fail, the batch is dropped unrecorded: its claims are released as
        attempts and the next pass finds the copies already in the Maildirs.
        """
        delivered, self._delivered = self._delivered, {}
        self._maildirs.commit()
        return self.queue.record_deliveries(delivered) if delivered else set()

    def _hand_over(self, msg: Message, before: Recipient, mailboxes: tuple[str, ...] | list[str],
                   headers: EmailHeaders) -> str | None:
        """Stage 6 by LMTP; what to say of the delivery, or None when the recipient was
        recorded otherwise: deferred when any mailbox's reply was temporary (the retry
        skips the mailboxes already handed over), else bounced or kept for review, as a
        local failure is, when the server refused a mailbox for good."""
        rcpt, target, settings = before.rcpt, self.config.delivery.lmtp, self.config.delivery
        known = self.state.handed_over(msg.id, rcpt)
        todo = [box for box in mailboxes if box not in known]
        name = lmtp.delivery_name(msg, rcpt)
        for box in (box for box in mailboxes if known.get(box) is False):  # sent, and no reply recorded
            found = lmtp.stored(settings.doveadm, box, name) if settings.doveadm else False
            if found is None:
                why = Outcome(DEFERRED, 451, "4.3.0", f"cannot tell whether {target} stored the copy for {box} "
                                                      f"sent before (doveadm search failed); asking again later")
                log.warning("%s: to=<%s> mailbox=%s status=deferred (%s)", msg.id, rcpt, box, why.reply)
                self.queue.record(msg.id, rcpt, DEFERRED, why.code, why.reply,
                                  next_retry=time.time() + self.config.queue.retry_min)
                return None
            if found:
                log.info("%s: to=<%s> mailbox=%s: the copy sent before was stored (its reply was lost); "
                         "not sending it again", msg.id, rcpt, box)
                self.state.taken(msg.id, rcpt, [box])
            else:
                todo.append(box)
        if todo:
            self.state.sending(msg.id, rcpt, todo)
        results = lmtp.hand_over(target, settings.lmtp_timeout, self.config.server.hostname,
                                 self.queue, msg, rcpt, todo, headers) if todo else {}
        taken = [box for box, o in results.items() if o.status == DELIVERED]
        if taken:
            self.state.taken(msg.id, rcpt, taken)
        refused = [box for box, o in results.items() if o.status != DELIVERED and not o.dropped]
        if refused:
            self.state.not_taken(msg.id, rcpt, refused)
        for box in taken:
            log.info("%s: to=<%s> mailbox=%s status=delivered (%s: %s)", msg.id, rcpt, box, target,
                     results[box].reply)
        failed = [(box, o) for box, o in results.items() if o.status != DELIVERED]
        deferred = [(box, o) for box, o in failed if o.status == DEFERRED]
        if deferred:
            box, o = deferred[0]
            log.warning("%s: to=<%s> mailbox=%s status=deferred (%s)", msg.id, rcpt, box, o.reply)
            now = time.time()
            self.queue.record(msg.id, rcpt, DEFERRED, o.code, o.reply,
                              next_retry=outcome.next_retry(o, before.last_reply, before.attempts, now,
                                                            self.config.queue.retry_min,
                                                            self.config.queue.retry_max))
            return None
        if failed:
            box, o = failed[0]
            if self._unreturnable(msg):
                self._review(msg, rcpt, before.attempts > 0, f"mailbox {box}: {o.reply}")
            else:
                log.info("%s: to=<%s> mailbox=%s status=bounced (%s)", msg.id, rcpt, box, o.reply)
                self.queue.record(msg.id, rcpt, BOUNCED, o.code, o.reply)
            return None
        return f"delivered by LMTP to {target}"

    def _unreturnable(self, msg: Message) -> bool:
        """Fetched mail (the ISP's copy is gone), null-sender mail, and mail from outside whose
        sender may be forged: a failure has nobody (safe) to go back to, so it is kept for
        review instead of bounced (gateway.delivery.stages.review)."""
        return msg.origin == FETCHED or not msg.sender or not review.sender_trusted(self.config, msg)

    def _review(self, msg: Message, rcpt: str, retry: bool, reason: str | None) -> None:
        try:
            paths = review.keep(self.config, self.directory, self.queue, msg, rcpt, reason, retry)
        except OSError as exc:
            why = "disk full" if is_disk_full(exc) else exc.strerror or str(exc)
            log.warning("%s: to=<%s> status=deferred (keeping it for review failed: %s)", msg.id, rcpt, why)
            self.queue.record(msg.id, rcpt, DEFERRED, None, f"4.3.0 local delivery failed: {why}",
                              next_retry=time.time() + DISK_FULL_RETRY)
            return
        where = ", ".join(p.parent.parent.name for p in paths)
        if reason:
            log.warning("%s: from=<%s> to=<%s> status=kept for review in %s (%s)", msg.id, msg.sender, rcpt,
                        where, reason)
        else:
            log.info("%s: to=<%s> mailbox=%s status=delivered (%s)", msg.id, rcpt, where,
                     ", ".join(p.name for p in paths))
        self.queue.record(msg.id, rcpt, DELIVERED, 250,
                          f"2.0.0 kept for review in {where}: {reason}" if reason else f"2.0.0 delivered to {where}")

    def _quarantine(self, msg: Message, rcpts: list[str], verdict: Verdict, retry: bool) -> None:
        try:
            path = quarantine.keep(self.config.spool_dir, self.queue, msg, rcpts, verdict.reason, retry)
        except OSError as exc:
            log.warning("%s: quarantine failed (%s); deferred", msg.id, exc.strerror or exc)
            for rcpt in rcpts:
                self.queue.record(msg.id, rcpt, DEFERRED, None, "4.3.0 quarantine failed",
                                  next_retry=time.time() + DISK_FULL_RETRY)
            return
        log.warning("%s: from=<%s> to=<%s> status=quarantined (%s) in %s", msg.id, msg.sender, ",".join(rcpts),
                    verdict.reason, path)
        # Kept is delivered: one commit for all of them, the postmaster's notice included.
        kept = Outcome(DELIVERED, 250, "2.0.0", f"quarantined: {verdict.reason}")
        done = Recorded(msg.id, {rcpt: kept for rcpt in rcpts})
        if verdict.virus and self.settings.virus.notify_postmaster:
            notice.notify_postmaster(
                self.config, self.directory, self.queue, f"Virus found in fetched mail: {verdict.virus}",
                f"A message fetched for {', '.join(rcpts)} contained a virus and was quarantined.\n\n"
                f"  queue id:  {msg.id}\n  sender:    <{msg.sender}>\n  subject:   {msg.subject or ''}\n"
                f"  virus:     {verdict.virus}\n  kept in:   {path}\n", then=done)
        else:
            self.queue.record_outcomes(msg.id, done.outcomes)

    def _expire_markers(self) -> None:
        now = time.monotonic()
        if now - self._expired > 3600:
            self._expired = now
            self.state.expire()
