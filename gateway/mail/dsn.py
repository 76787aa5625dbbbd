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
SMTP_DIAGNOSTIC = "smtp"  # a server's reply
LOCAL_DIAGNOSTIC = "X-Dialmail"  # decided here (no server said it), as Postfix writes X-Postfix
MAX_HEADER_BYTES = 64 * 1024  # of the original, returned as text/rfc822-headers


@dataclass(frozen=True)
class Entry:
    """One recipient line of a DSN."""
    rcpt: str
    orcpt: str | None
    status: str  # RFC 3463 x.y.z
    diagnostic: str | None  # "550 5.1.1 no such user" (the server's reply), dialmail's own words, or None
    diagnostic_type: str = SMTP_DIAGNOSTIC  # RFC 3464 §2.3.6: who said ``diagnostic``


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
    # RFC 6533: UTF-8 addresses or headers make it a "global" report throughout
    utf8 = not all(x.isascii() for e in entries for x in (e.rcpt, e.orcpt or "")) or not sender.isascii() \
        or not headers.split(original_headers, MAX_HEADER_BYTES)[0].isascii()
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
    # RFC 6522 §3: report-type names the second part's subtype
    report.set_param("report-type", "global-delivery-status" if utf8 else "delivery-status")
    report.preamble = "This is a MIME-encapsulated message."
    notification, = report.get_payload()
    notification["Content-Description"] = "Notification"
    bodies: dict[str, bytes] | None = {} if utf8 else None
    report.attach(_status_part(hostname, qid, arrival, action, entries, retry_until, policy, bodies))
    placeholder = f"dialmail-original-{secrets.token_hex(16)}"
    if whole_message:
        original = EmailMessage(policy=policy)
        original["Content-Description"] = "Undelivered Message"
        inner = Message()
        inner["X-Dialmail-Placeholder"] = placeholder
        original.set_type("message/global" if utf8 else "message/rfc822")
        original["Content-Transfer-Encoding"] = "8bit"
        original.set_payload([inner])
        report.attach(original)
    else:
        part = EmailMessage(policy=policy)
        part["Content-Description"] = "Undelivered Message Headers"
        part["Content-Type"] = "message/global-headers" if utf8 else "text/rfc822-headers"
        part["Content-Transfer-Encoding"] = "8bit"
        block = headers.crlf(headers.split(original_headers, MAX_HEADER_BYTES)[0])
        if bodies is None:
            part.set_payload(block.decode("ascii", "surrogateescape"))
        else:
            part.set_payload(_utf8_body(block, bodies))
        report.attach(part)
    data = report.as_bytes()
    for token, body in (bodies or {}).items():
        data = data.replace(token.encode(), body.rstrip(b"\r\n"), 1)
    if not whole_message:
        return Report(data)
    marker = f"X-Dialmail-Placeholder: {placeholder}\r\n\r\n".encode()
    head, _, tail = data.partition(marker)
    return Report(head, b"\r\n" + tail)


def _status_part(hostname: str, qid: str, arrival: float, action: str, entries: list[Entry],
                 retry_until: float | None, policy, bodies: dict[str, bytes] | None) -> EmailMessage:
    """The report part; ``bodies`` (for a global report) receives its UTF-8 body."""
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
            block["Diagnostic-Code"] = f"{e.diagnostic_type}; {e.diagnostic}"
        if action == DELAYED and retry_until is not None:
            block["Will-Retry-Until"] = email.utils.formatdate(retry_until, localtime=True)
        blocks.append(block)
    part = EmailMessage(policy=policy)
    part["Content-Description"] = "Delivery report"
    if bodies is None:
        part.set_type("message/delivery-status")
        part.set_payload(blocks)
        return part
    # message/global-delivery-status (RFC 6533 §6.2): the same blocks as UTF-8 text.  The
    # email package knows only message/delivery-status as blocks and writes any other
    # message/* body as ASCII, so the part holds a token that ``build`` replaces.
    part["Content-Type"] = "message/global-delivery-status"
    part["Content-Transfer-Encoding"] = "8bit"
    text = "\r\n".join("".join(f"{name}: {value}\r\n" for name, value in b.items()) for b in blocks)
    part.set_payload(_utf8_body(text.encode("utf-8"), bodies))
    return part


def _utf8_body(data: bytes, bodies: dict[str, bytes]) -> str:
    """A token for the body of a message/global-* part, which ``build`` swaps for ``data``."""
    token = f"dialmail-utf8-body-{secrets.token_hex(16)}"
    bodies[token] = data
    return token


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
