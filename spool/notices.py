"""Queueing a bounce or a delay warning about a message, atomically with what it reports.

A message with one bad recipient and others still waiting for the link gets its bounce
at once, not when the last recipient is done days later; the catalogue's
``bounce_reported`` table (created with the queue's) remembers which recipients that
bounce covered, so the final one reports only the rest.  Rows go with their message
(ON DELETE CASCADE).

Each step here is one transaction with the notice's own enqueue:

* ``queue_bounce``: the bounce is queued, and its recipients marked reported -- or, when
  no recipient is left waiting, the message removed -- so a crash can neither lose nor
  duplicate a bounce;
* ``queue_warning``: the delay warning is queued and the message marked warned, so a
  sender gets one warning, never two.

Both re-read the message inside the transaction: when another worker changed it since
the caller read it, ``QueueChanged`` is raised, nothing is queued, and the caller reads
again.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from spool.queue import BOUNCED, FINAL, Queue, journal


class QueueChanged(Exception):
    """The message changed between reading it and queueing its notice: read it again."""


@dataclass(frozen=True)
class Notice:
    """A notice from the null sender about queued message ``about`` to one recipient."""
    about: str  # the queue id of the message it reports on
    to: str
    route: str
    data: bytes | Iterable[bytes]
    origin: str
    subject: str
    smtputf8: bool = False


@dataclass(frozen=True)
class Bounced:
    notice_id: str
    removed: bool  # the message reported on left the queue with it


def reported(queue: Queue, qid: str) -> set[str]:
    """The bounced recipients of ``qid`` whose sender has been told."""
    return {r[0] for r in queue.cat.execute("SELECT rcpt FROM bounce_reported WHERE msg_id=?", (qid,))}


def queue_bounce(queue: Queue, notice: Notice, rcpts: Iterable[str]) -> Bounced:
    """Queue ``notice`` reporting bounced ``rcpts`` (exactly the ones not reported yet)."""
    step = _ReportBounced(notice.about, sorted(rcpts))
    notice_id = _enqueue(queue, notice, step)
    if step.removed:
        queue.discard_body(notice.about)
    return Bounced(notice_id, step.removed)


def queue_warning(queue: Queue, notice: Notice) -> str:
    """Queue the delay warning ``notice`` unless the message was warned already."""
    return _enqueue(queue, notice, MarkWarned(notice.about))


def _enqueue(queue: Queue, notice: Notice, then) -> str:
    return queue.enqueue("", [(notice.to, notice.route)], notice.data, origin=notice.origin, client=notice.about,
                         subject=notice.subject, smtputf8=notice.smtputf8, then=then)


@dataclass(frozen=True)
class MarkWarned:
    """``then`` of a delay warning: the message it is about is marked warned."""
    about: str

    def __call__(self, conn: sqlite3.Connection, _notice_id: str) -> None:
        journal(conn, self.about, [{"warned": True}])
        if conn.execute("UPDATE messages SET warned=1 WHERE id=? AND warned=0", (self.about,)).rowcount != 1:
            raise QueueChanged(self.about)

    def journal(self) -> dict:
        return {"kind": "warned", "about": self.about}

    @staticmethod
    def replay(conn: sqlite3.Connection, step: dict) -> None:
        conn.execute("UPDATE messages SET warned=1 WHERE id=?", (step["about"],))


class _ReportBounced:
    def __init__(self, qid: str, rcpts: list[str]):
        self.qid = qid
        self.rcpts = rcpts
        self.removed = False

    def journal(self) -> dict:
        return {"kind": "reported", "about": self.qid, "rcpts": self.rcpts}

    @staticmethod
    def replay(conn: sqlite3.Connection, step: dict, notice_id: str) -> bool:
        """Mark the bounces reported when the notice is imported again; True when the
        message reported on has nothing left waiting and left the queue."""
        qid = step["about"]
        if conn.execute("SELECT 1 FROM messages WHERE id=?", (qid,)).fetchone() is None:
            return False
        conn.executemany("INSERT OR IGNORE INTO bounce_reported(msg_id, rcpt, notice) VALUES (?,?,?)",
                         [(qid, r, notice_id) for r in step["rcpts"]])
        return False

    def __call__(self, conn: sqlite3.Connection, notice_id: str) -> None:
        qid = self.qid
        if conn.execute("SELECT 1 FROM messages WHERE id=?", (qid,)).fetchone() is None:
            raise QueueChanged(qid)  # another worker settled it meanwhile
        told = {r[0] for r in conn.execute("SELECT rcpt FROM bounce_reported WHERE msg_id=?", (qid,))}
        bounced = sorted(r for (r,) in conn.execute(
            "SELECT rcpt FROM recipients WHERE msg_id=? AND status=?", (qid, BOUNCED)) if r not in told)
        if bounced != self.rcpts:
            raise QueueChanged(qid)
        left = conn.execute("SELECT COUNT(*) FROM recipients WHERE msg_id=? AND status NOT IN (?,?)",
                            (qid, *FINAL)).fetchone()[0]
        if left == 0:
            journal(conn, qid, [{"reported": self.rcpts, "notice": notice_id}, {"removed": True}])
            conn.execute("DELETE FROM messages WHERE id=?", (qid,))
        else:
            journal(conn, qid, [{"reported": self.rcpts, "notice": notice_id}])
            conn.executemany("INSERT INTO bounce_reported(msg_id, rcpt, notice) VALUES (?,?,?)",
                             [(qid, r, notice_id) for r in self.rcpts])
        self.removed = left == 0
