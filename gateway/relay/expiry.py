"""Queue lifetime and delay warnings, by the wall clock and by real time.

Run at the start of every flush and every few minutes by the daemon's scheduler, link or
no link: being offline never bounces anything by itself, only a message older than
``[queue] queue_lifetime`` does (its waiting recipients fail with 4.4.7 and the last
error seen).  Once a message is older than ``delay_warning`` (0 = never) and still has
waiting recipients, its sender gets one warning.  Held messages neither expire nor warn
while held: the administrator is looking at them.

A message's age must be reached by BOTH clocks: the wall clock (arrival stamp to now)
and real time, which is the wall-clock age less the steps the daemon saw the wall clock
make since the message arrived (spool.clock).  So a clock stepped forward by days bounces
nothing early, and a clock stepped back only makes mail wait longer, never bounce sooner.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from gateway.config import Config
from gateway.mail import outcome
from gateway.office import bounce
from spool.clock import ClockSteps, Step
from spool.queue import Queue, Recipient

log = logging.getLogger("dialmail.expiry")


@dataclass
class Expired:
    bounced: list[str] = field(default_factory=list)  # queue ids whose waiting recipients expired
    warned: list[str] = field(default_factory=list)
    local_notices: int = 0  # notices queued for local delivery (kick it)

    def __bool__(self) -> bool:
        """True when local delivery has something new (the scheduler kicks it then)."""
        return bool(self.local_notices)


def expire(config: Config, queue: Queue, now: float | None = None) -> Expired:
    now = time.time() if now is None else now
    lifetime, warning = config.queue.queue_lifetime, config.queue.delay_warning
    result = Expired()
    steps = ClockSteps.of(queue)
    stepped = steps.all()
    messages = queue.messages()
    if stepped:
        steps.forget_before(min((m.arrival for m in messages), default=now))
    for msg in messages:
        if msg.hold or not msg.pending:
            continue
        age = age_by_both_clocks(msg.arrival, now, stepped)
        if age >= lifetime:
            n = _fail_waiting(queue, msg.id, lifetime)
            if n:
                log.info("%s: expired after %ds in the queue; %d recipient(s) bounced", msg.id, int(age), n)
                result.bounced.append(msg.id)
                settled = bounce.settle(config, queue, msg.id, now=now)
                result.local_notices += settled.local
        elif warning and age >= warning and not msg.warned:
            settled = bounce.warn_delayed(config, queue, msg, now=now)
            if settled.bounce_id:
                result.warned.append(msg.id)
                result.local_notices += settled.local
    return result


def age_by_both_clocks(arrival: float, now: float, steps: list[Step]) -> float:
    """The smaller of the wall-clock age and the real age (wall age less later steps)."""
    wall_age = now - arrival
    real_age = wall_age - sum(s.seconds for s in steps if arrival <= s.before)
    return min(wall_age, real_age)


def _fail_waiting(queue: Queue, qid: str, lifetime: int) -> int:
    """Fail the waiting recipients not being worked on right now (a claim = in flight)."""
    def why(r: Recipient) -> outcome.Outcome:
        return outcome.expired(lifetime, r.last_code, r.last_reply)

    return queue.fail_waiting(qid, why)
