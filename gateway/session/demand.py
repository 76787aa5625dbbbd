"""Dial-on-demand: should the link come up now, and if not, why not.

A pure decision over a snapshot of the queue and the session history, so every trigger
and every budget refusal is tested with an injected clock.  Triggers, in order:

1. urgent mail (X-Priority: 1 / Importance: high, or from an urgent sender) waiting
   ``urgent_after``;
2. queued outbound messages >= ``min_messages`` or bytes >= ``min_bytes``;
3. a collection due: nothing fetched for ``collect_every``.

Then the brakes: no session within ``min_gap`` of the last one, at most
``max_sessions_per_day`` sessions and ``max_minutes_per_day`` connected minutes per day.

The history says how long ago things happened, in real time (the scheduler measures it
by the boot clock where it can, see gateway.session.scheduler), not when: a wall clock
stepped back must not make the last session look recent for a day.  A stamp later than
now has no age the wall clock can tell; it counts as long ago (``LONG_AGO``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.config import DemandConfig


@dataclass(frozen=True)
class QueueSnapshot:
    messages: int                 # messages with recipients waiting for the relay
    bytes: int
    oldest_urgent: float | None   # arrival time of the oldest urgent message waiting


LONG_AGO = math.inf


@dataclass(frozen=True)
class History:
    since_last_session: float | None      # seconds since the last session started; None: never
    since_last_collection: float | None   # ... since the last session that fetched
    sessions_today: int                   # by the local calendar day of the wall clock
    minutes_today: float


def since(stamp: float, now: float) -> float:
    """Seconds from a wall-clock ``stamp`` to ``now``; a stamp in the future (made before the
    clock was stepped back) is ``LONG_AGO``: how long ago is unknown, and waiting for the
    wall clock to catch up would hold the mail for as long as the step."""
    return now - stamp if stamp <= now else LONG_AGO


@dataclass(frozen=True)
class Decision:
    dial: bool
    reason: str
    refused: bool = False         # a trigger fired but a budget or gap said no


def decide(cfg: DemandConfig, queue: QueueSnapshot, history: History, now: float) -> Decision:
    trigger = _trigger(cfg, queue, history, now)
    if trigger is None:
        return Decision(False, "nothing to do")
    if history.since_last_session is not None and history.since_last_session < cfg.min_gap:
        return Decision(False, f"{trigger}, but the last session was less than {cfg.min_gap}s ago", refused=True)
    if cfg.max_sessions_per_day is not None and history.sessions_today >= cfg.max_sessions_per_day:
        return Decision(False, f"{trigger}, but the daily budget of {cfg.max_sessions_per_day} sessions is used up",
                        refused=True)
    if cfg.max_minutes_per_day is not None and history.minutes_today >= cfg.max_minutes_per_day:
        return Decision(False, f"{trigger}, but the daily budget of {cfg.max_minutes_per_day:g} connected "
                               f"minutes is used up", refused=True)
    return Decision(True, trigger)


def _trigger(cfg: DemandConfig, queue: QueueSnapshot, history: History, now: float) -> str | None:
    if cfg.urgent_after is not None and queue.oldest_urgent is not None:
        waiting = since(queue.oldest_urgent, now)
        if waiting >= cfg.urgent_after:
            return "urgent mail waiting " + (f"{int(waiting)}s" if waiting != LONG_AGO
                                             else "since before the clock was set back")
    if queue.messages and cfg.min_messages is not None and queue.messages >= cfg.min_messages:
        return f"{queue.messages} messages queued (threshold {cfg.min_messages})"
    if queue.messages and cfg.min_bytes is not None and queue.bytes >= cfg.min_bytes:
        return f"{queue.bytes} bytes queued (threshold {cfg.min_bytes})"
    if cfg.collect_every is not None:
        if history.since_last_collection is None or history.since_last_collection >= cfg.collect_every:
            return "collection due"
    return None
