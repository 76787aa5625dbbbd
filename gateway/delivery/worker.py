"""Local delivery: queued recipients on the ``local`` route through the delivery policy.

The stages (size, block lists, virus scan, expansion, forwarding, Maildirs, automatic
replies) are gateway.delivery.pipeline's; this module claims recipients, runs them and settles the
message.  Exactly once, also across a kill -9: each (queue id, recipient, mailbox) gets a
fixed Maildir name, and a recipient whose earlier claim was cut short is delivered with
``check_existing`` so the copy that may already be in new/ or cur/ is found instead of
duplicated.  The recipient is marked delivered only after the Maildir link is fsynced;
a pass writes all its messages' files first, then fsyncs them side by side, links them,
fsyncs each new/ once and records them all in one transaction, so delivery keeps pace
with a burst of SMTP ingest.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import sys
import time

from gateway.config import Config
from gateway.delivery.pipeline import Pipeline
from gateway.mail import outcome
from gateway.office.bounce import settle
from gateway.office.directory import Directory
from spool.fsio import is_disk_full
from spool.maildir import Maildir, mailbox_path
from spool.queue import LOCAL, DamagedBody, Message, Queue

__all__ = ["LocalDelivery", "DeliveryWorker", "until_due"]

KICK = b"k"  # the daemon to the delivery process: local mail is waiting
IDLE = b"i"  # the process to the daemon: everything due is delivered

log = logging.getLogger("dialmail.deliver")

LEFTOVER_CHECK = 60.0  # seconds between looks for messages left final but queued
MIN_WAIT = 0.5  # shortest pause between passes, so a recipient due now cannot make the worker spin


class LocalDelivery:
    def __init__(self, config: Config, queue: Queue, directory: Directory):
        self.config = config
        self.queue = queue
        self.directory = directory
        self.pipeline = Pipeline(config, queue, directory)
        self._leftovers_checked: float | None = None

    def mailbox(self, user: str) -> Maildir:
        return Maildir(mailbox_path(self.config.spool_dir, user))

    def run_once(self, limit: int = 200) -> int:
        """Deliver what is due; returns the number of recipients handled.

        One message that fails (its file is gone, the disk is full) never stops the
        others, and whatever ends the pass, no recipient stays claimed.  Recipients of a
        failed message do not count: a pass that fails on everything returns 0, so the
        worker waits for its next kick or minute instead of spinning on a full disk.
        """
        self._look_after()
        owner = self.queue.new_claimant(LOCAL)
        handled = 0
        try:
            try:
                pairs = self.queue.claim(LOCAL, owner, limit=limit)
            except Exception as exc:
                if not is_disk_full(exc):
                    raise
                log.warning("local delivery waits: the spool's disk is full")
                return 0
            by_msg: dict[str, list[str]] = {}
            for qid, rcpt in pairs:
                by_msg.setdefault(qid, []).append(rcpt)
            ran: dict[str, list[str]] = {}
            for qid, rcpts in by_msg.items():
                try:
                    if self._deliver_message(qid, rcpts):
                        ran[qid] = rcpts
                    handled += len(rcpts)
                except Exception as exc:
                    self._failed(qid, rcpts, exc)
            # The pass's Maildir files made durable together, one COMMIT for all its
            # outcomes, then settle what is left (bounces to report): see
            # gateway.delivery.pipeline.
            try:
                removed = self.pipeline.commit()
            except Exception as exc:
                self._failed_batch(ran, exc)
                return 0
            for qid, rcpts in ran.items():
                if qid in removed:
                    continue
                try:
                    settle(self.config, self.queue, qid)
                except Exception as exc:
                    self._failed(qid, rcpts, exc)
        finally:
            # A claim released unrecorded counts as an attempt: the next try looks for a
            # copy this pass may have linked already.  Should even the release fail (a full
            # disk), the claims no longer belong to any pass of this process, and
            # ``release_dead_claims`` frees them at the next pass that finds room.
            try:
                self.queue.retire_claimant(owner)
            except Exception as exc:
                if not is_disk_full(exc):
                    raise
                self._leftovers_checked = None
                log.warning("local delivery: the spool's disk is full; claims are released once there is room")
        return handled

    def _failed(self, qid: str, rcpts: list[str], exc: Exception) -> None:
        # The message may be left with every recipient final (its settling failed):
        # look for such leftovers at the next pass, not a minute later.
        self._leftovers_checked = None
        if is_disk_full(exc):
            log.warning("%s: local delivery stopped: the spool's disk is full; will retry", qid)
            return
        msg = self.queue.get(qid)
        if msg is not None and not self.queue.body_path(qid).exists():
            self._body_missing(msg, rcpts)
            return
        log.exception("%s: local delivery failed; will retry", qid)

    def _failed_batch(self, ran: dict[str, list[str]], exc: Exception) -> None:
        self._leftovers_checked = None
        if is_disk_full(exc):
            log.warning("local delivery of %d messages stopped: the spool's disk is full; will retry", len(ran))
            return
        log.exception("local delivery of %d messages failed; will retry", len(ran))

    def _look_after(self) -> None:
        """At the first pass and then once a minute: settle messages left with every
        recipient final (a kill -9, or a full disk, between recording the last outcome and
        settling: their bounce is sent and they leave the queue), and free recipients
        claimed by workers that are gone."""
        now = time.monotonic()
        if self._leftovers_checked is not None and now - self._leftovers_checked < LEFTOVER_CHECK:
            return
        self._leftovers_checked = now
        for owner in self.queue.release_dead_claims():
            log.warning("released recipients claimed by a worker that is gone (%s)", owner)
        for qid in self.queue.finished():
            log.info("%s: every recipient was final but the message was still queued; settling it", qid)
            settle(self.config, self.queue, qid)

    def _deliver_message(self, qid: str, rcpts: list[str]) -> bool:
        """Run the pipeline for the message; True if it ran (the message is then settled
        once the pass's batch is committed)."""
        msg = self.queue.get(qid)
        if msg is None:
            return False
        if not self.queue.body_path(qid).exists():
            self._body_missing(msg, rcpts)
            return False
        try:
            with self.queue.open_body(qid):
                pass  # a body damaged since it was accepted is held here, not delivered
        except DamagedBody:
            return False
        # size -> block lists -> virus -> expansion -> forwarding -> mailbox -> replies
        self.pipeline.run(msg, rcpts)
        return True

    def _body_missing(self, msg: Message, rcpts: list[str]) -> None:
        """Record the loss where ``dialmail queue list`` shows it; the message waits for the
        administrator (restore the file or delete the message) and expires like any other."""
        why = outcome.body_missing(msg.id)
        log.error("%s: from=<%s> to=<%s> status=deferred (%s)", msg.id, msg.sender, ",".join(rcpts), why.reply)
        waiting = {r.rcpt: r for r in msg.recipients}
        retry = time.time() + self.config.queue.retry_max
        self.queue.record_outcomes(msg.id, {r: why for r in rcpts if r in waiting},
                                   retry_at=lambda _before, _o: retry)


def until_due(queue: Queue, interval: float) -> float:
    """Seconds to the next pass: ``interval``, or sooner when a deferred recipient is due
    sooner (an LMTP server back after a short outage gets its mail after retry_min, not
    up to a minute later)."""
    try:
        due = queue.next_due(LOCAL)
    except Exception:
        return interval
    if due is None:
        return interval
    return min(interval, max(MIN_WAIT, due - time.time()))


# Pauses before starting a delivery process that exited on its own again (a crash loop
# must not spin): 1, 2, 5, 10, 30 s, then 30 s.
RESTART_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)
STOP_GRACE = 30.0  # seconds a pass in progress gets to finish when the daemon stops


