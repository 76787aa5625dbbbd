"""Delivery outcomes as values: what one SMTP reply or failure means for a recipient.

Pure functions, no sockets: the relay turns every reply, refusal, timeout and lost
connection into an ``Outcome`` here and stores it; nothing downstream reads exception
text.  A recipient is *final* (delivered or bounced) or *deferred* (tried again after a
back-off that doubles from ``retry_min`` up to ``retry_max``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from spool.queue import BOUNCED, DEFERRED, DELIVERED

_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass(frozen=True)
class Outcome:
    """One recipient's result: spool status, SMTP code, RFC 3463 status, reason text."""
    status: str  # DELIVERED | DEFERRED | BOUNCED
    # the reply code a server gave; None when dialmail decided it itself (no server said it,
    # so a bounce must not quote it as an SMTP reply)
    code: int | None
    dsn: str  # RFC 3463 "x.y.z"
    reason: str
    # The line or connection failed while this message was in flight: no verdict of the
    # server on the message, so it is due again at once (see ``next_retry``).
    dropped: bool = False

    @property
    def final(self) -> bool:
        return self.status != DEFERRED

    @property
    def said(self) -> str:
        """For people: ``"550 5.1.1 no such user"``, or the reply alone when dialmail made it."""
        return f"{self.code} {self.reply}" if self.code else self.reply

    @property
    def reply(self) -> str:
        """The text stored in the spool and quoted in bounces: ``"5.1.1 no such user"``."""
        return self.reason if self.reason.startswith(self.dsn) else f"{self.dsn} {self.reason}"


