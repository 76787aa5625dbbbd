"""The admission stages at SMTP time, for LAN submissions: gateway.smtp.server's ``policy`` hooks.

Refusing while the client is still connected is the one moment the sender can be told,
so stages 1-3 run here for LAN mail (and not again at delivery):
* RCPT: the envelope sender against the block lists (refused at RCPT rather than MAIL so
  every client reports it against the message), and members-only groups;
* DATA: the From: header against the block lists, then the virus scan (554 when infected,
  with a notice to the postmaster; clamd unreachable: accepted or 451 per
  ``[virus] on_error``).  Size limits are gateway.smtp.server's own (SIZE= and DATA).
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from gateway.config import Config
from gateway.mail.headers import Headers
from gateway.office import notice
from gateway.office.directory import Directory
from gateway.policy import blocklist, virus
from gateway.policy.verdict import DEFER_ACTION, REJECT_ACTION
from gateway.smtp.replies import Reply
from spool.queue import Queue

log = logging.getLogger("dialmail.policy")


class SubmissionPolicy:
    def __init__(self, config: Config, directory: Directory, queue: Queue, kick=None):
        self.config = config
        self.kick = kick or (lambda: None)  # starts local delivery of a notice queued here
        self.settings = config.policy
        self.directory = directory
        self.queue = queue
        self.senders = blocklist.SenderFilter(self.settings.blocklist)
        self.scanner = virus.ClamdScanner(self.settings.virus)

    async def check_sender(self, sender: str, ip: str) -> str | None:
        return None  # block lists answer at RCPT: see the module doc

    async def check_recipient(self, sender: str, rcpt: str, ip: str) -> str | None:
        entry = self.senders.blocked_by(sender)
        if entry:
            log.info("reject from=<%s> rcpt=<%s> client=%s: sender blocked (%s)", sender, rcpt, ip, entry)
            return Reply.SENDER_BLOCKED
        if self.directory.is_local(rcpt):
            res = self.directory.resolve(rcpt, sender=sender)
            if res is not None and res.refused_by:
                log.info("reject from=<%s> rcpt=<%s> client=%s: not a member of %s", sender, rcpt, ip,
                         res.refused_by)
                return Reply.MEMBERS_ONLY
        return None

    def reads_body(self, size: int) -> bool:
        """Whether ``check_content`` reads the message's file (a virus scan), so it must be
        on disk first; the other checks read the header block only."""
        return self.scanner.enabled and not self.scanner.too_big(size)

    async def check_content(self, sender: str, rcpts: list[str], body: Path, size: int, headers: Headers,
                            ip: str) -> str | None:
        """``body`` is the message's file in the spool (fsynced, not yet queued), ``size``
        its length: the scan streams it to clamd and never holds it in memory."""
        for who in blocklist.header_addresses(headers.get("From")):
            entry = self.senders.blocked_by(who)
            if entry:
                log.info("reject from=<%s> client=%s: From: %s blocked (%s)", sender, ip, who, entry)
                return Reply.CONTENT_BLOCKED
        if not self.scanner.enabled:
            return None
        what = f"message from=<{sender}> client={ip}"
        if self.scanner.too_big(size):
            log.warning("%s: not scanned for viruses: %d bytes is over virus max_scan_size %d", what, size,
                        self.settings.virus.max_scan_size)
            return None
        result = await asyncio.to_thread(self._scan, body)
        verdict = self.scanner.verdict(result, fetched=False, what=what)
        if verdict.action == REJECT_ACTION:
            if self.settings.virus.notify_postmaster:
                await asyncio.to_thread(
                    notice.notify_postmaster, self.config, self.directory, self.queue,
                    f"Virus refused at SMTP: {verdict.virus}",
                    f"A message was refused at SMTP time because it contained a virus.\n\n"
                    f"  client:     {ip}\n  sender:     <{sender}>\n  recipients: {', '.join(rcpts)}\n"
                    f"  virus:      {verdict.virus}\n")
                self.kick()
            return Reply.VIRUS.format(name=verdict.virus)
        if verdict.action == DEFER_ACTION:
            return Reply.SCAN_FAILED
        return None

    def _scan(self, body: Path) -> virus.ScanResult:
        with open(body, "rb") as f:
            return self.scanner.scan_file(f)
