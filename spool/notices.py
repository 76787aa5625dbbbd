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

from spool.queue import BOUNCED, FINAL, Queue


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
    def warned(conn: sqlite3.Connection, _notice_id: str) -> None:
        if conn.execute("UPDATE messages SET warned=1 WHERE id=? AND warned=0", (notice.about,)).rowcount != 1:
            raise QueueChanged(notice.about)

    return _enqueue(queue, notice, warned)


def _enqueue(queue: Queue, notice: Notice, then) -> str:
    return queue.enqueue("", [(notice.to, notice.route)], notice.data, origin=notice.origin, client=notice.about,
                         subject=notice.subject, smtputf8=notice.smtputf8, then=then)


class _ReportBounced:
    def __init__(self, qid: str, rcpts: list[str]):
        self.qid = qid
        self.rcpts = rcpts
        self.removed = False

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
            conn.execute("DELETE FROM messages WHERE id=?", (qid,))
        else:
            conn.executemany("INSERT INTO bounce_reported(msg_id, rcpt, notice) VALUES (?,?,?)",
                             [(qid, r, notice_id) for r in self.rcpts])
        self.removed = left == 0
