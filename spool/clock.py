"""The wall clock's steps, as the spool remembers them.

The spool stamps everything with the wall clock (arrival, next retry, session start):
those stamps survive a reboot and mean something to people.  But NTP, an administrator
or a flat CMOS battery can step the wall clock by hours or days.  The kernel's boot clock
(CLOCK_BOOTTIME: never stepped, counts suspend, the same in every process of one boot)
cannot be stepped, so comparing the two tells a step from time passing.

A ``ClockWatch`` makes that comparison for a running daemon and records each step here
with the wall time just before it, so that queue expiry, in the daemon or in a
``dialmail queue flush``, can tell a message's real age from its wall-clock age.  The
watch's last reading is kept too: a daemon restarted on the same boot still sees a step
made while it was stopped.  Across a reboot only the wall clock is left, and it is
believed (that is what it is for).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from spool.queue import Catalogue, Queue

SCHEMA = """
CREATE TABLE IF NOT EXISTS clock_steps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    before REAL NOT NULL,
    seconds REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS clock_reading (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    boot TEXT NOT NULL,
    wall REAL NOT NULL,
    uptime REAL NOT NULL
);
"""

# NTP slews small errors (at most 0.5 ms per second) and steps big ones (128 ms and up,
# usually far more): a difference under STEP_TOLERANCE, or under what slewing can do in
# the time between two readings, is no step.
STEP_TOLERANCE = 2.0
SLEW_RATE = 500e-6

# How often a running watch saves its reading (the restart check compares against it).
SAVE_EVERY = 300.0

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def uptime() -> float:
    """Seconds since boot on a clock nobody can step (suspend included where the OS can)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


def boot_id() -> str:
    """This boot's identity ("" where the OS does not say): uptimes compare only within one."""
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class Step:
    """The wall clock jumped by ``seconds`` (negative: back) right after wall time ``before``.

    A stamp at or before ``before`` was made before the step; a later one may have been
    made after it (a forward step of more than the time between two readings leaves no
    doubt; otherwise the doubt is at most that time).
    """
    before: float
    seconds: float


class ClockSteps:
    """The steps seen while messages now in the queue were waiting."""

    def __init__(self, catalogue: Catalogue):
        self.cat = catalogue
        # executescript commits whatever the shared connection has open: under the lock,
        # so it can never commit half of another thread's transaction.
        with self.cat.lock:
            self.cat.conn.executescript(SCHEMA)

    @classmethod
    def of(cls, queue: Queue) -> "ClockSteps":
        """The steps kept beside ``queue`` (in the same spool database)."""
        return cls(queue.cat)

    def record(self, step: Step) -> None:
        self.cat.execute("INSERT INTO clock_steps(before, seconds) VALUES (?,?)", (step.before, step.seconds))

    def all(self) -> list[Step]:
        return [Step(r["before"], r["seconds"])
                for r in self.cat.execute("SELECT before, seconds FROM clock_steps ORDER BY id")]

    def forget_before(self, wall: float) -> None:
        """Drop steps older than every message still queued: they change no one's age."""
        self.cat.execute("DELETE FROM clock_steps WHERE before < ?", (wall,))

    def reading(self, boot: str) -> tuple[float, float] | None:
        """The last saved (wall, uptime) reading, if it was taken on this boot."""
        row = self.cat.execute("SELECT boot, wall, uptime FROM clock_reading").fetchone()
        if row is None or not boot or row["boot"] != boot:
            return None
        return row["wall"], row["uptime"]

    def save_reading(self, boot: str, wall: float, up: float) -> None:
        self.cat.execute("INSERT OR REPLACE INTO clock_reading(one, boot, wall, uptime) VALUES (1,?,?,?)",
                         (boot, wall, up))


class ClockWatch:
    """Compares the wall clock with the boot clock at every ``observe`` and records steps."""

    def __init__(self, catalogue: Catalogue, boot: str | None = None):
        self.catalogue = catalogue
        self.steps: ClockSteps | None = None  # opened by the first observe, in its thread
        self.boot = boot_id() if boot is None else boot
        self._last: tuple[float, float] | None = None
        self._saved_at: float | None = None

    def observe(self, wall: float, up: float) -> Step | None:
        """Take a reading; the step since the last one (also recorded in the spool), if any.

        The first reading of a run is compared with the one a previous run saved on the
        same boot.  Call it from a worker thread: it may write to the spool.
        """
        if self.steps is None:
            self.steps = ClockSteps(self.catalogue)
        last = self._last
        if last is None:
            last = self.steps.reading(self.boot)
        self._last = (wall, up)
        step = None
        if last is not None:
            last_wall, last_up = last
            elapsed = up - last_up
            jump = (wall - last_wall) - elapsed
            if abs(jump) > max(STEP_TOLERANCE, SLEW_RATE * elapsed):
                # Before the step the wall clock ran at most ``elapsed`` past the last reading.
                step = Step(before=last_wall + elapsed, seconds=jump)
                self.steps.record(step)
        if step is not None or self._saved_at is None or up - self._saved_at >= SAVE_EVERY:
            self.steps.save_reading(self.boot, wall, up)
            self._saved_at = up
        return step
