"""Stage 7, automatic replies: autoresponder addresses and out-of-office, per RFC 3834.

Who answers:
* an address in ``[autoreply]`` answers every message with its stored document (a whole
  MIME message, attachments allowed; its Subject and body are sent, addressing headers
  are replaced);
* a user with an active out-of-office (``dialmail users vacation`` in the spool, else
  ``[vacation.USER]``) answers mail that reached their mailbox.

When not to answer (RFC 3834 §2, §3.1): the null sender, MAILER-DAEMON, postmaster,
owner-*/*-request senders, mail marked ``Auto-Submitted`` (anything but "no"), mailing
lists (``List-Id`` and the other ``List-*`` headers, ``Precedence: bulk/list/junk``),
Microsoft's ``X-Auto-Response-Suppress``, one's own address, a sender already
answered by the same address within ``every`` (persisted in the spool), and mail that
does not name the recipient in To/Cc/Bcc (or their Resent- forms): the envelope
recipient, the answering address, or an address that leads to the same mailbox (RFC 3834
§2; an old-style list without List-* headers names only itself).

The reply's Subject is "Auto: " and the original subject (RFC 3834 §3.1.5) unless the
admin fixed one (``subject`` of the out-of-office, the Subject of an autoresponder's
document).

The reply goes out through the queue like any message, to the original envelope sender,
from the null envelope sender (RFC 3834 §3.3: a reply from the null sender can be
neither answered by another responder nor bounced back into a loop), with
``Auto-Submitted: auto-replied``, ``In-Reply-To`` and ``References``; its From: is the
answering address.
"""
from __future__ import annotations

import datetime as dt
import email.policy
import email.utils
import logging
import time
from email.message import EmailMessage
from email.message import Message as EmailHeaders
from email.parser import BytesParser

from gateway.config import Config
from gateway.config.policy import Vacation
from gateway.delivery.stages import review
from gateway.mail import address
from gateway.office.directory import Directory, Resolution
from spool.policystate import PolicyState, Replied
from spool.queue import LOCAL, RELAY, Message, Queue

log = logging.getLogger("dialmail.autoreply")

ORIGIN = "autoreply"
TRUSTED = "trusted"
_REPLACED = ("From", "To", "Cc", "Bcc", "Date", "Message-ID", "In-Reply-To", "References", "Auto-Submitted",
             "Return-Path", "Delivered-To", "Received", "Reply-To", "Sender")
_CRLF = email.policy.compat32.clone(linesep="\r\n")


def reason_not_to_answer(sender: str, headers: EmailHeaders, responder: str) -> str | None:
    """Why this message must not get an automatic reply, or None when it may."""
    if not sender:
        return "null sender"
    if address.is_null_or_daemon(sender):
        return "sender is a daemon or list address"
    auto = str(headers.get("Auto-Submitted", "") or "").strip().lower()
    if auto and not auto.startswith("no"):
        return f"Auto-Submitted: {auto}"
    if any(k.lower().startswith("list-") for k in headers.keys()):
        return "mailing list (List-* header)"
    if str(headers.get("Precedence", "") or "").strip().lower() in ("bulk", "list", "junk"):
        return f"Precedence: {headers.get('Precedence')}"
    suppress = str(headers.get("X-Auto-Response-Suppress", "") or "").lower()
    if any(w in suppress for w in ("all", "oof", "autoreply")):
        return "X-Auto-Response-Suppress"
    if address.normalise(sender).lower() == responder.lower():
        return "sender is the responder"
    return None


_RECIPIENT_FIELDS = ("To", "Cc", "Bcc", "Resent-To", "Resent-Cc", "Resent-Bcc")


def named_recipients(headers: EmailHeaders) -> set[str]:
    """Every address in the message's recipient fields, normalised and lower-cased."""
    values = [str(v) for name in _RECIPIENT_FIELDS for v in (headers.get_all(name) or [])]
    return {address.normalise(a).lower() for _, a in email.utils.getaddresses(values) if "@" in a}


def auto_subject(orig: EmailHeaders) -> str:
    """RFC 3834 §3.1.5: "Auto: " followed by the subject of the message answered."""
    subject = " ".join(str(orig.get("Subject", "") or "").split())
    return f"Auto: {subject}" if subject else "Auto: Out of office"


def _threading(orig: EmailHeaders) -> dict[str, str]:
    out = {}
    mid = str(orig.get("Message-ID", "") or "").strip()
    if mid:
        out["In-Reply-To"] = mid
        refs = " ".join(str(orig.get("References", "") or "").split())
        out["References"] = f"{refs} {mid}".strip()
    return out


def vacation_reply(config: Config, responder: str, to: str, vac: Vacation, orig: EmailHeaders) -> bytes:
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = responder
    msg["To"] = to
    msg["Subject"] = vac.subject or auto_subject(orig)
    msg["Date"] = email.utils.formatdate(time.time(), localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=config.server.hostname)
    for k, v in _threading(orig).items():
        msg[k] = v
    msg["Auto-Submitted"] = "auto-replied"
    msg.set_content(vac.body)
    return msg.as_bytes()


