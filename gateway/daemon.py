"""``dialmail run``: one asyncio process for SMTP, POP3, local delivery, scheduler and control.

Lifecycle as an explicit object: ``startup`` (spool lock, recovery, listeners),
``main loop`` (wait for a stop flag), ``shutdown`` (stop listening, let transactions in
progress finish within a grace period, then close).  Signal handlers only set the flag.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import resource
import signal
import time
from pathlib import Path
from typing import Awaitable, Callable

from gateway.config import Config
from gateway.delivery.worker import DeliveryWorker, LocalDelivery
from gateway.mail.errors import OperationalError
from gateway.office.directory import Directory
from gateway.policy.throttle import LoginThrottle
from gateway.smtp.admission import SubmissionPolicy
from gateway.smtp.server import (
    SubmissionHandler,
    SubmissionProtocol,
    start_servers,
    start_submission,
)
from spool import rebuild
from spool.locks import LockBusy, PidLock
from spool.queue import Catalogue, Queue
from spool.users import Users

log = logging.getLogger("dialmail.daemon")

# SIGTERM to exit well inside systemd's TimeoutStopSec: a transaction in progress gets this
# long to finish; every other connection is told 421 at once.
GRACE = 6.0
# Descriptors kept out of the connection caps: the spool's files and database, the log,
# delivery, a fetch and the refusal of one connection more than the caps allow.
DESCRIPTOR_RESERVE = 128


class Spool:
    """The spool's pieces opened together for one process."""

    def __init__(self, config: Config):
        self.config = config
        self.catalogue = Catalogue(config.spool_dir)
        self.queue = Queue(self.catalogue)
        self.users = Users(config.spool_dir)
        self.directory = Directory(config, self.users)
        self.delivery = LocalDelivery(config, self.queue, self.directory)

    def close(self) -> None:
        self.catalogue.close()


class DaemonLock(PidLock):
    """Only one daemon per spool: an exclusive flock on ``<spool>/daemon.pid``."""

    def __init__(self, spool_dir: Path):
        super().__init__(Path(spool_dir) / "daemon.pid")

    def acquire(self) -> None:
        try:
            super().acquire()
        except LockBusy as exc:
            raise OperationalError(f"another dialmail daemon (pid {exc.holder}) is already running on "
                                   f"{self.path.parent}") from None


# A service is started after the core and stopped before it: ``start(daemon)`` returns
# an async ``stop()``.  POP3, the scheduler and the control socket plug in this way.
Service = Callable[["Daemon"], Awaitable[Callable[[], Awaitable[None]]]]


class Daemon:
    def __init__(self, config: Config, services: list[Service] | None = None):
        self.config = config
        self.services = list(services or [])
        self.should_exit = asyncio.Event()
        self.stop_reason: str | None = None  # "SIGTERM" ...: what the session in progress is told
        self.started = asyncio.Event()
        self.spool: Spool | None = None
        self.lock = DaemonLock(config.spool_dir)
        self.tasks: set[asyncio.Task] = set()
        self.smtp_servers: list[asyncio.base_events.Server] = []
        self.worker: DeliveryWorker | None = None
        self.handler: SubmissionHandler | None = None
        self.accepted = 0  # messages the SMTP listener took, for a session waiting on ETRN
        # Each login door's throttle by protocol ("smtp", "pop3"): the console counts its logins on all.
        self.login_throttles: dict[str, LoginThrottle] = {}
        self._stops: list[Callable[[], Awaitable[None]]] = []

    def spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def serve(self) -> None:
        self._install_signal_handlers()
        logging.getLogger("asyncio").addFilter(AcceptFailures())
        try:
            await self.startup()
            self.started.set()
            await self.should_exit.wait()
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        self.config = fit_connections_to_descriptors(self.config)
        self.lock.acquire()
        self.spool = Spool(self.config)
        report = await asyncio.to_thread(self.spool.queue.recover)
        for level, line in rebuild.describe(report):
            log.log(level, line)
        self.worker = DeliveryWorker(self.spool.delivery)
        self.spawn(self.worker.run(), "local-delivery")
        self.handler = SubmissionHandler(self.config, self.spool.queue, self.spool.directory, self.spool.users,
                                         on_queued=self._queued,
                                         policy=SubmissionPolicy(self.config, self.spool.directory,
                                                                 self.spool.queue, kick=self.worker.kick))
        self.login_throttles["smtp"] = self.handler.login_throttle
        self.smtp_servers = await start_servers(self.config, self.handler)
        self.smtp_servers += await start_submission(self.config, self.handler)  # closed with them at shutdown
        for service in self.services:
            self._stops.append(await service(self))
        log.info("dialmail started (pid %d, spool %s)", os.getpid(), self.config.spool_dir)

    def smtp_connections(self) -> int:
        return len(SubmissionProtocol.live)

    def _queued(self, accepted) -> None:
        self.accepted += 1
        if accepted.local and self.worker:
            self.worker.kick()

    async def shutdown(self) -> None:
        for server in self.smtp_servers:
            server.close()
        # SMTP clients are drained while the services stop, not after: both take their
        # grace at the same time.
        await asyncio.gather(self._stop_services(), _drain(self.smtp_servers, GRACE))
        for server in self.smtp_servers:
            await server.wait_closed()
        if self.handler is not None:
            await self.handler.close()
        if self.worker is not None:
            await self.worker.stop()
        await _cancel_all(self.tasks)
        if self.spool is not None:
            self.spool.close()
        self.lock.release()
        log.info("dialmail stopped")

    async def _stop_services(self) -> None:
        for stop in reversed(self._stops):
            try:
                await stop()
            except Exception:
                log.exception("error while stopping a service")
        self._stops.clear()

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._signalled, sig)
            except (NotImplementedError, RuntimeError):
                pass

    def _signalled(self, sig: int) -> None:
        self.stop_reason = self.stop_reason or signal.Signals(sig).name
        self.should_exit.set()


