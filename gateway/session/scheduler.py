"""The daemon's triggers: scheduled dial times, dial-on-demand, and queue housekeeping.

Strategies, in the words the code uses:
  * schedule — ``[schedule] dial`` rules (gateway.config.dialtimes) as jobs of a
    ``schedule.Scheduler``, polled once a second;
  * demand — every ``DEMAND_EVERY`` seconds, gateway.demand.decide over the queue and the
    session history; refusals by the budget are logged once per reason;
  * expiry — every ``EXPIRE_EVERY`` seconds, queue lifetime and delay warnings are
    applied even while offline (wall-clock time, never "the link was down");
  * clock watch — every tick, the wall clock against the boot clock (spool.clock): a step
    is recorded for expiry, and a step back re-plans the dial times.

The clock: the intervals between the daemon's own checks run on the event loop's
monotonic clock.  How long ago the last session or collection was is measured by the boot
clock when that session ran on this boot, else by the wall clock, where a stamp later than
now counts as long ago (gateway.session.demand).  The daily budget counts sessions started
on today's local calendar day of the wall clock, up to now, as cron and Postfix go by the
wall clock: sessions stamped in the future are not counted.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time

import schedule

from gateway.config import dialtimes
from gateway.session import demand
from spool.clock import ClockWatch, Step, boot_id, uptime
from spool.sessions import SessionLog, SessionRecord

log = logging.getLogger("dialmail.scheduler")

TICK = 1.0
DEMAND_EVERY = 15.0
EXPIRE_EVERY = 300.0


# How many recent sessions are looked at for the last session and the last collection.
RECENT = 50


def history(sessions: SessionLog, now: float, up: float, boot: str) -> demand.History:
    """The session history ``decide`` weighs, at wall time ``now`` and boot-clock ``up``."""
    midnight = dt.datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    today = [r for r in sessions.since(midnight, until=now) if r.outcome != "refused"]
    recent = [r for _, r in sessions.last(RECENT) if r.outcome != "refused"]

    def since_last(records: list[SessionRecord]) -> float | None:
        return min((_since_start(r, now, up, boot) for r in records), default=None)

    return demand.History(
        since_last_session=since_last(recent),
        since_last_collection=since_last([r for r in recent if r.mode in ("both", "fetch") and r.connected_at]),
        sessions_today=len(today), minutes_today=sum(r.connected_seconds for r in today) / 60)


def _since_start(rec: SessionRecord, now: float, up: float, boot: str) -> float:
    if boot and rec.boot == boot and rec.started_uptime is not None:
        return max(0.0, up - rec.started_uptime)
    return demand.since(rec.started, now)


class Scheduler:
    def __init__(self, daemon, clock=time.time, up=uptime):
        self.daemon = daemon
        self.config = daemon.config
        self.clock = clock
        self.uptime = up
        self.boot = boot_id()
        self.jobs = schedule.Scheduler()
        dialtimes.install(self.jobs, self.config.schedule.rules, self._fire)
        self.watch = ClockWatch(daemon.spool.catalogue, self.boot)
        self._last_refusal: str | None = None

    def next_dial(self) -> dt.datetime | None:
        return self.jobs.get_next_run()

    def _fire(self, rule) -> None:
        log.info("scheduled dial (%s)", rule.text)
        if not self.daemon.sessions.start("schedule"):
            log.info("scheduled dial skipped: a session is already running")

    def snapshot(self) -> tuple[demand.QueueSnapshot, demand.History]:
        backlog = self.daemon.spool.queue.relay_backlog(self.config.demand.urgent_senders)
        queue = demand.QueueSnapshot(messages=backlog.messages, bytes=backlog.bytes,
                                     oldest_urgent=backlog.oldest_urgent)
        return queue, history(SessionLog(self.daemon.spool.catalogue), self.clock(), self.uptime(), self.boot)

    def decide(self) -> demand.Decision:
        """The demand decision now (reads the spool: call it from a worker thread)."""
        queue, history = self.snapshot()
        return demand.decide(self.config.demand, queue, history, self.clock())

    def act(self, decision: demand.Decision) -> None:
        if decision.dial:
            log.info("dial on demand: %s", decision.reason)
            self.daemon.sessions.start("demand")
            self._last_refusal = None
        elif decision.refused and decision.reason != self._last_refusal:
            log.warning("not dialling: %s", decision.reason)
            self._last_refusal = decision.reason

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_demand = loop.time() + 2.0
        next_expire = loop.time()
        while True:
            await self._watch_clock()
            self.jobs.run_pending()
            now = loop.time()
            if now >= next_demand:
                next_demand = now + DEMAND_EVERY
                if not self.daemon.sessions.busy and _demand_configured(self.config.demand):
                    try:
                        decision = await asyncio.to_thread(self.decide)
                        if not self.daemon.sessions.busy:
                            self.act(decision)
                    except Exception:
                        log.exception("demand check failed")
            if now >= next_expire:
                next_expire = now + EXPIRE_EVERY
                await self._expire()
            await asyncio.sleep(TICK)

    async def _watch_clock(self) -> None:
        try:
            step = await asyncio.to_thread(self.watch.observe, self.clock(), self.uptime())
        except Exception:
            log.exception("clock check failed")
            return
        if step is not None:
            self.clock_stepped(step)

    def clock_stepped(self, step: Step) -> None:
        log.warning("the wall clock was stepped %s by %ds; queue expiry goes by real time for the mail "
                    "queued before it", "forward" if step.seconds > 0 else "back", abs(step.seconds))
        if step.seconds < 0:
            dialtimes.replan(self.jobs)

    async def _expire(self) -> None:
        from gateway.relay.expiry import expire
        try:
            result = await asyncio.to_thread(expire, self.config, self.daemon.spool.queue, self.clock())
        except Exception:
            log.exception("queue expiry pass failed")
            return
        if result and self.daemon.worker:
            self.daemon.worker.kick()


def _demand_configured(cfg) -> bool:
    return any(v is not None for v in (cfg.min_messages, cfg.min_bytes, cfg.urgent_after, cfg.collect_every))


async def service(daemon):
    from gateway.session.runner import SessionRunner
    if getattr(daemon, "sessions", None) is None:
        daemon.sessions = SessionRunner(daemon)
    sched = daemon.scheduler = Scheduler(daemon)
    task = daemon.spawn(sched.run(), "scheduler")
    nxt = sched.next_dial()
    log.info("scheduler started; next scheduled dial %s", nxt.strftime("%a %H:%M") if nxt else "none")

    async def stop():
        task.cancel()
    return stop
