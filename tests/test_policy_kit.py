"""Shared pieces of the delivery-policy tests: SMTP in, POP3 out, fetched mail through Dovecot.

No tests here; the test_policy_* modules import it.
"""
from __future__ import annotations

import email
import email.policy
import poplib
import smtplib
import textwrap
from dataclasses import dataclass, field
from email.message import EmailMessage

from spool.queue import Catalogue, Queue
from tests.harness import wait_for
from tests.peers import Clamd

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"

PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw"}


def message(sender: str, to: str, subject: str, body: str = "hello\n", headers: dict | None = None,
            attachment: tuple[str, bytes] | None = None) -> bytes:
    m = EmailMessage(policy=email.policy.SMTP)
    m["From"] = sender
    m["To"] = to
    m["Subject"] = subject
    m["Message-ID"] = email.utils.make_msgid(domain="test.example")
    for k, v in (headers or {}).items():
        m[k] = v
    m.set_content(body)
    if attachment:
        m.add_attachment(attachment[1], maintype="application", subtype="octet-stream", filename=attachment[0])
    return m.as_bytes()


@dataclass
class Dialogue:
    """The server's replies to one SMTP transaction, step by step."""
    mail: tuple[int, str] = (0, "")
    rcpt: list[tuple[int, str]] = field(default_factory=list)
    data: tuple[int, str] | None = None

    @property
    def accepted(self) -> bool:
        return self.data is not None and self.data[0] == 250


def reply_text(code: int, text: bytes) -> str:
    return f"{code} {text.decode(errors='replace')}".replace("\n", " ")


def submit(site, sender: str, rcpts: list[str] | str, data: bytes, host: str = "127.0.0.1") -> Dialogue:
    """One SMTP transaction against the site's daemon, recording every reply."""
    rcpts = [rcpts] if isinstance(rcpts, str) else rcpts
    d = Dialogue()
    with smtplib.SMTP(host, site.smtp_port, timeout=120) as s:
        s.ehlo("client.test")
        code, text = s.mail(sender)
        d.mail = (code, reply_text(code, text))
        if code != 250:
            return d
        for r in rcpts:
            code, text = s.rcpt(r)
            d.rcpt.append((code, reply_text(code, text)))
        if not any(c == 250 for c, _ in d.rcpt):
            return d
        code, text = s.data(data)
        d.data = (code, reply_text(code, text))
    return d


def send(site, sender: str, rcpts, subject: str, **kw) -> Dialogue:
    rcpts_list = [rcpts] if isinstance(rcpts, str) else rcpts
    d = submit(site, sender, rcpts_list, message(sender, ", ".join(rcpts_list), subject, **kw))
    assert d.accepted, d
    return d


def pop3(site, user: str, password: str | None = None) -> list[email.message.Message]:
    """Every message in ``user``'s maildrop, retrieved over POP3 (nothing deleted)."""
    box = poplib.POP3("127.0.0.1", site.pop3_port, timeout=60)
    try:
        box.user(user)
        box.pass_(password or PASSWORDS.get(user) or f"{user}-pw")
        count, _ = box.stat()
        out = []
        for i in range(1, count + 1):
            _, lines, _ = box.retr(i)
            out.append(email.message_from_bytes(b"\r\n".join(lines), policy=email.policy.compat32))
        return out
    finally:
        box.quit()


def subjects(msgs) -> list[str]:
    return sorted(str(m["Subject"]) for m in msgs)


def queue_of(site) -> Queue:
    return Queue(Catalogue(site.spool))


def settled(site, timeout: float = 30) -> None:
    """Wait until no local recipient is waiting in the queue (delivery and replies done)."""
    q = queue_of(site)
    try:
        wait_for(lambda: q.counts()["local"] == 0, timeout=timeout, what="local delivery to settle")
    finally:
        q.cat.close()


def wait_mail(site, user: str, count: int, password: str | None = None, timeout: float = 30):
    """POP3 until ``user`` has at least ``count`` messages; returns them."""
    return wait_for(lambda: (lambda m: m if len(m) >= count else None)(pop3(site, user, password)),
                    timeout=timeout, interval=0.2, what=f"{count} message(s) for {user}")


def config(text: str) -> str:
    return textwrap.dedent(text)


class BigClamd(Clamd):
    """The shared clamd with room for a 20 MB attachment (base64 makes it ~27 MB)."""

    def _prepare(self) -> None:
        super()._prepare()
        self.conf.write_text(self.conf.read_text().replace("StreamMaxLength 25M", "StreamMaxLength 64M"))


def fetch_account(dovecot, port_attr: str = "imap_port") -> tuple[str, str]:
    """An ISP mailbox on Dovecot; returns (user, password)."""
    dovecot.add_user("office", "isp-secret")
    return "office", "isp-secret"
