"""What each smarthost offered at its last EHLO, in the spool database beside the queue.

The relay records the EHLO keywords of every smarthost connection; SMTP submission reads
them to refuse at RCPT what no flush could carry (a UTF-8 address when the smarthost has
no SMTPUTF8), while the client is still there to be told, instead of a bounce after the
next dial.  Nothing recorded yet (no flush so far, or a new smarthost): nothing refused.
"""
from __future__ import annotations

import time
from collections.abc import Iterable

from spool.queue import Catalogue, Queue

SCHEMA = """
CREATE TABLE IF NOT EXISTS smarthost_ehlo (
    server TEXT PRIMARY KEY, keywords TEXT NOT NULL, at REAL NOT NULL);
"""


class SmarthostMemory:
    def __init__(self, catalogue: Catalogue):
        self.cat = catalogue
        with self.cat.lock:
            self.cat.conn.executescript(SCHEMA)

    @classmethod
    def beside(cls, queue: Queue) -> "SmarthostMemory":
        return cls(queue.cat)

    def remember(self, server: str, keywords: Iterable[str]) -> None:
        """``server`` ("host:port") offered ``keywords`` (EHLO extension names) just now."""
        self.cat.execute("INSERT OR REPLACE INTO smarthost_ehlo(server, keywords, at) VALUES (?,?,?)",
                         (server, " ".join(sorted({k.upper() for k in keywords})), time.time()))

    def keywords(self, server: str) -> frozenset[str] | None:
        """The extension names ``server`` offered last time, upper-case; None if never seen."""
        row = self.cat.execute("SELECT keywords FROM smarthost_ehlo WHERE server=?", (server,)).fetchone()
        return None if row is None else frozenset(row["keywords"].split())