class DeliveryWorker:
    """The daemon's end of local delivery: runs ``gateway.delivery.process`` and kicks it
    whenever local mail is queued (it also delivers every minute, and when a deferred
    recipient is due).  A process that exits is started again."""

    def __init__(self, delivery: LocalDelivery, interval: float = 60.0):
        self.delivery = delivery
        self.interval = interval
        self.idle = asyncio.Event()  # set each time the process has delivered what was due
        self.proc: asyncio.subprocess.Process | None = None
        self.stopping = False
        self.thread_wakeup: asyncio.Event | None = None  # delivering on a thread: no process could start

    def kick(self) -> None:
        if self.thread_wakeup is not None:
            self.thread_wakeup.set()
            return
        proc = self.proc
        if proc is not None and proc.returncode is None and not proc.stdin.is_closing():
            self.idle.clear()
            proc.stdin.write(KICK)

    async def run(self) -> None:
        failures = 0
        while not self.stopping:
            started = time.monotonic()
            try:
                code = await self._run_once()
            except OSError as exc:
                # The interpreter cannot be started again (its file is not executable for the
                # user the daemon runs as): deliver on a thread of the daemon, more slowly.
                log.warning("cannot start the local delivery process (%s: %s): delivering on a thread of the "
                            "daemon instead, which keeps up with fewer messages a second",
                            sys.executable, exc.strerror or exc)
                self.proc = None
                await self._run_in_thread()
                return
            if self.stopping:
                return
            failures = 0 if time.monotonic() - started > 60 else failures + 1
            pause = RESTART_BACKOFF[min(failures, len(RESTART_BACKOFF)) - 1] if failures else 0.0
            log.error("the local delivery process exited (%s); starting it again%s",
                      _exit(code), f" in {pause:.0f} s" if pause else "")
            await asyncio.sleep(pause)

    async def _run_in_thread(self) -> None:
        self.thread_wakeup = asyncio.Event()
        while not self.stopping:
            self.thread_wakeup.clear()
            self.idle.clear()
            try:
                while await asyncio.to_thread(self.delivery.run_once) and not self.stopping:
                    pass
            except Exception:
                log.exception("local delivery pass failed; will retry")
            self.idle.set()
            pause = await asyncio.to_thread(until_due, self.delivery.queue, self.interval)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.thread_wakeup.wait(), pause)

    async def _run_once(self) -> int:
        root = logging.getLogger()
        fmt = root.handlers[0].formatter._fmt if root.handlers and root.handlers[0].formatter else None
        handshake = {"config": self.delivery.config, "log_level": root.level,
                     "log_format": fmt or logging.BASIC_FORMAT,
                     "log_levels": {name: logging.getLogger(name).level for name in ("mail.log", "asyncio")}}
        self.proc = proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.delivery.process", str(os.getpid()),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        try:
            proc.stdin.write(pickle.dumps(handshake))
            while await proc.stdout.read(4096):  # each byte: everything due was delivered
                self.idle.set()
        except asyncio.CancelledError:
            if proc.returncode is None and not self.stopping:
                proc.kill()  # cancelled other than by stop(): nothing may outlive the task
            raise
        return await proc.wait()

    async def stop(self) -> None:
        """Let a pass in progress finish, then end the process."""
        self.stopping = True
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), STOP_GRACE)
        except TimeoutError:
            log.warning("local delivery did not finish its pass within %.0f s: stopped (it resumes at the next "
                        "start)", STOP_GRACE)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _exit(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"