def document_reply(config: Config, responder: str, to: str, document: bytes, orig: EmailHeaders) -> bytes:
    """The stored MIME document with fresh addressing and RFC 3834 headers; its body untouched."""
    doc = BytesParser(policy=email.policy.compat32).parsebytes(document)
    for name in _REPLACED:
        del doc[name]
    head = [("From", responder), ("To", to), ("Date", email.utils.formatdate(time.time(), localtime=True)),
            ("Message-ID", email.utils.make_msgid(domain=config.server.hostname)),
            *_threading(orig).items(), ("Auto-Submitted", "auto-replied")]
    for name, value in reversed(head):
        doc._headers.insert(0, (name, value))  # new headers first, the document's own after
    if "Subject" not in doc:
        doc["Subject"] = auto_subject(orig)
    if "MIME-Version" not in doc:
        doc["MIME-Version"] = "1.0"
    return doc.as_bytes(policy=_CRLF)


class Responder:
    def __init__(self, config: Config, queue: Queue, directory: Directory, state: PolicyState):
        self.config = config
        self.queue = queue
        self.directory = directory
        self.state = state
        self.policy = config.policy

    def vacation(self, user: str, now: float | None = None) -> Vacation | None:
        """The user's out-of-office if it is on now: the spool's setting wins over the config's."""
        now = time.time() if now is None else now
        stored = self.state.vacation(user)
        if stored is not None:
            if not stored.enabled:
                return None
            if (stored.start is not None and now < stored.start) or (stored.end is not None and now >= stored.end):
                return None
            return Vacation(user, None, None, stored.subject or None, stored.body or "",
                            stored.every or self.policy.autoreply_every)
        vac = self.policy.vacations.get(user)
        if vac is None or not vac.active(dt.datetime.fromtimestamp(now)):
            return None
        return vac

    def answer(self, msg: Message, rcpt: str, resolution: Resolution, headers: EmailHeaders) -> list[str]:
        """Queue the replies this delivery calls for; returns their queue ids."""
        queued = []
        domain = address.split(rcpt)[1]
        named = named_recipients(headers)
        envelope_named = address.normalise(rcpt).lower() in named
        auto = self.policy.autoresponders.get(address.normalise(rcpt).lower())
        if auto is not None:
            addressed = envelope_named or auto.address.lower() in named
            qid = self._reply(msg, auto.address, auto.every, headers, addressed,
                              lambda to: document_reply(self.config, auto.address, to, auto.file.read_bytes(),
                                                        headers))
            queued += [qid] if qid else []
        for user in resolution.mailboxes:
            vac = self.vacation(user)
            if vac is None:
                continue
            responder = user if "@" in user else f"{user}@{domain}"
            addressed = envelope_named or responder.lower() in named or self._leads_to(named, user)
            qid = self._reply(msg, responder, vac.every, headers, addressed,
                              lambda to: vacation_reply(self.config, responder, to, vac, headers))
            queued += [qid] if qid else []
        return queued

    def _leads_to(self, named: set[str], user: str) -> bool:
        """Whether one of the local addresses ``named`` delivers to ``user``'s mailbox (an alias,
        a group, the user at another local domain)."""
        for addr in named:
            if self.directory.is_local(addr):
                res = self.directory.resolve(addr)
                if res is not None and user in res.mailboxes:
                    return True
        return False

    def _reply(self, msg: Message, responder: str, every: int, headers: EmailHeaders, addressed: bool,
               build) -> str | None:
        sender = address.normalise(msg.sender)
        why = reason_not_to_answer(sender, headers, responder)
        if why is None and not addressed:
            why = f"not addressed to {responder} in To/Cc/Bcc"
        now = time.time()
        if why is None and self.state.replied_since(responder, sender, now - every):
            why = "already answered recently"
        if why is None and self.directory.is_local(sender) and not self.directory.exists(sender):
            why = "local sender address does not exist"
        if why is None and self.policy.autoreply_to == TRUSTED and not review.sender_trusted(self.config, msg):
            why = "unauthenticated mail from outside mynetworks: its sender may be forged ([policy] autoreply_to)"
        if why:
            log.info("%s: no automatic reply from <%s> to <%s>: %s", msg.id, responder, sender or "", why)
            return None
        route = LOCAL if self.directory.is_local(sender) else RELAY
        body = build(sender)
        qid = self.queue.enqueue("", [(sender, route)], body, origin=ORIGIN, client=msg.id,
                                 subject=None, then=Replied(responder, sender, now))
        log.info("%s: automatic reply from <%s> to <%s> queued as %s", msg.id, responder, sender, qid)
        return qid
