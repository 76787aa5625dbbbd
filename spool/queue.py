"""The queue: message bodies as files plus an SQLite catalogue of envelopes.

Every message, whatever its origin (LAN SMTP, sendmail, a fetch from the ISP, a bounce),
enters here and leaves only when every recipient has a final outcome.  Local recipients
are then delivered into Maildirs, remote ones relayed in a dial session.

Order of operations for ``enqueue`` (what makes kill -9 harmless):

1. write the body into ``queue/tmp/<id>`` and fsync it;
2. rename it to ``queue/msg/<id>`` and fsync ``queue/msg``;
3. insert the envelope rows and COMMIT (WAL, synchronous=FULL, so the commit is on disk);
4. only now may the caller say 250 / mark the UID taken / flag the ISP copy.

A crash before 3 leaves a body without a row: ``recover()`` removes it, and since the
client never heard 250 it sends again.  A crash after 3 leaves a complete queued message.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping, Protocol

from spool.fsio import fsync_dir, write_file

# Recipient states.  QUEUED and DEFERRED wait; the others are final.
QUEUED = "queued"
DEFERRED = "deferred"
DELIVERED = "delivered"
BOUNCED = "bounced"
FINAL = (DELIVERED, BOUNCED)

LOCAL = "local"
RELAY = "relay"

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    arrival REAL NOT NULL,
    size INTEGER NOT NULL,
    origin TEXT NOT NULL,
    client TEXT,
    message_id TEXT,
    subject TEXT,
    urgent INTEGER NOT NULL DEFAULT 0,
    smtputf8 INTEGER NOT NULL DEFAULT 0,
    hold INTEGER NOT NULL DEFAULT 0,
    warned INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS recipients (
    msg_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    rcpt TEXT NOT NULL,
    route TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'queued',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_retry REAL NOT NULL DEFAULT 0,
    last_code INTEGER,
    last_reply TEXT,
    claim TEXT,
    orcpt TEXT,
    PRIMARY KEY (msg_id, rcpt)
);
CREATE INDEX IF NOT EXISTS recipients_pending ON recipients(route, status, next_retry);
CREATE TABLE IF NOT EXISTS bounce_reported (
    msg_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    rcpt TEXT NOT NULL,
    notice TEXT NOT NULL,
    PRIMARY KEY (msg_id, rcpt)
);
"""
# ``bounce_reported``: which bounced recipients the sender has been told about (see
# spool.notices); a message leaves only when each of its bounced recipients has a row.


@dataclass(frozen=True)
class Recipient:
    msg_id: str
    rcpt: str
    route: str
    status: str
    attempts: int
    next_retry: float
    last_code: int | None
    last_reply: str | None
    orcpt: str | None = None


@dataclass(frozen=True)
class Message:
    id: str
    sender: str
    arrival: float
    size: int
    origin: str
    client: str | None
    message_id: str | None
    subject: str | None
    urgent: bool
    smtputf8: bool
    hold: bool
    warned: bool
    recipients: tuple[Recipient, ...]

    @property
    def pending(self) -> tuple[Recipient, ...]:
        return tuple(r for r in self.recipients if r.status not in FINAL)


class Result(Protocol):
    """A worker's finding for one recipient, as the queue stores it
    (gateway.mail.outcome.Outcome is one)."""

    @property
    def status(self) -> str: ...

    @property
    def code(self) -> int | None: ...

    @property
    def reply(self) -> str | None: ...


# A change made in the transaction that queues a message, given its new queue id.  Only
# spool modules write them (spool.notices, spool.policystate): so "queued" and what the
# queueing stands for (a recipient reported, a sender answered) cannot disagree after a crash.
Then = Callable[[sqlite3.Connection, str], None]


@dataclass(frozen=True)
class Backlog:
    """What waits for the link: messages with relay recipients due or not, none held."""
    messages: int
    bytes: int
    oldest_urgent: float | None  # arrival of the oldest urgent one


def _storable(text: str | None) -> str | None:
    if text is None:
        return None
    text = str(text)
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


