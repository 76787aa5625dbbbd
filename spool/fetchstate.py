"""What has been taken from the ISP's mailboxes: the fetch state, kept in the spool catalogue.

Every write that says "this copy is ours now" happens inside the queue's enqueue
transaction (``Queue.enqueue_file(then=...)`` given a ``Taking`` or a ``Noticing``), so a
message is in the spool exactly when its UID is recorded as taken; a cut connection or a
kill -9 at any point leaves the two in agreement.  The fetcher never holds the connection:
what it may record is the methods and ``then`` steps here.

Tables:

- ``fetch_folders``: per account and folder the UIDVALIDITY the UIDs below belong to.
- ``fetch_uids``: UIDs taken, with when (for keep_days) and whether the ISP copy is
  still to be deleted (``pending_delete``); a row goes when the server no longer has it.
- ``fetch_copies``: digests of copies taken (size + header block), to recognise them
  again after the server renumbered a folder (UIDVALIDITY change).
- ``fetch_delivered``: (recipient, Message-ID digest) already handed to local delivery,
  so the same message never reaches the same person twice, whichever copy it came in.
- ``fetch_notices``: notices sent about copies left on the server (oversize), once each.

``AccountLock`` keeps two fetches of one account apart, across processes too.
"""
from __future__ import annotations

import fcntl
import os
import re
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from spool.queue import Catalogue, journal

SCHEMA = """
CREATE TABLE IF NOT EXISTS fetch_folders (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    PRIMARY KEY (account, folder)
);
CREATE TABLE IF NOT EXISTS fetch_uids (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    uid INTEGER NOT NULL,
    fetched REAL NOT NULL,
    size INTEGER NOT NULL,
    pending_delete INTEGER NOT NULL DEFAULT 0,
    qid TEXT,
    PRIMARY KEY (account, folder, uid)
);
CREATE TABLE IF NOT EXISTS fetch_copies (
    account TEXT NOT NULL,
    digest TEXT NOT NULL,
    fetched REAL NOT NULL,
    PRIMARY KEY (account, digest)
);
CREATE TABLE IF NOT EXISTS fetch_delivered (
    rcpt TEXT NOT NULL,
    msgid TEXT NOT NULL,
    account TEXT NOT NULL,
    fetched REAL NOT NULL,
    PRIMARY KEY (rcpt, msgid)
);
CREATE TABLE IF NOT EXISTS fetch_notices (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    kind TEXT NOT NULL,
    sent REAL NOT NULL,
    PRIMARY KEY (account, folder, uidvalidity, uid, kind)
);
"""

# Dedupe records older than this are dropped: a copy or Message-ID seen again after half
# a year is a genuine resend, and the tables must not grow without bound.
DEDUPE_RETENTION = 180 * 86400


class AlreadyFetching(Exception):
    """Another fetch of the same account is running (this process or another)."""


class AccountLock:
    """An exclusive flock on ``<spool>/locks/fetch-<account>.lock``.

    flock belongs to the open file, so it also keeps two threads of one process apart.
    """

    def __init__(self, spool_dir: Path, account: str):
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", account)
        self.path = Path(spool_dir) / "locks" / f"fetch-{safe}.lock"
        self.fd: int | None = None

    def __enter__(self) -> "AccountLock":
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyFetching(f"account {self.path.stem[6:]} is being fetched by another process") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass(frozen=True)
class Copy:
    """One copy on the ISP's server, as the fetch state records it once taken."""
    account: str
    folder: str
    uid: int
    size: int
    digest: str | None  # of size and header block (``gateway.fetch.envelope.message_digest``)
    delete: bool        # the ISP copy is to be deleted once this is committed


