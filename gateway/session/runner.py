"""The daemon's session runner: one dial session at a time, its events fanned out to
whoever follows (connect-now over the control socket, the scheduler's log)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from gateway.session.events import Connected, Dialing, Done, End, Event, Hangup, Refused
from gateway.session.session import (
    InboundSmtp,
    SessionContext,
    SessionControl,
    run_with_retries,
)

log = logging.getLogger("dialmail.control")

# How long a stopping daemon lets the session in progress stop at a safe point and hang
# up before it cuts it off (systemd's TimeoutStopSec default is 90 s).
SESSION_STOP_GRACE = 30.0



class SessionRunner:
    """Runs sessions for the daemon, one at a time, and fans their events out."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.task: asyncio.Task | None = None
        self.subscribers: set[asyncio.Queue] = set()
        self.state = "idle"
        self.current: dict[str, Any] | None = None
        self.control = SessionControl()
        self.closing = False  # the daemon is stopping: no new session

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self, trigger: str, mode: str = "both") -> bool:
        """Start a session unless one runs; True if this call started it."""
        if self.busy or self.closing:
            return False
        daemon = self.daemon
        ctx = SessionContext(daemon.config, daemon.spool,
                             kick_delivery=daemon.worker.kick if daemon.worker else None,
                             inbound=InboundSmtp(daemon.smtp_connections, lambda: daemon.accepted))
        self.current = {"trigger": trigger, "mode": mode, "started": time.time()}
        self.control = SessionControl()
        self.task = self.daemon.spawn(self._run(ctx, trigger, mode), f"session-{trigger}")
        return True

    async def _run(self, ctx: SessionContext, trigger: str, mode: str) -> None:
        outcome = "failed"
        try:
            rec = await run_with_retries(ctx, trigger, mode, emit=self._publish, control=self.control)
            outcome = rec.outcome
        except asyncio.CancelledError:
            outcome = "interrupted"
            raise
        finally:
            self.current = None
            self.state = "idle"
            self._publish(End(outcome))

    def hangup(self, by: str) -> bool:
        """End the running session at a safe point and hang up; False when none runs."""
        return self.busy and self.control.interrupt(by)

    async def stop(self, by: str, grace: float = SESSION_STOP_GRACE) -> None:
        """The daemon is stopping: end the session as ``dialmail hangup`` would, then wait."""
        self.closing = True
        if not self.busy:
            return
        self.hangup(by)
        done, _ = await asyncio.wait({self.task}, timeout=grace)
        if not done:
            log.warning("the session did not stop within %ss of %s; cutting it off", grace, by)
            self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self.subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self.subscribers.discard(q)

    def _publish(self, event: Event) -> None:
        if isinstance(event, Dialing):
            self.state = "dialing"
        elif isinstance(event, Connected):
            self.state = f"connected at {event.rate or '?'} bps"
        elif isinstance(event, (Hangup, Done, Refused)):
            self.state = "idle"
        for q in list(self.subscribers):
            q.put_nowait(event)
