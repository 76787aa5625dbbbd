"""Local delivery: queued recipients on the ``local`` route into Maildirs.

Exactly once, also across a kill -9: each (queue id, recipient, mailbox) gets a fixed
Maildir name, and a recipient whose earlier claim was cut short is delivered with
``check_existing`` so the copy that may already be in new/ or cur/ is found instead of
duplicated.  The recipient is marked delivered only after the Maildir link is fsynced.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from itertools import chain
from pathlib import Path

from gateway.bounce import settle
from gateway.config import Config
from gateway.directory import Directory
from spool.fsio import is_disk_full
from spool.maildir import Maildir
from spool.queue import BOUNCED, DEFERRED, DELIVERED, LOCAL, RELAY, Queue

log = logging.getLogger("dialmail.deliver")

DISK_FULL_RETRY = 60


def mailbox_path(spool_dir: Path, user: str) -> Path:
    return Path(spool_dir) / "mail" / user


class LocalDelivery:
    def __init__(self, config: Config, queue: Queue, directory: Directory):
        self.config = config
        self.queue = queue
        self.directory = directory
        self.owner = f"local:{os.getpid()}"

    def mailbox(self, user: str) -> Maildir:
        return Maildir(mailbox_path(self.config.spool_dir, user))

    def run_once(self, limit: int = 200) -> int:
        """Deliver what is due; returns the number of recipients handled."""
        pairs = self.queue.claim(LOCAL, self.owner, limit=limit)
        by_msg: dict[str, list[str]] = {}
        for qid, rcpt in pairs:
            by_msg.setdefault(qid, []).append(rcpt)
        for qid, rcpts in by_msg.items():
            try:
                self._deliver_message(qid, rcpts)
            finally:
                self.queue.release_claims(self.owner, qid)
        return len(pairs)

    def _deliver_message(self, qid: str, rcpts: list[str]) -> None:
        msg = self.queue.get(qid)
        if msg is None:
            return
        by_rcpt = {r.rcpt: r for r in msg.recipients}
        for rcpt in rcpts:
            entry = by_rcpt[rcpt]
            resolution = self.directory.resolve(rcpt)
            if resolution is None:
                log.info("%s: to=<%s> status=bounced (no such local user)", qid, rcpt)
                self.queue.record(qid, rcpt, BOUNCED, 550, "5.1.1 no such user here")
                continue
            try:
                for user in resolution.mailboxes:
                    key = hashlib.sha1(f"{rcpt}\0{user}".encode()).hexdigest()[:10]
                    unique = self.mailbox(user).unique_name(msg.arrival, f"Q{qid}R{key}")
                    with self.queue.open_body(qid) as body:
                        path = self.mailbox(user).deliver(
                            chain([_trace(msg.sender, rcpt)], iter(lambda: body.read(256 * 1024), b"")),
                            unique, check_existing=entry.attempts > 0)
                    log.info("%s: to=<%s> mailbox=%s status=delivered (%s)", qid, rcpt, user, path.name)
            except OSError as exc:
                reason = "disk full" if is_disk_full(exc) else exc.strerror or str(exc)
                log.warning("%s: to=<%s> status=deferred (local delivery failed: %s)", qid, rcpt, reason)
                self.queue.record(qid, rcpt, DEFERRED, 451, f"4.3.0 local delivery failed: {reason}",
                                  next_retry=time.time() + DISK_FULL_RETRY)
                continue
            if resolution.remote:
                self._forward(qid, msg.sender, rcpt, resolution.remote)
            else:
                self.queue.record(qid, rcpt, DELIVERED, 250, "2.0.0 delivered to mailbox")
        settle(self.config, self.queue, qid)

    def _forward(self, qid: str, sender: str, rcpt: str, targets: list[str]) -> None:
        """Queue a copy for outside addresses and mark ``rcpt`` done in the same transaction."""
        def done(conn, new_qid):
            self.queue.record(qid, rcpt, DELIVERED, 250, f"2.0.0 forwarded as {new_qid}", conn=conn)
        with self.queue.open_body(qid) as body:
            new_qid = self.queue.enqueue(sender, [(t, RELAY) for t in targets], body, origin="forward",
                                         client=qid, in_txn=done, orcpts={t: rcpt for t in targets})
        log.info("%s: to=<%s> status=forwarded as %s to %s", qid, rcpt, new_qid, ", ".join(targets))


def _trace(sender: str, rcpt: str) -> bytes:
    return f"Return-Path: <{sender}>\r\nDelivered-To: {rcpt}\r\n".encode("utf-8", "surrogateescape")


class DeliveryWorker:
    """Runs local delivery in a worker thread whenever it is kicked (and every minute)."""

    def __init__(self, delivery: LocalDelivery, interval: float = 60.0):
        self.delivery = delivery
        self.interval = interval
        self.wakeup = asyncio.Event()
        self.idle = asyncio.Event()

    def kick(self) -> None:
        self.wakeup.set()

    async def run(self) -> None:
        while True:
            self.wakeup.clear()
            self.idle.clear()
            try:
                while await asyncio.to_thread(self.delivery.run_once):
                    pass
            except Exception:
                log.exception("local delivery pass failed; will retry")
            self.idle.set()
            try:
                await asyncio.wait_for(self.wakeup.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
