"""Delivery status notifications (RFC 3464), composed with the email package.

``build`` makes the ``multipart/report; report-type=delivery-status`` a bounce or a
delay warning is: a human-readable notification, the machine-readable report, and the
original's header block (``text/rfc822-headers``).  A report for the postmaster about a
null-sender message carries the whole original instead (``message/rfc822``); since
that can be as large as any message, ``build`` then returns the report in two halves
for the caller to stream the original between, straight from the spool file.
"""
from __future__ import annotations

import email.utils
import secrets
import time
from dataclasses import dataclass
from email.message import EmailMessage, Message
from email.policy import SMTP, SMTPUTF8

from gateway.mail import address, headers

FAILED = "failed"
DELAYED = "delayed"
MAX_HEADER_BYTES = 64 * 1024  # of the original, returned as text/rfc822-headers


@dataclass(frozen=True)
class Entry:
    """One recipient line of a DSN."""
    rcpt: str
    orcpt: str | None
    status: str  # RFC 3463 x.y.z
    diagnostic: str | None  # "550 5.1.1 no such user" (the server's reply) or None


@dataclass(frozen=True)
class Report:
    """A built DSN: ``head`` then (for a whole-message report) the original, then ``tail``."""
    head: bytes
    tail: bytes = b""

    def __bytes__(self) -> bytes:
        return self.head + self.tail


def build(*, hostname: str, sender: str, qid: str, arrival: float, action: str, entries: list[Entry],
          original_headers: bytes = b"", now: float | None = None, retry_until: float | None = None,
          whole_message: bool = False) -> Report:
    """The DSN to ``sender`` about ``entries`` (see the module doc for ``whole_message``)."""
    now = time.time() if now is None else now
    utf8 = not all(x.isascii() for e in entries for x in (e.rcpt, e.orcpt or "")) or not sender.isascii()
    policy = SMTPUTF8 if utf8 else SMTP
    report = EmailMessage(policy=policy)
    report["From"] = f"Mail Delivery System <{address.MAILER_DAEMON}@{hostname}>"
    report["To"] = f"<{sender}>"
    report["Subject"] = ("Undelivered Mail Returned to Postmaster" if whole_message
                         else "Undelivered Mail Returned to Sender" if action == FAILED
                         else "Delayed Mail (still being retried)")
    report["Date"] = email.utils.formatdate(now, localtime=True)
    report["Message-ID"] = f"<{qid}.{int(now)}.{secrets.token_hex(4)}@{hostname}>"
    report["Auto-Submitted"] = "auto-replied"
    report.set_content(_explanation(hostname, action, entries, retry_until, to_postmaster=whole_message),
                       charset="utf-8", cte="8bit")
    report.make_mixed()
    report.set_type("multipart/report")
    report.set_param("report-type", "delivery-status")
    report.preamble = "This is a MIME-encapsulated message."
    notification, = report.get_payload()
    notification["Content-Description"] = "Notification"
    report.attach(_status_part(hostname, qid, arrival, action, entries, retry_until, policy))
    placeholder = f"dialmail-original-{secrets.token_hex(16)}"
    if whole_message:
        original = EmailMessage(policy=policy)
        original["Content-Description"] = "Undelivered Message"
        inner = Message()
        inner["X-Dialmail-Placeholder"] = placeholder
        original.set_type("message/rfc822")
        original["Content-Transfer-Encoding"] = "8bit"
        original.set_payload([inner])
        report.attach(original)
    else:
        part = EmailMessage(policy=policy)
        part["Content-Description"] = "Undelivered Message Headers"
        part["Content-Type"] = "text/rfc822-headers"
        part["Content-Transfer-Encoding"] = "8bit"
        block = headers.crlf(headers.split(original_headers, MAX_HEADER_BYTES)[0])
        part.set_payload(block.decode("ascii", "surrogateescape"))
        report.attach(part)
    data = report.as_bytes()
    if not whole_message:
        return Report(data)
    marker = f"X-Dialmail-Placeholder: {placeholder}\r\n\r\n".encode()
    head, _, tail = data.partition(marker)
    return Report(head, b"\r\n" + tail)


def _status_part(hostname: str, qid: str, arrival: float, action: str, entries: list[Entry],
                 retry_until: float | None, policy) -> EmailMessage:
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {hostname}"
    per_message["X-Dialmail-Queue-ID"] = qid
    per_message["Arrival-Date"] = email.utils.formatdate(arrival, localtime=True)
    blocks = [per_message]
    for e in entries:
        block = Message()
        block["Final-Recipient"] = f"{_addr_type(e.rcpt)}; {e.rcpt}"
        if e.orcpt and e.orcpt != e.rcpt:
            block["Original-Recipient"] = f"{_addr_type(e.orcpt)}; {e.orcpt}"
        block["Action"] = action
        block["Status"] = e.status
        if e.diagnostic:
            block["Diagnostic-Code"] = f"smtp; {e.diagnostic}"
        if action == DELAYED and retry_until is not None:
            block["Will-Retry-Until"] = email.utils.formatdate(retry_until, localtime=True)
        blocks.append(block)
    part = EmailMessage(policy=policy)
    part["Content-Description"] = "Delivery report"
    part.set_type("message/delivery-status")
    part.set_payload(blocks)
    return part


def _addr_type(addr: str) -> str:
    return "rfc822" if addr.isascii() else "utf-8"


def _explanation(hostname: str, action: str, entries: list[Entry], retry_until: float | None,
                 to_postmaster: bool = False) -> str:
    if to_postmaster:
        lines = [f"This is the mail system at {hostname}.", "",
                 "A message from the null sender (a bounce, an automatic reply or a notice)",
                 "could not be delivered to the recipients below, and there is nobody to",
                 "return it to. It is attached in full, so nothing is lost.", ""]
    elif action == FAILED:
        lines = [f"This is the mail system at {hostname}.", "",
                 "I'm sorry to have to inform you that your message could not",
                 "be delivered to one or more recipients. It's attached below.", "",
                 "For further assistance, please send mail to postmaster.", ""]
    else:
        until = email.utils.formatdate(retry_until, localtime=True) if retry_until else "a few days"
        lines = [f"This is the mail system at {hostname}.", "",
                 "####################################################################",
                 "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
                 "####################################################################", "",
                 "Your message could not be delivered yet to the recipients below.",
                 f"The mail system will keep trying until {until}.", ""]
    for e in entries:
        lines.append(f"<{e.rcpt}>: {e.diagnostic or e.status}")
    return "\n".join(lines) + "\n"
