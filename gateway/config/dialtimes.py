"""When to dial: the ``[schedule] dial`` strings.

Grammar (case-insensitive; one rule per string):

    08:00                                   every day at 08:00
    monday 07:30 / mon,wed,fri 12:00        on those days at that time
    weekdays 08:00 / weekends 10:00         mon-fri / sat-sun
    every 30 minutes / every 2 hours        intervals, aligned to midnight
    every 30 minutes from 08:00 to 18:00    ... only inside the window (ends included)
    every hour on weekdays                  ... only on those days
    every 30 minutes from 08:00 to 18:00 on weekdays
    */30 8-18 * * 1-5                       a crontab line (5 fields, via croniter)

Each rule computes its next time from any instant (``next_after``), so it is tested
with an injected clock.  At run time the rules are jobs of a ``schedule.Scheduler``:
the library keeps the job list, the pending loop and idle time; the rule supplies the
time arithmetic the library lacks (windows, several weekdays, cron lines).
"""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Callable

import schedule
from croniter import croniter

DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_DAY_ALIASES = {d[:3]: i for i, d in enumerate(DAYS)} | {d: i for i, d in enumerate(DAYS)} | \
    {"tues": 1, "wednes": 2, "thur": 3, "thurs": 3}
ALL_DAYS = frozenset(range(7))


class ScheduleError(ValueError):
    pass


@dataclass(frozen=True)
class DialRule:
    text: str
    days: frozenset[int] = ALL_DAYS
    at: dt.time | None = None           # a fixed time of day
    interval: int | None = None         # seconds, aligned to midnight
    window: tuple[dt.time, dt.time] | None = None
    cron: str | None = None

    def next_after(self, now: dt.datetime) -> dt.datetime:
        """The first dial time strictly after ``now`` (naive local time)."""
        if self.cron:
            return croniter(self.cron, now).get_next(dt.datetime)
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        for _ in range(8):
            if day.weekday() in self.days:
                for t in self._times(day):
                    if t > now:
                        return t
            day += dt.timedelta(days=1)
        raise AssertionError("a rule always fires within a week")

    def _times(self, day: dt.datetime):
        if self.at is not None:
            yield day.replace(hour=self.at.hour, minute=self.at.minute)
            return
        start, end = self.window or (dt.time(0, 0), dt.time(23, 59, 59))
        step = dt.timedelta(seconds=self.interval)
        t = day
        while t.date() == day.date():
            if start <= t.time() <= end:
                yield t
            t += step


def parse(text: str) -> DialRule:
    s = " ".join(text.strip().lower().split())
    if not s:
        raise ScheduleError("an empty schedule string")
    fields = s.split(" ")
    if len(fields) == 5 and all(re.fullmatch(r"[\d*][\d*/,\-]*", f) for f in fields[:2]) and ":" not in s:
        if not croniter.is_valid(s):
            raise ScheduleError(f"{text!r} is not a valid crontab line (minute hour day month weekday)")
        return DialRule(text=text, cron=s)
    m = re.fullmatch(r"every (?:(\d+) )?(minutes?|mins?|hours?|hrs?)"
                     r"(?: from (\d{1,2}:\d{2}) to (\d{1,2}:\d{2}))?(?: on (.+))?", s)
    if m:
        n = int(m.group(1) or 1)
        unit = 60 if m.group(2).startswith("m") else 3600
        if n <= 0:
            raise ScheduleError(f"{text!r}: the interval must be positive")
        if n * unit < 60 or n * unit > 86400 or 86400 % (n * unit):
            raise ScheduleError(f"{text!r}: the interval must divide a day (e.g. 15, 20, 30 minutes; 2, 3, 4 hours)")
        window = None
        if m.group(3):
            window = (_time(m.group(3), text), _time(m.group(4), text))
            if window[0] > window[1]:
                raise ScheduleError(f"{text!r}: the window must not cross midnight (write two rules)")
        days = _days(m.group(5), text) if m.group(5) else ALL_DAYS
        return DialRule(text=text, interval=n * unit, window=window, days=days)
    m = re.fullmatch(r"(?:(.+?) )?(?:at )?(\d{1,2}:\d{2})", s)
    if m:
        days = _days(m.group(1), text) if m.group(1) else ALL_DAYS
        return DialRule(text=text, at=_time(m.group(2), text), days=days)
    raise ScheduleError(f"{text!r} is not a schedule: use e.g. \"08:00\", \"monday 07:30\", \"every 30 minutes "
                        f"from 08:00 to 18:00 on weekdays\" or a crontab line \"*/30 8-18 * * 1-5\"")


def _time(text: str, whole: str) -> dt.time:
    h, m = text.split(":")
    if not (0 <= int(h) <= 23 and 0 <= int(m) <= 59):
        raise ScheduleError(f"{whole!r}: {text} is not a time of day")
    return dt.time(int(h), int(m))


def _days(text: str, whole: str) -> frozenset[int]:
    text = text.replace(" and ", ",").replace(" ", ",")
    if text in ("weekdays", "workdays"):
        return frozenset(range(5))
    if text in ("weekends", "weekend"):
        return frozenset((5, 6))
    if text in ("daily", "every,day", "day"):
        return ALL_DAYS
    out: set[int] = set()
    for part in filter(None, text.split(",")):
        a, dash, b = part.partition("-")
        try:
            first = _DAY_ALIASES[a.rstrip("s")] if a not in _DAY_ALIASES else _DAY_ALIASES[a]
            last = (_DAY_ALIASES[b.rstrip("s")] if b not in _DAY_ALIASES else _DAY_ALIASES[b]) if dash else first
        except KeyError:
            raise ScheduleError(f"{whole!r}: {part!r} is not a day of the week") from None
        i = first
        while True:
            out.add(i)
            if i == last:
                break
            i = (i + 1) % 7
    return frozenset(out)


def parse_all(texts) -> tuple[DialRule, ...]:
    return tuple(parse(t) for t in texts)


def next_dial(rules, now: dt.datetime) -> dt.datetime | None:
    return min((r.next_after(now) for r in rules), default=None)


class RuleJob(schedule.Job):
    """A schedule job whose next run comes from a DialRule."""

    def __init__(self, rule: DialRule, scheduler: schedule.Scheduler, now: Callable[[], dt.datetime]):
        super().__init__(1, scheduler)
        self.rule = rule
        self._now = now
        self.unit = "rule"

    def _schedule_next_run(self) -> None:
        self.next_run = self.rule.next_after(self._now())

    def __repr__(self) -> str:
        return f"DialRule({self.rule.text!r}, next {self.next_run})"


def replan(scheduler: schedule.Scheduler) -> None:
    """Work out every job's next run again from now: after the wall clock was stepped back.

    The library keeps a next run computed before the step, which now lies as far ahead
    as the step was long, and every dial until then would be skipped; cron, which reads
    the clock afresh each minute, would not skip them.
    """
    for job in scheduler.jobs:
        job._schedule_next_run()


def install(scheduler: schedule.Scheduler, rules, fire: Callable[[DialRule], None],
            now: Callable[[], dt.datetime] = dt.datetime.now) -> list[RuleJob]:
    jobs = []
    for rule in rules:
        job = RuleJob(rule, scheduler, now)
        job.do(fire, rule)
        jobs.append(job)
    return jobs
