"""The notice a recipient gets about a copy the size policy kept out of the session.

Sent once per copy and outcome (the fetch state records it in the same transaction), so
the recipient learns what happened and what to do, instead of mail silently missing.
"""
from __future__ import annotations

from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, make_msgid

from gateway.config import FetchConfig
from gateway.fetch.envelope import first
from gateway.fetch.plan import DEFERRED, DELETED_OVERSIZE, LEFT, format_window

ORIGIN = "fetch-notice"

_SUBJECTS = {LEFT: "Message too large, left at the ISP",
             DEFERRED: "Large message will be fetched off-peak",
             DELETED_OVERSIZE: "Message too large, deleted at the ISP"}


@dataclass(frozen=True)
class OversizeNotice:
    subject: str
    data: bytes


def oversize_notice(account: FetchConfig, folder: str, size: int, block: bytes, outcome: str,
                    recipients: list[str], hostname: str, now: float) -> OversizeNotice:
    """The notice about one copy of ``size`` bytes (header block ``block``) and its ``outcome``."""
    limit = account.max_message_size or 0
    what = {
        LEFT: "It has been left on the ISP's server; ask the administrator to fetch it another way "
              "or the sender to send a smaller message.",
        DEFERRED: f"It will be fetched during the off-peak window "
                  f"{format_window(account.offpeak) if account.offpeak else ''} (local time).",
        DELETED_OVERSIZE: "It has been deleted from the ISP's server unread; ask the sender to send "
                          "it another way.",
    }[outcome]
    lines = [f"A message for you is larger than this office fetches over its link "
             f"({size} bytes; the limit is {limit} bytes).", "", what, ""]
    for name in ("from", "subject", "date", "message-id"):
        value = first(block, name)
        if value:
            lines.append(f"  {name.title()}: {_one_line(value)}")
    lines += [f"  Size: {size} bytes", f"  Mailbox: {account.name} ({account.username}@{account.host}) {folder}", ""]
    subject = _SUBJECTS[outcome]
    msg = EmailMessage(policy=SMTP)
    msg["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = f"{subject} ({size // 1000} kB)"
    msg["Date"] = formatdate(now, localtime=True)
    msg["Message-ID"] = make_msgid("fetch", domain=hostname)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content("\n".join(lines) + "\n", charset="utf-8", cte="8bit")
    return OversizeNotice(subject, msg.as_bytes())


def _one_line(value: str) -> str:
    """A header value of the original as one line of text (undecodable bytes shown as U+FFFD)."""
    text = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return " ".join(text.split())[:200]