@dataclass
class Taking:
    """``then`` of the enqueue that spools one copy: in the same transaction the UID and
    digest are recorded as taken and, with ``msgid`` (a Message-ID digest), each
    (recipient, Message-ID) pair as delivered.

    Another account may have delivered the same message meanwhile: recipients that
    already had it are taken back out of the message being queued, and when that is all
    of them the message row goes too (``had_it_all``); the caller then removes the body
    with ``Queue.remove`` after the commit.
    """
    copy: Copy
    now: float
    recipients: tuple[str, ...] = ()
    msgid: str | None = None
    had_it_all: bool = field(default=False, init=False)

    def __call__(self, conn: sqlite3.Connection, qid: str) -> None:
        c = self.copy
        FetchState.record_taken(conn, c.account, c.folder, c.uid, c.size, c.digest, c.delete, qid, self.now)
        if not self.msgid:
            return
        dups = FetchState.record_delivered(conn, c.account, self.recipients, self.msgid, self.now)
        all_of_them = len(dups) == len(self.recipients)
        journal(conn, qid, [{"dropped": r} for r in dups] + ([{"removed": True}] if all_of_them else []))
        for rcpt in dups:
            conn.execute("DELETE FROM recipients WHERE msg_id=? AND rcpt=?", (qid, rcpt))
        if all_of_them:
            conn.execute("DELETE FROM messages WHERE id=?", (qid,))
            self.had_it_all = True

    def journal(self) -> dict:
        return {"kind": "taking", "copy": asdict(self.copy), "now": self.now, "recipients": list(self.recipients),
                "msgid": self.msgid}

    @staticmethod
    def replay(conn: sqlite3.Connection, step: dict, qid: str) -> None:
        """Record the copy taken again when its message is imported from its queue file
        (the catalogue lost it): the fetcher then never takes the same UID twice.  The
        recipients it had already are in the journal as dropped."""
        c = Copy(**step["copy"])
        FetchState.record_taken(conn, c.account, c.folder, c.uid, c.size, c.digest, c.delete, qid, step["now"])
        if step.get("msgid"):
            FetchState.record_delivered(conn, c.account, step["recipients"], step["msgid"], step["now"])


@dataclass(frozen=True)
class Noticing:
    """``then`` of the enqueue of a notice about a copy (oversize): the notice is recorded
    as sent in the same transaction, so it goes once; ``taken`` (a copy deleted unread by
    the policy) is recorded as taken and pending deletion with it."""
    account: str
    folder: str
    uidvalidity: int
    uid: int
    kind: str
    now: float
    taken: Copy | None = None

    def __call__(self, conn: sqlite3.Connection, qid: str) -> None:
        FetchState.record_notice(conn, self.account, self.folder, self.uidvalidity, self.uid, self.kind, self.now)
        if self.taken is not None:
            t = self.taken
            FetchState.record_taken(conn, t.account, t.folder, t.uid, t.size, t.digest, t.delete, None, self.now)

    def journal(self) -> dict:
        # "kind" names the step in a queue file; the notice's own kind travels as "notice".
        data = {k: v for k, v in asdict(self).items() if k != "kind"}
        return {**data, "kind": "noticing", "notice": self.kind}

    @staticmethod
    def replay(conn: sqlite3.Connection, step: dict) -> None:
        fields = {k: v for k, v in step.items() if k not in ("kind", "notice", "taken")}
        taken = Copy(**step["taken"]) if step.get("taken") else None
        Noticing(**fields, kind=step["notice"], taken=taken)(conn, "")