def enhanced_status(code: int, text: str) -> str:
    """The RFC 3463 status in a reply text, or one derived from the basic code."""
    m = _ENHANCED.match(text or "")
    if m and m.group(1) == str(code)[0]:
        return ".".join(m.groups())
    return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(code // 100, "4.0.0")


def from_reply(code: int, text: str) -> Outcome:
    """Classify a server reply: 2xx delivered, 4xx deferred, 5xx bounced."""
    text = " ".join((text or "").split())
    dsn = enhanced_status(code, text)
    if 200 <= code < 300:
        return Outcome(DELIVERED, code, dsn, text)
    if 500 <= code < 600:
        return Outcome(BOUNCED, code, dsn, text)
    # 4xx and anything unexpected (1xx, 3xx where a final reply belongs) is worth another try
    return Outcome(DEFERRED, code, dsn, text)


# Outcomes that do not come from a reply of the server, named once.

def lost_connection(what: str) -> Outcome:
    """Connection lost, timed out or carrier dropped: the server may or may not have the message."""
    return Outcome(DEFERRED, None, "4.4.2", f"lost connection with the mail server {what}", dropped=True)


def timed_out(what: str) -> Outcome:
    return Outcome(DEFERRED, None, "4.4.2", f"timed out {what}", dropped=True)


def cannot_connect(detail: str) -> Outcome:
    return Outcome(DEFERRED, None, "4.4.1", f"cannot connect to the mail server: {detail}")


def tls_required_not_offered(host: str) -> Outcome:
    return Outcome(DEFERRED, None, "4.7.4", f"TLS is required but {host} does not offer STARTTLS "
                                            "(smarthost starttls = \"required\")")


def tls_failed(detail: str) -> Outcome:
    return Outcome(DEFERRED, None, "4.7.5", f"TLS with the mail server failed: {detail}")


def auth_failed(code: int, detail: str) -> Outcome:
    # A wrong password is the office's problem, not the recipient's: never bounce for it.
    return Outcome(DEFERRED, code or 535, "4.7.8", f"authentication at the mail server failed: {detail}")


def too_big(size: int, limit: int) -> Outcome:
    return Outcome(BOUNCED, None, "5.3.4", f"message size {size} exceeds the size limit {limit} of the mail server")


def smtputf8_not_offered(host: str) -> Outcome:
    return Outcome(BOUNCED, None, "5.6.7", f"the message needs SMTPUTF8 (non-ASCII addresses or headers) but "
                                          f"{host} does not support it")


def not_convertible_to_7bit(host: str, why: str) -> Outcome:
    """8-bit data for a smarthost without 8BITMIME that no re-encoding can carry unchanged:
    deferred, as the smarthost may offer 8BITMIME on another day; the queue lifetime ends it."""
    return Outcome(DEFERRED, None, "4.6.3", f"{host} does not offer 8BITMIME and the message cannot be "
                                           f"converted to 7-bit: {why}")


def expired(lifetime: int, last_code: int | None, last_reply: str | None) -> Outcome:
    """A recipient still waiting at the end of the queue lifetime, reported as Postfix does:
    with the last temporary error (its status, and the server's reply when a server gave
    it), or 4.4.7 when it never got one."""
    days = lifetime / 86400
    span = f"{days:g} days" if days >= 1 else f"{lifetime // 3600 or 1} hours" if lifetime >= 3600 \
        else f"{lifetime} seconds"
    why = f"message expired after {span} in the queue"
    if not last_reply:
        return Outcome(BOUNCED, None, "4.4.7", why)
    status = enhanced_status(last_code or 451, last_reply)
    if not status.startswith("4"):
        status = "4.4.7"
    return Outcome(BOUNCED, last_code, status, f"{last_reply} ({why})")


def body_missing(qid: str) -> Outcome:
    """The queue still lists the message but its file is gone (removed by hand, a damaged
    disk): nothing can be sent or delivered.  Deferred, so it waits visibly in the queue for
    the administrator and expires with the queue lifetime like any message."""
    return Outcome(DEFERRED, None, "4.3.0", f"the message file queue/msg/{qid} is missing from the spool; "
                                           "nothing to deliver until it is restored")


def stopped_early() -> Outcome:
    """The flush was asked to stop (an interrupt, the session's max_time) between messages."""
    return Outcome(DEFERRED, None, "4.4.2", "the session was stopped; the rest waits for the next one")


def spool_full(what: str) -> Outcome:
    """The spool's disk has no room to record what happens to the mail (RFC 3463 4.3.1)."""
    return Outcome(DEFERRED, None, "4.3.1", f"the spool's disk is full ({what}); the mail waits until there is room")


def administrator_bounce() -> Outcome:
    return Outcome(BOUNCED, None, "5.0.0", "deleted by the administrator")


# Refusals that are about this office as a client (its HELO name, its missing AUTH, its
# envelope sender, its address) rather than about a recipient: the same refusal would
# meet every message, so they defer with the reason instead of bouncing mail that a
# fixed configuration would deliver.  The texts are Postfix's, Exim's, Microsoft's and
# Google's wording for HELO/EHLO, AUTH required, relay access and sender restrictions.
_CLIENT_TEXT = re.compile(
    r"\b(?:helo|ehlo)\b|relay(?:ing)?\s+(?:access\s+)?(?:denied|not\s+permitted|prohibited|not\s+allowed)"
    r"|authenticat|\bauth\b|client\s+host\s+rejected|sender\s+address\s+rejected|not\s+owned\s+by"
    r"|send\s+as\b|send\s+mail\s+as|starttls\s+command\s+first|must\s+issue\s+a\s+starttls",
    re.IGNORECASE)
_CLIENT_DSN = ("5.7.0", "5.7.8", "5.7.57", "5.7.60")
MAIL_STAGE = "mail"
RCPT_STAGE = "rcpt"


def refuses_client(o: Outcome, stage: str) -> bool:
    """A permanent refusal at MAIL or RCPT that is about us, not about the recipient.

    At MAIL FROM nothing is known of the recipients yet, so every refusal there is about
    the sender or the client, except one for the message's size.
    """
    if o.status != BOUNCED:
        return False
    if stage == MAIL_STAGE:
        return not (o.code == 552 or o.dsn == "5.3.4")
    return o.code == 530 or o.dsn in _CLIENT_DSN or bool(_CLIENT_TEXT.search(o.reason))


def client_refused(o: Outcome, where: str) -> Outcome:
    """Defer a refusal of this office as a client, keeping the server's words as the reason."""
    return Outcome(DEFERRED, o.code, "4" + o.dsn[1:],
                   f"{where} refused this office, not the recipient: {o.code} {o.reason} "
                   "(check [server] hostname, [smarthost] username/password and [smarthost.rewrite]; "
                   "the mail stays queued)")


def next_retry(o: Outcome, previous_reply: str | None, attempts: int, now: float, retry_min: int,
               retry_max: int) -> float:
    """When a deferred recipient is due again.

    A server's 4xx backs off, doubling from ``retry_min`` to ``retry_max``.  A message in
    flight when the line dropped is due at once -- the dial session paces its own retries
    and a flaky modem line says nothing about the message -- unless it was also in flight
    at the previous drop: then it backs off too, so one message that keeps killing the
    connection cannot hold up the whole queue at the head of every session.
    """
    if o.dropped and not (previous_reply or "").startswith(o.dsn + " "):
        return now
    return now + retry_delay(attempts, retry_min, retry_max)


def retry_delay(attempts: int, retry_min: int, retry_max: int) -> int:
    """Seconds before the next try after ``attempts`` earlier tries (0 = first failure)."""
    return min(retry_max, retry_min * (2 ** min(max(attempts, 0), 30)))
