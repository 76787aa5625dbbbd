"""Dial-on-demand: should the link come up now, and if not, why not.

A pure decision over a snapshot of the queue and the session history, so every trigger
and every budget refusal is tested with an injected clock.  Triggers, in order:

1. urgent mail (X-Priority: 1 / Importance: high, or from an urgent sender) waiting
   ``urgent_after``;
2. queued outbound messages >= ``min_messages`` or bytes >= ``min_bytes``;
3. a collection due: nothing fetched for ``collect_every``.

Then the brakes: no session within ``min_gap`` of the last one, at most
``max_sessions_per_day`` sessions and ``max_minutes_per_day`` connected minutes per day.
"""
from __future__ import annotations

from dataclasses import dataclass

from gateway.config import DemandConfig


@dataclass(frozen=True)
class QueueSnapshot:
    messages: int                 # messages with recipients waiting for the relay
    bytes: int
    oldest_urgent: float | None   # arrival time of the oldest urgent message waiting


@dataclass(frozen=True)
class History:
    last_session_start: float | None
    last_collection: float | None   # last session that fetched
    sessions_today: int
    minutes_today: float


@dataclass(frozen=True)
class Decision:
    dial: bool
    reason: str
    refused: bool = False         # a trigger fired but a budget or gap said no


def decide(cfg: DemandConfig, queue: QueueSnapshot, history: History, now: float) -> Decision:
    trigger = _trigger(cfg, queue, history, now)
    if trigger is None:
        return Decision(False, "nothing to do")
    if history.last_session_start is not None and now - history.last_session_start < cfg.min_gap:
        return Decision(False, f"{trigger}, but the last session was less than {cfg.min_gap}s ago", refused=True)
    if cfg.max_sessions_per_day is not None and history.sessions_today >= cfg.max_sessions_per_day:
        return Decision(False, f"{trigger}, but the daily budget of {cfg.max_sessions_per_day} sessions is used up",
                        refused=True)
    if cfg.max_minutes_per_day is not None and history.minutes_today >= cfg.max_minutes_per_day:
        return Decision(False, f"{trigger}, but the daily budget of {cfg.max_minutes_per_day:g} connected "
                               f"minutes is used up", refused=True)
    return Decision(True, trigger)


def _trigger(cfg: DemandConfig, queue: QueueSnapshot, history: History, now: float) -> str | None:
    if cfg.urgent_after is not None and queue.oldest_urgent is not None \
            and now - queue.oldest_urgent >= cfg.urgent_after:
        return f"urgent mail waiting {int(now - queue.oldest_urgent)}s"
    if queue.messages and cfg.min_messages is not None and queue.messages >= cfg.min_messages:
        return f"{queue.messages} messages queued (threshold {cfg.min_messages})"
    if queue.messages and cfg.min_bytes is not None and queue.bytes >= cfg.min_bytes:
        return f"{queue.bytes} bytes queued (threshold {cfg.min_bytes})"
    if cfg.collect_every is not None:
        if history.last_collection is None or now - history.last_collection >= cfg.collect_every:
            return "collection due"
    return None
