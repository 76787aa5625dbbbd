"""Local delivery: queued recipients on the ``local`` route through the delivery policy.

The stages (size, block lists, virus scan, expansion, forwarding, Maildirs, automatic
replies) are gateway.delivery.pipeline's; this module claims recipients, runs them and settles the
message.  Exactly once, also across a kill -9: each (queue id, recipient, mailbox) gets a
fixed Maildir name, and a recipient whose earlier claim was cut short is delivered with
``check_existing`` so the copy that may already be in new/ or cur/ is found instead of
duplicated.  The recipient is marked delivered only after the Maildir link is fsynced.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

from gateway.config import Config
from gateway.delivery.pipeline import Pipeline
from gateway.office.bounce import settle
from gateway.office.directory import Directory
from spool.maildir import Maildir, mailbox_path
from spool.queue import LOCAL, DamagedBody, Queue

__all__ = ["LocalDelivery", "DeliveryWorker"]

log = logging.getLogger("dialmail.deliver")

LEFTOVER_CHECK = 60.0  # seconds between looks for messages left final but queued


class LocalDelivery:
    def __init__(self, config: Config, queue: Queue, directory: Directory):
        self.config = config
        self.queue = queue
        self.directory = directory
        self.owner = f"local:{os.getpid()}"
        self.pipeline = Pipeline(config, queue, directory)
        self._leftovers_checked: float | None = None

    def mailbox(self, user: str) -> Maildir:
        return Maildir(mailbox_path(self.config.spool_dir, user))

    def run_once(self, limit: int = 200) -> int:
        """Deliver what is due; returns the number of recipients handled."""
        self._settle_leftovers()
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

    def _settle_leftovers(self) -> None:
        """Settle messages left with every recipient final (a kill -9 between recording the
        last outcome and settling): their bounce is sent and they leave the queue.  Checked
        at the first pass and then once a minute."""
        now = time.monotonic()
        if self._leftovers_checked is not None and now - self._leftovers_checked < LEFTOVER_CHECK:
            return
        self._leftovers_checked = now
        for qid in self.queue.finished():
            log.info("%s: every recipient was final but the message was still queued; settling it", qid)
            settle(self.config, self.queue, qid)

    def _deliver_message(self, qid: str, rcpts: list[str]) -> None:
        msg = self.queue.get(qid)
        if msg is None:
            return
        try:
            with self.queue.open_body(qid):
                pass  # a body damaged since it was accepted is held here, not delivered
        except DamagedBody:
            return
        # size -> block lists -> virus -> expansion -> forwarding -> mailbox -> replies
        self.pipeline.run(msg, rcpts)
        settle(self.config, self.queue, qid)


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