def new_queue_id(now: float | None = None) -> str:
    """Unique and sortable by arrival time: microseconds in hex plus random bits."""
    us = int((time.time() if now is None else now) * 1_000_000)
    return f"{us:014X}{secrets.token_hex(3).upper()}"


BUSY_TIMEOUT = 30.0


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
    _wal(conn)
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.row_factory = sqlite3.Row
    return conn


def _wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL, waiting like any other statement when another process holds the lock.

    Changing the journal mode does not go through SQLite's busy handler: two processes
    opening a new spool at once (the daemon's first start and a ``sendmail`` from cron)
    got "database is locked" at once instead of waiting their turn.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class Catalogue:
    """The spool database: one connection per process, used under a lock from worker threads."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.root / "dialmail.db"
        self.conn = connect(self.path)
        self.lock = threading.RLock()
        self.conn.executescript(SCHEMA)

    def transaction(self) -> "_Txn":
        return _Txn(self)

    def execute(self, sql: str, params: Iterable = ()) -> sqlite3.Cursor:
        with self.lock:
            return self.conn.execute(sql, tuple(params))

    def close(self) -> None:
        with self.lock:
            self.conn.close()


class _Txn:
    def __init__(self, cat: Catalogue):
        self.cat = cat

    def __enter__(self) -> sqlite3.Connection:
        self.cat.lock.acquire()
        try:
            self.cat.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.cat.lock.release()
            raise
        return self.cat.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.cat.conn.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.cat.lock.release()


class Queue:
    def __init__(self, catalogue: Catalogue):
        self.cat = catalogue
        self.dir = catalogue.root / "queue"
        self.tmp = self.dir / "tmp"
        self.msg = self.dir / "msg"
        for d in (self.tmp, self.msg):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    # ------------------------------------------------------------ entering the queue

    def new_body(self) -> tuple[str, Path]:
        """A fresh queue id and the tmp path a writer may fill before ``enqueue_file``."""
        qid = new_queue_id()
        return qid, self.tmp / qid

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Shared lock held while a message is being written; ``recover`` takes it exclusively."""
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def enqueue(self, sender: str, recipients: Iterable[tuple[str, str]], data: bytes | Iterable[bytes] | BinaryIO,
                *, origin: str, client: str | None = None, message_id: str | None = None,
                subject: str | None = None, urgent: bool = False, smtputf8: bool = False,
                then: Then | None = None,
                orcpts: dict[str, str] | None = None) -> str:
        """Store a message durably; returns its queue id.  See the module doc for the order."""
        qid, tmp = self.new_body()
        with self._writing():
            write_file(tmp, data)
            return self.enqueue_file(qid, tmp, sender, recipients, origin=origin, client=client,
                                     message_id=message_id, subject=subject, urgent=urgent, smtputf8=smtputf8,
                                     then=then, orcpts=orcpts)

    def enqueue_file(self, qid: str, tmp: Path, sender: str, recipients: Iterable[tuple[str, str]], *,
                     origin: str, client: str | None = None, message_id: str | None = None,
                     subject: str | None = None, urgent: bool = False, smtputf8: bool = False,
                     then: Then | None = None,
                     orcpts: dict[str, str] | None = None) -> str:
        """Queue a body already written and fsynced at ``tmp`` (from ``new_body``).

        ``then(conn, qid)`` runs inside the same transaction as the envelope insert: a
        bounce marks its recipients reported there, a fetcher records the ISP UID there,
        so "in the spool" and what it stands for can never disagree.
        """
        rcpts = list(dict.fromkeys((r, route) for r, route in recipients))
        if not rcpts:
            os.unlink(tmp)
            raise ValueError("a message needs at least one recipient")
        with self._writing():
            return self._commit(qid, tmp, sender, rcpts, origin, client, message_id, subject, urgent, smtputf8,
                                then, orcpts)

    def _commit(self, qid, tmp, sender, rcpts, origin, client, message_id, subject, urgent, smtputf8,
                then, orcpts) -> str:
        final = self.msg / qid
        size = tmp.stat().st_size
        # Header values parsed from raw 8-bit mail carry surrogate escapes that SQLite cannot
        # store; they are only for display, so undecodable bytes become U+FFFD.
        message_id, subject = _storable(message_id), _storable(subject)
        os.rename(tmp, final)
        try:
            fsync_dir(self.msg)
            with self.cat.transaction() as conn:
                conn.execute("INSERT INTO messages(id, sender, arrival, size, origin, client, message_id, subject,"
                             " urgent, smtputf8) VALUES (?,?,?,?,?,?,?,?,?,?)",
                             (qid, sender, time.time(), size, origin, client, message_id, subject,
                              int(urgent), int(smtputf8)))
                conn.executemany("INSERT OR IGNORE INTO recipients(msg_id, rcpt, route, orcpt) VALUES (?,?,?,?)",
                                 [(qid, r, route, (orcpts or {}).get(r)) for r, route in rcpts])
                if then is not None:
                    then(conn, qid)
        except BaseException:
            try:
                os.unlink(final)
            except OSError:
                pass
            raise
        return qid

    # ------------------------------------------------------------ reading

    def body_path(self, qid: str) -> Path:
        return self.msg / qid

    def open_body(self, qid: str) -> BinaryIO:
        return open(self.msg / qid, "rb")

    def get(self, qid: str) -> Message | None:
        with self.cat.lock:
            row = self.cat.conn.execute("SELECT * FROM messages WHERE id=?", (qid,)).fetchone()
            if row is None:
                return None
            rcpts = self.cat.conn.execute("SELECT * FROM recipients WHERE msg_id=? ORDER BY rowid", (qid,)).fetchall()
        return _message(row, rcpts)

    def find(self, prefix: str) -> Message | None:
        """Look a message up by its id or an unambiguous prefix of it (for the CLI)."""
        rows = self.cat.execute("SELECT id FROM messages WHERE id LIKE ? LIMIT 2",
                                (prefix.upper() + "%",)).fetchall()
        return self.get(rows[0]["id"]) if len(rows) == 1 else None

    def messages(self) -> list[Message]:
        with self.cat.lock:
            rows = self.cat.conn.execute("SELECT * FROM messages ORDER BY id").fetchall()
            rcpts = self.cat.conn.execute("SELECT * FROM recipients ORDER BY msg_id, rowid").fetchall()
        by_msg: dict[str, list] = {}
        for r in rcpts:
            by_msg.setdefault(r["msg_id"], []).append(r)
        return [_message(row, by_msg.get(row["id"], [])) for row in rows]

    def pending(self, route: str, now: float | None = None) -> list[Message]:
        """Messages with recipients on ``route`` that are due now and not held."""
        now = time.time() if now is None else now
        ids = [r["msg_id"] for r in self.cat.execute(
            "SELECT DISTINCT r.msg_id FROM recipients r JOIN messages m ON m.id=r.msg_id "
            "WHERE r.route=? AND r.status IN ('queued','deferred') AND r.next_retry<=? AND m.hold=0 "
            "AND r.claim IS NULL ORDER BY r.msg_id", (route, now))]
        return [m for m in (self.get(i) for i in ids) if m is not None]

    def counts(self) -> dict[str, int]:
        out = {"messages": 0, "relay": 0, "local": 0, "held": 0, "deferred": 0, "bytes": 0}
        row = self.cat.execute("SELECT COUNT(*) n, COALESCE(SUM(size),0) b, COALESCE(SUM(hold),0) h "
                               "FROM messages").fetchone()
        out["messages"], out["bytes"], out["held"] = row["n"], row["b"], row["h"]
        for r in self.cat.execute("SELECT route, status, COUNT(*) n FROM recipients "
                                  "WHERE status IN ('queued','deferred') GROUP BY route, status"):
            out[r["route"]] += r["n"]
            if r["status"] == DEFERRED:
                out["deferred"] += r["n"]
        return out

    def relay_backlog(self, urgent_senders: Iterable[str] = ()) -> Backlog:
        """What a dial would send (dial-on-demand weighs it); ``urgent_senders`` in lower case."""
        row = self.cat.execute(
            "SELECT COUNT(DISTINCT m.id) n, COALESCE(SUM(DISTINCT m.size), 0) b FROM messages m JOIN recipients r "
            "ON r.msg_id=m.id WHERE r.route=? AND r.status IN ('queued','deferred') AND m.hold=0",
            (RELAY,)).fetchone()
        senders = list(urgent_senders)
        urgent_sql = ("SELECT MIN(m.arrival) t FROM messages m JOIN recipients r ON r.msg_id=m.id "
                      "WHERE r.route=? AND r.status IN ('queued','deferred') AND m.hold=0 AND (m.urgent=1")
        if senders:
            urgent_sql += f" OR lower(m.sender) IN ({','.join('?' * len(senders))})"
        urgent = self.cat.execute(urgent_sql + ")", [RELAY, *senders]).fetchone()["t"]
        return Backlog(messages=row["n"], bytes=row["b"], oldest_urgent=urgent)

    def claim_owners(self, prefix: str) -> list[str]:
        """The owners holding claims whose name starts with ``prefix``."""
        return [r[0] for r in self.cat.execute("SELECT DISTINCT claim FROM recipients WHERE claim LIKE ?",
                                               (prefix + "%",))]

    # ------------------------------------------------------------ state changes

    def claim(self, route: str, owner: str, limit: int = 100, now: float | None = None,
              latest: float = float("inf")) -> list[tuple[str, str]]:
        """Atomically take due recipients on ``route`` for ``owner``; returns (msg_id, rcpt) pairs.

        A next retry later than ``latest`` is due as well: when no back-off is that long,
        such a time was set by a clock that has since been stepped back.
        """
        now = time.time() if now is None else now
        with self.cat.transaction() as conn:
            rows = conn.execute(
                "SELECT r.msg_id, r.rcpt FROM recipients r JOIN messages m ON m.id=r.msg_id "
                "WHERE r.route=? AND r.status IN ('queued','deferred') AND (r.next_retry<=? OR r.next_retry>?) "
                "AND m.hold=0 AND r.claim IS NULL ORDER BY r.msg_id LIMIT ?", (route, now, latest, limit)).fetchall()
            conn.executemany("UPDATE recipients SET claim=? WHERE msg_id=? AND rcpt=?",
                             [(owner, r["msg_id"], r["rcpt"]) for r in rows])
        return [(r["msg_id"], r["rcpt"]) for r in rows]

    def release_claims(self, owner: str | None = None, qid: str | None = None) -> int:
        """Forget claims of ``owner`` (or all: at start-up, when no other worker can be alive).

        A local delivery cut short may already have linked its Maildir file, so a
        released local claim counts as an attempt: the next try then looks for that
        copy before delivering (see gateway.deliver).
        """
        where, params = ["claim IS NOT NULL"], []
        if owner is not None:
            where.append("claim=?")
            params.append(owner)
        if qid is not None:
            where.append("msg_id=?")
            params.append(qid)
        cur = self.cat.execute("UPDATE recipients SET claim=NULL, attempts=attempts+(route='local') "
                               f"WHERE {' AND '.join(where)}", params)
        return cur.rowcount

    def record(self, qid: str, rcpt: str, status: str, code: int | None = None, reply: str | None = None,
               next_retry: float | None = None, count_attempt: bool = True) -> None:
        """Store one recipient's outcome (and drop its claim)."""
        self.cat.execute(_RECORD, (status, code, reply, int(count_attempt), next_retry, qid, rcpt))

    def record_outcomes(self, qid: str, outcomes: Mapping[str, Result], *, count_attempt: bool = True,
                        retry_at: Callable[[Recipient, Result], float | None] | None = None,
                        remove_settled: bool = False) -> bool:
        """Store several recipients' outcomes in one transaction; see ``Recorded``.

        With ``remove_settled`` the message leaves in that same transaction when every
        recipient is final and every bounced one reported (the relay's common case, all
        delivered, costs one commit); True if it left.
        """
        recorded = Recorded(qid, outcomes, count_attempt, retry_at)
        with self.cat.transaction() as conn:
            recorded(conn, qid)
            removed = remove_settled and _remove_if_settled(conn, qid)
        if removed:
            self.discard_body(qid)
        return removed

    def fail_waiting(self, qid: str, why: Callable[[Recipient], Result], *, in_flight_too: bool = False) -> int:
        """Bounce every recipient still waiting, with ``why(recipient)``'s code and reply; how many.

        A recipient claimed by a worker is in flight and left to it, unless
        ``in_flight_too`` (the administrator bouncing a message by hand).
        """
        claimed = "" if in_flight_too else " AND claim IS NULL"
        with self.cat.transaction() as conn:
            rows = conn.execute(f"SELECT * FROM recipients WHERE msg_id=? AND status NOT IN (?,?){claimed}",
                                (qid, *FINAL)).fetchall()
            for row in rows:
                o = why(_recipient(row))
                conn.execute("UPDATE recipients SET status=?, last_code=?, last_reply=?, claim=NULL "
                             "WHERE msg_id=? AND rcpt=?", (BOUNCED, o.code, o.reply, qid, row["rcpt"]))
        return len(rows)

    def set_hold(self, qid: str, hold: bool) -> bool:
        return self.cat.execute("UPDATE messages SET hold=? WHERE id=?", (int(hold), qid)).rowcount == 1

    def set_warned(self, qid: str) -> None:
        self.cat.execute("UPDATE messages SET warned=1 WHERE id=?", (qid,))

    def reschedule(self, qid: str, when: float) -> None:
        self.cat.execute("UPDATE recipients SET next_retry=? WHERE msg_id=? AND status IN ('queued','deferred')",
                         (when, qid))

    def remove(self, qid: str) -> None:
        """Forget a message: catalogue first (the commit is the decision), then the body."""
        self.cat.execute("DELETE FROM messages WHERE id=?", (qid,))
        self.discard_body(qid)

    def finished(self, limit: int = 1000) -> list[str]:
        """Messages whose every recipient is final but that are still here: a process that
        recorded the last outcome died before it could settle the message."""
        rows = self.cat.execute(
            "SELECT m.id FROM messages m WHERE NOT EXISTS (SELECT 1 FROM recipients r WHERE r.msg_id=m.id "
            "AND r.status NOT IN (?,?)) ORDER BY m.id LIMIT ?", (*FINAL, limit)).fetchall()
        return [r[0] for r in rows]

    def remove_if_done(self, qid: str) -> bool:
        """Remove a message whose every recipient is final; True if it was removed."""
        with self.cat.transaction() as conn:
            left = conn.execute("SELECT COUNT(*) FROM recipients WHERE msg_id=? AND status NOT IN (?,?)",
                                (qid, *FINAL)).fetchone()[0]
            if left:
                return False
            conn.execute("DELETE FROM messages WHERE id=?", (qid,))
        self.discard_body(qid)
        return True

    def discard_body(self, qid: str) -> None:
        """A body whose row a committed transaction removed (a crash before this leaves an
        orphan body, which ``recover`` removes)."""
        try:
            os.unlink(self.msg / qid)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------ start-up recovery

    def recover(self) -> dict[str, int]:
        """Clean up after a crash: drop unacknowledged bodies, release stale claims.

        Files are removed only while no other process is writing a message (the
        exclusive side of ``_writing``); if one is, only claims are released.
        """
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return {"tmp": 0, "orphans": 0, "claims": self.release_claims(), "missing": 0}
            return self._recover()
        finally:
            os.close(fd)

    def _recover(self) -> dict[str, int]:
        removed_tmp = 0
        for name in os.listdir(self.tmp):
            os.unlink(self.tmp / name)
            removed_tmp += 1
        known = {r["id"] for r in self.cat.execute("SELECT id FROM messages")}
        orphans = 0
        for name in os.listdir(self.msg):
            if name not in known:
                os.unlink(self.msg / name)
                orphans += 1
        missing = [qid for qid in known if not (self.msg / qid).exists()]
        claims = self.release_claims()
        return {"tmp": removed_tmp, "orphans": orphans, "claims": claims, "missing": len(missing)}

    def __iter__(self) -> Iterator[Message]:
        return iter(self.messages())

    def enqueue_streamed(self, write: Callable[[Path], None], sender: str, recipients: Iterable[tuple[str, str]],
                         *, origin: str, client: str | None = None, message_id: str | None = None,
                         subject: str | None = None, urgent: bool = False, smtputf8: bool = False,
                         then: Then | None = None,
                         orcpts: dict[str, str] | None = None) -> str:
        """Like ``enqueue``, for a body that ``write(tmp_path)`` streams into the tmp file
        (a download from the ISP) and fsyncs; returns its queue id.

        Start-up recovery leaves the tmp file alone while ``write`` runs, however long
        the download takes.
        """
        qid, tmp = self.new_body()
        with self._writing():
            write(tmp)
            return self.enqueue_file(qid, tmp, sender, recipients, origin=origin, client=client,
                                     message_id=message_id, subject=subject, urgent=urgent, smtputf8=smtputf8,
                                     then=then, orcpts=orcpts)


_RECORD = ("UPDATE recipients SET status=?, last_code=?, last_reply=?, claim=NULL, "
           "attempts=attempts+?, next_retry=COALESCE(?, next_retry) WHERE msg_id=? AND rcpt=?")


@dataclass(frozen=True)
class Recorded:
    """Outcomes of one message's recipients stored together (and their claims dropped), as
    ``Queue.record_outcomes`` or inside the transaction that queues a notice about them.

    ``retry_at(recipient as stored before, outcome)`` says when a recipient is due again
    (None: leave it); ``count_attempt=False`` when the message was never tried (no server).
    """
    qid: str
    outcomes: Mapping[str, Result]
    count_attempt: bool = True
    retry_at: Callable[[Recipient, Result], float | None] | None = None

    def __call__(self, conn: sqlite3.Connection, _queued: str | None = None) -> None:
        before = {}
        if self.retry_at is not None:
            before = {r["rcpt"]: _recipient(r)
                      for r in conn.execute("SELECT * FROM recipients WHERE msg_id=?", (self.qid,))}
        for rcpt, o in self.outcomes.items():
            retry = self.retry_at(before[rcpt], o) if rcpt in before else None
            conn.execute(_RECORD, (o.status, o.code, o.reply, int(self.count_attempt), retry, self.qid, rcpt))


def _remove_if_settled(conn: sqlite3.Connection, qid: str) -> bool:
    """Delete the message's row when every recipient is final and no bounced one still
    needs reporting (``spool.notices`` does that part); the caller unlinks after COMMIT."""
    left = conn.execute("SELECT COUNT(*) FROM recipients r WHERE r.msg_id=? AND (r.status NOT IN (?,?) OR "
                        "(r.status=? AND NOT EXISTS (SELECT 1 FROM bounce_reported b "
                        "WHERE b.msg_id=r.msg_id AND b.rcpt=r.rcpt)))", (qid, *FINAL, BOUNCED)).fetchone()[0]
    if left:
        return False
    return conn.execute("DELETE FROM messages WHERE id=?", (qid,)).rowcount == 1


def _recipient(r: sqlite3.Row) -> Recipient:
    return Recipient(msg_id=r["msg_id"], rcpt=r["rcpt"], route=r["route"], status=r["status"],
                     attempts=r["attempts"], next_retry=r["next_retry"], last_code=r["last_code"],
                     last_reply=r["last_reply"], orcpt=r["orcpt"])


def _message(row: sqlite3.Row, rcpts: list[sqlite3.Row]) -> Message:
    return Message(id=row["id"], sender=row["sender"], arrival=row["arrival"], size=row["size"],
                   origin=row["origin"], client=row["client"], message_id=row["message_id"],
                   subject=row["subject"], urgent=bool(row["urgent"]), smtputf8=bool(row["smtputf8"]),
                   hold=bool(row["hold"]), warned=bool(row["warned"]),
                   recipients=tuple(_recipient(r) for r in rcpts))