def fit_connections_to_descriptors(config: Config) -> Config:
    """Raise the soft descriptor limit to the hard one; lower connection caps that do not fit.

    Each connection holds a descriptor; when they run out, accepting stops, and so do the
    spool's writes.  The caps of SMTP (ports 25 and 587) and POP3 together are kept
    ``DESCRIPTOR_RESERVE`` below the limit so the spool, the log and an admin's client still get descriptors.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open file limit from %d to %d: %s", soft, hard, exc)
    if soft == resource.RLIM_INFINITY:
        return config
    # Port 587 has caps of its own with [smtp]'s numbers: its connections count as well.
    smtp_ports = 2 if config.submission is not None else 1
    smtp, pop3 = config.smtp.max_connections, config.pop3.max_connections
    budget = max(2, soft - DESCRIPTOR_RESERVE)
    if smtp * smtp_ports + pop3 <= budget:
        return config
    fit_smtp = max(1, budget * smtp // (smtp * smtp_ports + pop3))
    fit_pop3 = max(1, budget - fit_smtp * smtp_ports)
    each = " (each of [smtp] and [submission])" if smtp_ports == 2 else ""
    log.warning("open file limit %d leaves room for %d connections: smtp.max_connections lowered from %d to %d%s, "
                "pop3.max_connections from %d to %d (raise LimitNOFILE)", soft, budget, smtp, fit_smtp, each, pop3,
                fit_pop3)
    return dataclasses.replace(
        config, smtp=dataclasses.replace(config.smtp, max_connections=fit_smtp),
        pop3=dataclasses.replace(config.pop3, max_connections=fit_pop3))


class AcceptFailures(logging.Filter):
    """Rate-limits asyncio's "accept() out of system resource" error (a traceback each).

    dialmail's own listeners pause and report instead, but any asyncio server in the
    process (a test peer, a future listener) would log one per attempt, many thousand a
    second, on the disk the spool lives on.  One a minute passes, with a count.
    """

    def __init__(self, every: float = 60.0):
        super().__init__()
        self.every = every
        self.last = float("-inf")
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "out of system resource" not in str(record.msg):
            return True
        now = time.monotonic()
        if now - self.last < self.every:
            self.dropped += 1
            return False
        if self.dropped:
            record.msg = f"{record.msg} ({self.dropped} more since the last report)"
        self.last, self.dropped = now, 0
        return True


async def _cancel_all(tasks: set[asyncio.Task], tries: int = 20) -> None:
    """Cancel ``tasks`` and wait for them to end.

    Python 3.11's ``asyncio.wait_for`` swallows a cancel that arrives just as what it
    waits for completes (the delivery worker kicked by a session ending at shutdown): a
    task still running a moment later is cancelled again.
    """
    everyone = list(tasks)
    for _ in range(tries):
        pending = [t for t in everyone if not t.done()]
        if not pending:
            await asyncio.gather(*everyone, return_exceptions=True)  # collects their errors
            return
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.5)
    log.error("%d task(s) did not stop when cancelled: %s", len(pending), ", ".join(t.get_name() for t in pending))


async def _drain(servers, grace: float) -> None:
    """Wait for connections in a transaction to finish; idle ones are told 421 at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while loop.time() < deadline:
        busy = False
        for proto in list(_live_protocols()):
            if proto.envelope is not None and proto.envelope.mail_from is not None:
                busy = True
            elif proto.transport is not None and not proto.transport.is_closing():
                proto.transport.write(b"421 4.3.2 Service shutting down, try again later\r\n")
                proto.transport.close()
        if not busy:
            break
        await asyncio.sleep(0.1)
    for proto in list(_live_protocols()):
        if proto.transport is not None:
            proto.transport.close()


def _live_protocols():
    return list(SubmissionProtocol.live)
