"""Dial sessions: the one-at-a-time lock and the log of every session.

The lock is an flock on ``<spool>/locks/session``, so a cron-started ``connect-now`` and
the daemon's scheduler can never bring the link up twice.  The record of a session is
a row in the spool database, written when the session starts and completed when it ends,
so even a session cut short by a kill leaves a trace.

Besides wall-clock stamps a record carries the boot clock's reading at its start and its
time online measured on that clock (spool.clock), so gaps between sessions and connected
minutes stay true when the wall clock is stepped.  They live in the JSON record: older
records simply have none.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from spool.locks import LockBusy, PidLock
from spool.queue import Catalogue

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started REAL NOT NULL,
    ended REAL,
    trigger TEXT NOT NULL,
    mode TEXT NOT NULL,
    outcome TEXT NOT NULL DEFAULT 'running',
    record TEXT NOT NULL
);
"""


@dataclass
class SessionRecord:
    """Everything the session log keeps about one session."""
    trigger: str                      # schedule | demand | manual | retry | flush
    mode: str = "both"                # both | send | fetch
    started: float = field(default_factory=time.time)
    ended: float | None = None
    outcome: str = "running"          # ok | failed | partial | refused
    dial_attempts: list[str] = field(default_factory=list)
    connect_rate: int | None = None
    connected_at: float | None = None
    hung_up_at: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    sent: int = 0
    deferred: int = 0
    bounced: int = 0
    fetched: int = 0
    fetched_bytes: int = 0
    fetch_wire_down: int = 0          # IMAP bytes that carried the fetch, compressed where it was
    fetch_wire_up: int = 0
    etrn_received: int = 0            # messages the ISP delivered by SMTP after our ETRN
    errors: list[str] = field(default_factory=list)
    carrier_lost: bool = False        # the line dropped while online (a retry may follow)
    cost: float = 0.0
    transcript: str | None = None     # path of the dialogue/protocol transcript
    boot: str | None = None           # spool.clock.boot_id() of the boot it ran on
    started_uptime: float | None = None  # spool.clock.uptime() at the start
    online_seconds: float | None = None  # link up to hang-up, on the boot clock

    @property
    def connected_seconds(self) -> float:
        if self.connected_at is None:
            return 0.0
        if self.online_seconds is not None:
            return self.online_seconds
        return max(0.0, (self.hung_up_at or self.ended or time.time()) - self.connected_at)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "SessionRecord":
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


class SessionLog:
    def __init__(self, catalogue: Catalogue):
        self.cat = catalogue
        with self.cat.lock:  # executescript commits what another thread may have open
            self.cat.conn.executescript(SCHEMA)

    def start(self, record: SessionRecord) -> int:
        cur = self.cat.execute("INSERT INTO sessions(started, trigger, mode, record) VALUES (?,?,?,?)",
                               (record.started, record.trigger, record.mode, record.to_json()))
        return int(cur.lastrowid)

    def update(self, session_id: int, record: SessionRecord) -> None:
        self.cat.execute("UPDATE sessions SET ended=?, outcome=?, record=? WHERE id=?",
                         (record.ended, record.outcome, record.to_json(), session_id))

    def last(self, n: int = 10) -> list[tuple[int, SessionRecord]]:
        rows = self.cat.execute("SELECT id, record FROM sessions ORDER BY id DESC LIMIT ?", (n,)).fetchall()
        return [(r["id"], SessionRecord.from_json(r["record"])) for r in reversed(rows)]

    def get(self, session_id: int) -> SessionRecord | None:
        row = self.cat.execute("SELECT record FROM sessions WHERE id=?", (session_id,)).fetchone()
        return None if row is None else SessionRecord.from_json(row["record"])

    def since(self, when: float, until: float = float("inf")) -> list[SessionRecord]:
        """Sessions started from wall time ``when`` up to ``until``."""
        rows = self.cat.execute("SELECT record FROM sessions WHERE started>=? AND started<=? ORDER BY id",
                                (when, until)).fetchall()
        return [SessionRecord.from_json(r["record"]) for r in rows]


class SessionBusy(Exception):
    """Another session (maybe in another process) holds the link."""


class SessionLock(PidLock):
    """One dial session at a time per spool, across processes."""

    def __init__(self, spool_dir: Path):
        super().__init__(Path(spool_dir) / "locks" / "session")

    def acquire(self) -> None:
        try:
            super().acquire()
        except LockBusy as exc:
            raise SessionBusy(f"a dial session is already running (pid {exc.holder})") from None

    def __enter__(self) -> "SessionLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
