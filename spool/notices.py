"""Which bounced recipients the sender has already been told about.

A message with one bad recipient and others still waiting for the link gets its bounce
at once, not when the last recipient is done days later; this table remembers which
recipients that bounce covered, so the final one reports only the rest.  Rows go with
their message (ON DELETE CASCADE).  Written only inside the transaction that queues the
bounce, so "bounce queued" and "recipient reported" cannot disagree after a crash.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from spool.queue import Catalogue

SCHEMA = """
CREATE TABLE IF NOT EXISTS bounce_reported (
    msg_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    rcpt TEXT NOT NULL,
    notice TEXT NOT NULL,
    PRIMARY KEY (msg_id, rcpt)
);
"""

def ensure(cat: Catalogue) -> None:
    """Create the table once per open catalogue."""
    if not getattr(cat, "_bounce_reported_ready", False):
        with cat.lock:
            cat.conn.executescript(SCHEMA)
        cat._bounce_reported_ready = True


def reported(conn: sqlite3.Connection, qid: str) -> set[str]:
    return {r[0] for r in conn.execute("SELECT rcpt FROM bounce_reported WHERE msg_id=?", (qid,))}


def mark(conn: sqlite3.Connection, qid: str, rcpts: Iterable[str], notice: str) -> None:
    conn.executemany("INSERT INTO bounce_reported(msg_id, rcpt, notice) VALUES (?,?,?)",
                     [(qid, r, notice) for r in rcpts])


def reported_of(cat: Catalogue, qid: str) -> set[str]:
    return {r[0] for r in cat.execute("SELECT rcpt FROM bounce_reported WHERE msg_id=?", (qid,))}