class FetchState:
    """The fetch tables of one spool, on the spool's catalogue connection."""

    def __init__(self, catalogue: Catalogue):
        self.cat = catalogue
        with self.cat.lock:
            self.cat.conn.executescript(SCHEMA)

    # ------------------------------------------------------------ folders

    def open_folder(self, account: str, folder: str, uidvalidity: int) -> bool:
        """Start work on a folder; returns True when its UIDVALIDITY changed.

        A change voids every UID recorded for the folder (they now name other
        messages or none); copies taken before are then recognised by digest.
        """
        with self.cat.transaction() as conn:
            row = conn.execute("SELECT uidvalidity FROM fetch_folders WHERE account=? AND folder=?",
                               (account, folder)).fetchone()
            if row is not None and row[0] == uidvalidity:
                return False
            conn.execute("DELETE FROM fetch_uids WHERE account=? AND folder=?", (account, folder))
            conn.execute("INSERT OR REPLACE INTO fetch_folders(account, folder, uidvalidity) VALUES (?,?,?)",
                         (account, folder, uidvalidity))
            return row is not None

    def taken(self, account: str, folder: str) -> dict[int, sqlite3.Row]:
        rows = self.cat.execute("SELECT uid, fetched, size, pending_delete FROM fetch_uids "
                                "WHERE account=? AND folder=?", (account, folder)).fetchall()
        return {r["uid"]: r for r in rows}

    def forget_missing(self, account: str, folder: str, on_server: Iterable[int]) -> int:
        """Drop rows of UIDs the server no longer has (expunged, by us or anyone)."""
        present = set(on_server)
        gone = [uid for uid in self.taken(account, folder) if uid not in present]
        self.forget(account, folder, gone)
        return len(gone)

    def forget(self, account: str, folder: str, uids: Iterable[int]) -> None:
        with self.cat.transaction() as conn:
            conn.executemany("DELETE FROM fetch_uids WHERE account=? AND folder=? AND uid=?",
                             [(account, folder, uid) for uid in uids])

    def mark_for_deletion(self, account: str, folder: str, uids: Iterable[int]) -> None:
        with self.cat.transaction() as conn:
            conn.executemany("UPDATE fetch_uids SET pending_delete=1 WHERE account=? AND folder=? AND uid=?",
                             [(account, folder, uid) for uid in uids])

    def pending_deletion(self, account: str, folder: str) -> list[int]:
        return [r["uid"] for r in self.cat.execute(
            "SELECT uid FROM fetch_uids WHERE account=? AND folder=? AND pending_delete=1 ORDER BY uid",
            (account, folder))]

    def older_than(self, account: str, folder: str, when: float) -> list[int]:
        """Taken UIDs kept on the server since before ``when`` (for keep_days)."""
        return [r["uid"] for r in self.cat.execute(
            "SELECT uid FROM fetch_uids WHERE account=? AND folder=? AND pending_delete=0 AND fetched<? "
            "ORDER BY uid", (account, folder, when))]

    def record_copies(self, copies: Iterable[Copy], now: float) -> None:
        """Mark copies taken before (another UID of the same copy): nothing is spooled for them."""
        with self.cat.transaction() as conn:
            for c in copies:
                self.record_taken(conn, c.account, c.folder, c.uid, c.size, c.digest, c.delete, None, now)

    # ------------------------------------------------------------ inside the enqueue transaction

    @staticmethod
    def record_taken(conn: sqlite3.Connection, account: str, folder: str, uid: int, size: int, digest: str | None,
                     delete: bool, qid: str | None, now: float) -> None:
        conn.execute("INSERT OR REPLACE INTO fetch_uids(account, folder, uid, fetched, size, pending_delete, qid) "
                     "VALUES (?,?,?,?,?,?,?)", (account, folder, uid, now, size, int(delete), qid))
        if digest:
            conn.execute("INSERT OR REPLACE INTO fetch_copies(account, digest, fetched) VALUES (?,?,?)",
                         (account, digest, now))

    @staticmethod
    def record_delivered(conn: sqlite3.Connection, account: str, rcpts: Iterable[str], msgid: str,
                         now: float) -> list[str]:
        """Record (rcpt, Message-ID) pairs; returns those already recorded (duplicates)."""
        dups = []
        for rcpt in rcpts:
            cur = conn.execute("INSERT OR IGNORE INTO fetch_delivered(rcpt, msgid, account, fetched) "
                               "VALUES (?,?,?,?)", (rcpt.lower(), msgid, account, now))
            if cur.rowcount == 0:
                dups.append(rcpt)
        return dups

    @staticmethod
    def record_notice(conn: sqlite3.Connection, account: str, folder: str, uidvalidity: int, uid: int,
                      kind: str, now: float) -> None:
        conn.execute("INSERT OR IGNORE INTO fetch_notices(account, folder, uidvalidity, uid, kind, sent) "
                     "VALUES (?,?,?,?,?,?)", (account, folder, uidvalidity, uid, kind, now))

    # ------------------------------------------------------------ lookups

    def known_copies(self, account: str, digests: Iterable[str]) -> set[str]:
        digests = list(digests)
        found: set[str] = set()
        for i in range(0, len(digests), 500):
            part = digests[i:i + 500]
            rows = self.cat.execute(f"SELECT digest FROM fetch_copies WHERE account=? AND digest IN "
                                    f"({','.join('?' * len(part))})", (account, *part))
            found.update(r["digest"] for r in rows)
        return found

    def delivered_to(self, rcpts: Iterable[str], msgid: str) -> set[str]:
        """The recipients among ``rcpts`` that already had this Message-ID."""
        out = set()
        for rcpt in rcpts:
            if self.cat.execute("SELECT 1 FROM fetch_delivered WHERE rcpt=? AND msgid=?",
                                (rcpt.lower(), msgid)).fetchone():
                out.add(rcpt)
        return out

    def notice_sent(self, account: str, folder: str, uidvalidity: int, uid: int, kind: str) -> bool:
        return self.cat.execute("SELECT 1 FROM fetch_notices WHERE account=? AND folder=? AND uidvalidity=? "
                                "AND uid=? AND kind=?", (account, folder, uidvalidity, uid, kind)).fetchone() \
            is not None

    def prune(self, now: float | None = None) -> None:
        cutoff = (time.time() if now is None else now) - DEDUPE_RETENTION
        with self.cat.transaction() as conn:
            conn.execute("DELETE FROM fetch_copies WHERE fetched<?", (cutoff,))
            conn.execute("DELETE FROM fetch_delivered WHERE fetched<?", (cutoff,))
            conn.execute("DELETE FROM fetch_notices WHERE sent<?", (cutoff,))
