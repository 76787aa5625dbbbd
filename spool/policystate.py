"""Durable state of the delivery policy, in the spool database beside the queue.

* round-robin groups: one counter per group, advanced atomically, and the member picked
  for each (message, recipient) remembered, so a delivery repeated after a crash goes to
  the same member instead of a second one (exactly once, and fair across restarts);
* automatic replies: who was answered by which address when (at most one reply per
  sender per interval, also across restarts);
* out-of-office settings made with ``dialmail users vacation`` (they win over the
  configuration file's ``[vacation.USER]``);
* forwarding set with ``dialmail users forward`` or the web console (it wins over the
  configuration file's ``[forward]`` entry for that user, as a stored out-of-office does);
* forwarded copies already queued, so a retried delivery does not queue a second copy;
* mailboxes a message was handed to by LMTP: "sending" before the message goes, "taken"
  at the server's 2xx, so a retry skips what was taken and knows which copies may have
  been stored without a reply (a connection cut after the final dot, a kill -9).
"""
from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from spool.queue import Catalogue, Queue

SCHEMA = """
CREATE TABLE IF NOT EXISTS rr_counter (grp TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rr_pick (
    msg_id TEXT NOT NULL, rcpt TEXT NOT NULL, grp TEXT NOT NULL, member TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (msg_id, rcpt, grp));
CREATE TABLE IF NOT EXISTS autoreply_sent (
    responder TEXT NOT NULL, sender TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (responder, sender));
CREATE TABLE IF NOT EXISTS vacation (
    user TEXT PRIMARY KEY, enabled INTEGER NOT NULL, start REAL, end REAL, subject TEXT, body TEXT,
    every INTEGER, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS forward_rule (
    user TEXT PRIMARY KEY, enabled INTEGER NOT NULL, targets TEXT NOT NULL, keep INTEGER NOT NULL,
    updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS forwarded (
    msg_id TEXT NOT NULL, rcpt TEXT NOT NULL, new_id TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (msg_id, rcpt));
CREATE TABLE IF NOT EXISTS handed_over (
    msg_id TEXT NOT NULL, rcpt TEXT NOT NULL, mailbox TEXT NOT NULL, taken INTEGER NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (msg_id, rcpt, mailbox));
"""

# Picks and forward markers are only needed while their message is in the queue.
KEEP_MARKERS = 30 * 86400


@dataclass(frozen=True)
class StoredVacation:
    user: str
    enabled: bool
    start: float | None
    end: float | None
    subject: str | None
    body: str | None
    every: int | None


@dataclass(frozen=True)
class StoredForward:
    """A user's forwarding as set at run time; ``enabled`` False turns off the config's too."""
    user: str
    enabled: bool
    to: tuple[str, ...]
    keep: bool


@dataclass(frozen=True)
class Replied:
    """Queued with an automatic reply: ``responder`` answered ``sender`` at ``at``
    ('answered' and 'queued' never disagree)."""
    responder: str
    sender: str
    at: float

    def __call__(self, conn: sqlite3.Connection, _reply_id: str) -> None:
        conn.execute("INSERT OR REPLACE INTO autoreply_sent(responder, sender, at) VALUES (?,?,?)",
                     (self.responder.lower(), self.sender.lower(), self.at))

    def journal(self) -> dict:
        return {"kind": "replied", "responder": self.responder, "sender": self.sender, "at": self.at}


@dataclass(frozen=True)
class Forwarded:
    """Queued with a forwarded copy of ``msg_id`` for ``rcpt``: a retried delivery finds it."""
    msg_id: str
    rcpt: str

    def __call__(self, conn: sqlite3.Connection, copy_id: str) -> None:
        conn.execute("INSERT OR REPLACE INTO forwarded(msg_id, rcpt, new_id, at) VALUES (?,?,?,?)",
                     (self.msg_id, self.rcpt, copy_id, time.time()))

    def journal(self) -> dict:
        return {"kind": "forwarded", "msg_id": self.msg_id, "rcpt": self.rcpt}


class PolicyState:
    def __init__(self, catalogue: Catalogue):
        self.cat = catalogue
        with self.cat.lock:
            self.cat.conn.executescript(SCHEMA)

    @classmethod
    def beside(cls, queue: Queue) -> "PolicyState":
        """The policy state in the same spool database as ``queue``."""
        return cls(queue.cat)

    # ------------------------------------------------------------ round robin

    def pick(self, group: str, members: tuple[str, ...], msg_id: str, rcpt: str) -> str:
        """The member of ``group`` that gets this (message, recipient): the next in turn, once."""
        with self.cat.transaction() as conn:
            row = conn.execute("SELECT member FROM rr_pick WHERE msg_id=? AND rcpt=? AND grp=?",
                               (msg_id, rcpt, group)).fetchone()
            if row is not None and row["member"] in members:
                return row["member"]
            # BEGIN IMMEDIATE holds the write lock: no other process can take the same turn.
            n = conn.execute("INSERT INTO rr_counter(grp, n) VALUES (?, 0) "
                             "ON CONFLICT(grp) DO UPDATE SET n=n+1 RETURNING n", (group,)).fetchone()[0]
            member = members[n % len(members)]
            conn.execute("INSERT OR REPLACE INTO rr_pick(msg_id, rcpt, grp, member, at) VALUES (?,?,?,?,?)",
                         (msg_id, rcpt, group, member, time.time()))
        return member

    # ------------------------------------------------------------ automatic replies

    def replied_since(self, responder: str, sender: str, since: float) -> bool:
        row = self.cat.execute("SELECT at FROM autoreply_sent WHERE responder=? AND sender=?",
                               (responder.lower(), sender.lower())).fetchone()
        return row is not None and row["at"] >= since

    # ------------------------------------------------------------ vacation

    def set_vacation(self, user: str, start: float | None, end: float | None, subject: str | None,
                     body: str | None, every: int | None) -> None:
        self.cat.execute("INSERT OR REPLACE INTO vacation(user, enabled, start, end, subject, body, every, updated)"
                         " VALUES (?,1,?,?,?,?,?,?)", (user, start, end, subject, body, every, time.time()))

    def vacation_off(self, user: str) -> None:
        self.cat.execute("INSERT OR REPLACE INTO vacation(user, enabled, updated) VALUES (?,0,?)",
                         (user, time.time()))

    def vacation(self, user: str) -> StoredVacation | None:
        row = self.cat.execute("SELECT * FROM vacation WHERE user=?", (user,)).fetchone()
        return None if row is None else _vacation(row)

    def vacations(self) -> list[StoredVacation]:
        return [_vacation(r) for r in self.cat.execute("SELECT * FROM vacation ORDER BY user")]

    # ------------------------------------------------------------ forwarding rules

    def set_forward(self, user: str, to: tuple[str, ...], keep: bool) -> None:
        self.cat.execute("INSERT OR REPLACE INTO forward_rule(user, enabled, targets, keep, updated)"
                         " VALUES (?,1,?,?,?)", (user, "\n".join(to), int(keep), time.time()))

    def forward_off(self, user: str) -> None:
        self.cat.execute("INSERT OR REPLACE INTO forward_rule(user, enabled, targets, keep, updated)"
                         " VALUES (?,0,'',0,?)", (user, time.time()))

    def forward(self, user: str) -> StoredForward | None:
        row = self.cat.execute("SELECT * FROM forward_rule WHERE user=?", (user,)).fetchone()
        return None if row is None else _forward(row)

    def forwards(self) -> list[StoredForward]:
        return [_forward(r) for r in self.cat.execute("SELECT * FROM forward_rule ORDER BY user")]

    # ------------------------------------------------------------ forwarded copies

    def forwarded(self, msg_id: str, rcpt: str) -> str | None:
        row = self.cat.execute("SELECT new_id FROM forwarded WHERE msg_id=? AND rcpt=?", (msg_id, rcpt)).fetchone()
        return row["new_id"] if row else None

    # ------------------------------------------------------------ LMTP hand-overs

    def handed_over(self, msg_id: str, rcpt: str) -> dict[str, bool]:
        """``rcpt``'s mailboxes that ``msg_id`` was sent to by LMTP: True when the server
        took it, False when it was sending and no answer was recorded."""
        return {row["mailbox"]: bool(row["taken"]) for row in self.cat.execute(
            "SELECT mailbox, taken FROM handed_over WHERE msg_id=? AND rcpt=?", (msg_id, rcpt))}

    def sending(self, msg_id: str, rcpt: str, mailboxes: list[str]) -> None:
        """Before the message goes: from here on a copy may be stored without our knowing."""
        self._set(msg_id, rcpt, mailboxes, taken=False)

    def taken(self, msg_id: str, rcpt: str, mailboxes: list[str]) -> None:
        self._set(msg_id, rcpt, mailboxes, taken=True)

    def not_taken(self, msg_id: str, rcpt: str, mailboxes: list[str]) -> None:
        """The server said no (or was never reached): nothing of these copies was stored."""
        with self.cat.transaction() as conn:
            conn.executemany("DELETE FROM handed_over WHERE msg_id=? AND rcpt=? AND mailbox=?",
                             [(msg_id, rcpt, box) for box in mailboxes])

    def _set(self, msg_id: str, rcpt: str, mailboxes: list[str], taken: bool) -> None:
        at = time.time()
        with self.cat.transaction() as conn:
            conn.executemany("INSERT OR REPLACE INTO handed_over(msg_id, rcpt, mailbox, taken, at) "
                             "VALUES (?,?,?,?,?)", [(msg_id, rcpt, box, int(taken), at) for box in mailboxes])

    def expire(self, now: float | None = None) -> None:
        """Drop markers old enough that their message has surely left the queue."""
        cutoff = (time.time() if now is None else now) - KEEP_MARKERS
        with self.cat.transaction() as conn:
            conn.execute("DELETE FROM forwarded WHERE at<?", (cutoff,))
            conn.execute("DELETE FROM rr_pick WHERE at<?", (cutoff,))
            conn.execute("DELETE FROM handed_over WHERE at<?", (cutoff,))


def _vacation(row) -> StoredVacation:
    return StoredVacation(user=row["user"], enabled=bool(row["enabled"]), start=row["start"], end=row["end"],
                          subject=row["subject"], body=row["body"], every=row["every"])


def _forward(row) -> StoredForward:
    return StoredForward(user=row["user"], enabled=bool(row["enabled"]),
                         to=tuple(t for t in row["targets"].split("\n") if t), keep=bool(row["keep"]))
