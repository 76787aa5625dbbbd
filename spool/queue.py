"""The queue: message bodies and their envelopes as files, plus an SQLite catalogue.

Every message, whatever its origin (LAN SMTP, sendmail, a fetch from the ISP, a bounce),
enters here and leaves only when every recipient has a final outcome.  Local recipients
are then delivered into Maildirs, remote ones relayed in a dial session.

The files are the truth and the catalogue is their index (see ``spool.queuefile`` for
the envelope journal each message carries): the catalogue can be lost, truncated or
corrupted and rebuilt from the files alone (``spool.rebuild``).

Order of operations for ``enqueue`` (what makes kill -9 harmless):

1. write the body into ``queue/tmp/<id>`` and fsync it;
2. write its envelope into ``queue/tmp/<id>.env`` and fsync it;
3. rename the body to ``queue/msg/<id>`` and the envelope to ``queue/env/<id>``, fsync
   both directories;
4. insert the envelope rows and COMMIT (WAL, synchronous=FULL, so the commit is on disk);
5. only now may the caller say 250 / mark the UID taken / flag the ISP copy.

A crash before 3 leaves a body without an envelope: ``recover()`` removes it, and since
the client never heard 250 it sends again.  A crash after 3 leaves a complete message:
recovery imports it from its envelope if the catalogue does not list it (a client that
missed the 250 then sends a second copy; none is ever lost).  A recipient's final
outcome, and a message's removal, are appended to its envelope journal before the
catalogue commit that records them, so the journal is never behind the catalogue.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping, Protocol

from spool import queuefile
from spool.fsio import fsync_paths, write_file
from spool.intake import Intake

log = logging.getLogger("dialmail.spool")

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


class DamagedBody(OSError):
    """A queued body no longer has the size it was accepted with; the message is held."""

    def __init__(self, qid: str, expected: int, actual: int):
        super().__init__(f"{qid}: body is {actual} bytes, {expected} were accepted; held")
        self.qid, self.expected, self.actual = qid, expected, actual


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


@dataclass
class Arrival:
    """A message written at its tmp path, waiting to be queued (``Queue.enqueue_batch``)."""
    qid: str
    tmp: Path
    sender: str
    recipients: list[tuple[str, str]]  # (address, LOCAL or RELAY)
    origin: str
    client: str | None = None
    message_id: str | None = None
    subject: str | None = None
    urgent: bool = False
    smtputf8: bool = False
    then: Then | None = None
    orcpts: dict[str, str] | None = None
    body: "PendingBody | None" = None  # a body its writer finishes just before the fsync


class PendingBody(Protocol):
    """A body whose last bytes are still with its writer (SMTP DATA's buffer)."""

    def write_out(self) -> tuple[int, str, int]:
        """Write the rest to the tmp path: its size, SHA-256, and a descriptor of the file
        left open for the queue to fsync and close."""


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


class SpoolConnection(sqlite3.Connection):
    """A catalogue connection that knows its spool, so a step running inside a
    transaction (``Recorded``, a ``then``) can append to the message's envelope journal."""
    spool_root: Path


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False,
                           factory=SpoolConnection)
    conn.spool_root = Path(path).parent
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


CATALOGUE = "dialmail.db"
REPAIR_HINT = "run 'dialmail spool check' to see what is wrong and 'dialmail spool repair' to rebuild it"


class CatalogueDamaged(Exception):
    """The catalogue fails SQLite's own check (or is not a database at all): nothing may
    be queued into it; ``dialmail spool repair`` moves it aside and rebuilds it from the
    queue files."""

    def __init__(self, path: Path, detail: str):
        super().__init__(f"the spool catalogue {path} is damaged ({detail}); {REPAIR_HINT}")
        self.path = path
        self.detail = detail


def catalogue_problem(conn: sqlite3.Connection, full: bool = False) -> str | None:
    """SQLite's verdict on the catalogue file: None when sound, else its first complaint."""
    rows = [r[0] for r in conn.execute("PRAGMA integrity_check" if full else "PRAGMA quick_check")]
    return None if rows == ["ok"] else "; ".join(str(r) for r in rows[:3])


def is_damage(exc: sqlite3.DatabaseError) -> bool:
    """A damaged file, as opposed to a busy one (OperationalError: locked, I/O)."""
    return not isinstance(exc, sqlite3.OperationalError) or "malformed" in str(exc)


class Catalogue:
    """The spool database: one connection per process, used under a lock from worker threads.

    Opening it checks it (``PRAGMA quick_check``): a damaged catalogue raises
    ``CatalogueDamaged`` instead of taking mail into a malformed file.  ``created`` says
    the file was missing or empty, so recovery knows to look hard at the queue files.
    """

    def __init__(self, root: Path, *, check: bool = True):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.root / CATALOGUE
        self.created = not self.path.exists() or self.path.stat().st_size == 0
        try:
            self.conn = connect(self.path)
        except sqlite3.DatabaseError as exc:
            if not is_damage(exc):
                raise
            raise CatalogueDamaged(self.path, str(exc)) from None
        self.lock = threading.RLock()
        try:
            problem = catalogue_problem(self.conn) if check and not self.created else None
            if problem is None:
                self.conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            if not is_damage(exc):
                self.conn.close()
                raise
            problem = str(exc)
        if problem is not None:
            self.conn.close()
            raise CatalogueDamaged(self.path, problem)

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
        self.env = self.dir / "env"
        self.lost_found = catalogue.root / "lost+found"
        for d in (self.tmp, self.msg, self.env):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._intake: Intake | None = None
        self._intake_lock = threading.Lock()

    # ------------------------------------------------------------ entering the queue

    def new_body(self) -> tuple[str, Path]:
        """A fresh queue id and the tmp path a writer may fill before ``enqueue_file``."""
        qid = new_queue_id()
        return qid, self.tmp / qid

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Shared lock held while a message is being written; ``recover`` takes it exclusively.

        A writer that fills a tmp body over a long time, a piece at a time (SMTP DATA as it
        arrives), holds it from the file's creation until the queue has taken the body;
        leaving it does not remove the file: the writer removes what it does not queue.
        """
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
        with self.writing():
            write_file(tmp, data, sync=False)  # fsynced beside its envelope, in enqueue_batch
            return self.enqueue_file(qid, tmp, sender, recipients, origin=origin, client=client,
                                     message_id=message_id, subject=subject, urgent=urgent, smtputf8=smtputf8,
                                     then=then, orcpts=orcpts)

    def enqueue_file(self, qid: str, tmp: Path, sender: str, recipients: Iterable[tuple[str, str]], *,
                     origin: str, client: str | None = None, message_id: str | None = None,
                     subject: str | None = None, urgent: bool = False, smtputf8: bool = False,
                     then: Then | None = None,
                     orcpts: dict[str, str] | None = None) -> str:
        """Queue a body already written at ``tmp`` (from ``new_body``).

        ``then(conn, qid)`` runs inside the same transaction as the envelope insert: a
        bounce marks its recipients reported there, a fetcher records the ISP UID there,
        so "in the spool" and what it stands for can never disagree.
        """
        arrival = Arrival(qid, tmp, sender, list(recipients), origin=origin, client=client,
                          message_id=message_id, subject=subject, urgent=urgent, smtputf8=smtputf8,
                          then=then, orcpts=orcpts)
        result = self.enqueue_batch([arrival])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    @property
    def intake(self) -> "Intake":
        """The door for messages arriving concurrently: they share their disk flushes."""
        with self._intake_lock:
            if self._intake is None:
                self._intake = Intake(self)
            return self._intake

    def enqueue_batch(self, arrivals: list["Arrival"]) -> list[str | BaseException]:
        """Queue several bodies written at their tmp paths, with one flush of the disk per
        step for all of them (see the module doc for the steps and ``spool.intake`` for
        why): each message's queue id, or the error that kept it out.

        A message whose own files fail (its envelope cannot be written: disk full) is left
        out alone; a failure of a shared step (a directory's fsync, the COMMIT) keeps the
        whole batch out.  Whatever is kept out leaves nothing in the queue.
        """
        results: list[str | BaseException | None] = [None] * len(arrivals)
        ready: list[tuple[int, Arrival, queuefile.Envelope]] = []
        synced: list[Path | int] = []  # what to fsync: descriptors still open from writing, or paths
        with self.writing():
            try:
                for i, arrival in enumerate(arrivals):
                    try:
                        envelope, body = self._envelope(arrival)
                        synced.append(body)
                        synced.append(queuefile.create(self.tmp / f"{arrival.qid}.env", envelope))
                    except BaseException as exc:
                        self._discard(arrival.qid, arrival.tmp)
                        if not isinstance(exc, Exception):
                            raise
                        results[i] = exc
                        continue
                    ready.append((i, arrival, envelope))
                if ready:
                    fsync_paths(synced)
            except BaseException as exc:
                self._keep_out(ready, results, exc)
                return results  # type: ignore[return-value]
            finally:
                for fd in synced:
                    if isinstance(fd, int):
                        os.close(fd)
            if ready:
                try:
                    ready = [r for r in ready if self._rename_in(*r[:2], results)]
                    fsync_paths([self.msg, self.env])
                    with self.cat.transaction() as conn:
                        for _, arrival, envelope in ready:
                            insert_envelope(conn, envelope)
                            if arrival.then is not None:
                                arrival.then(conn, arrival.qid)
                except BaseException as exc:
                    self._keep_out(ready, results, exc)
                else:
                    for i, arrival, _ in ready:
                        results[i] = arrival.qid
        return results  # type: ignore[return-value]

    def _keep_out(self, ready: list, results: list, exc: BaseException) -> None:
        """A shared step failed: none of ``ready`` is queued, and nothing of them is left
        (an interrupt or exit goes on once the files are gone)."""
        for i, arrival, _ in ready:
            self._discard(arrival.qid, arrival.tmp)
            results[i] = exc
        if not isinstance(exc, Exception):
            raise exc

    def _rename_in(self, i: int, arrival: "Arrival", results: list) -> bool:
        """Body first: an envelope in env/ means its body reached msg/ before it.  A
        message whose files are gone (its writer gave up on it) is left out alone."""
        try:
            os.rename(arrival.tmp, self.msg / arrival.qid)
            os.rename(self.tmp / f"{arrival.qid}.env", self.env / arrival.qid)
        except OSError as exc:
            self._discard(arrival.qid, arrival.tmp)
            results[i] = exc
            return False
        return True

    def _envelope(self, a: "Arrival") -> tuple[queuefile.Envelope, Path | int]:
        """The message's envelope, and its body to fsync: a descriptor its writer left
        open, or the path."""
        rcpts = list(dict.fromkeys((r, route) for r, route in a.recipients))
        if not rcpts:
            raise ValueError("a message needs at least one recipient")
        body: Path | int = a.tmp
        if a.body is not None:
            size, sha256, body = a.body.write_out()
        else:
            size, sha256 = a.tmp.stat().st_size, queuefile.body_digest(a.tmp)
        # Header values parsed from raw 8-bit mail carry surrogate escapes that SQLite cannot
        # store; they are only for display, so undecodable bytes become U+FFFD.
        return queuefile.Envelope(
            qid=a.qid, sender=a.sender, arrival=time.time(), size=size, sha256=sha256,
            origin=a.origin, client=a.client, message_id=_storable(a.message_id), subject=_storable(a.subject),
            urgent=a.urgent, smtputf8=a.smtputf8,
            recipients=tuple(queuefile.EnvelopeRecipient(r, route, (a.orcpts or {}).get(r)) for r, route in rcpts),
            then=a.then.journal() if hasattr(a.then, "journal") else None), body

    def _discard(self, qid: str, tmp: Path) -> None:
        for path in (self.msg / qid, self.env / qid, self.tmp / f"{qid}.env", tmp):
            try:
                os.unlink(path)
            except OSError:
                pass

    # ------------------------------------------------------------ reading

    def body_path(self, qid: str) -> Path:
        return self.msg / qid

    def envelope_path(self, qid: str) -> Path:
        return self.env / qid

    def open_body(self, qid: str, *, check: bool = True) -> BinaryIO:
        """The body for reading.  With ``check`` a body whose size is no longer the one
        accepted is not handed out: the message is held, an ERROR says so, and
        ``DamagedBody`` is raised (``dialmail spool check`` lists it)."""
        f = open(self.msg / qid, "rb")
        if not check:
            return f
        row = self.cat.execute("SELECT size FROM messages WHERE id=?", (qid,)).fetchone()
        actual = os.fstat(f.fileno()).st_size
        if row is None or row["size"] == actual:
            return f
        f.close()
        self.hold_damaged(qid, f"its body is {actual} bytes, {row['size']} were accepted")
        raise DamagedBody(qid, row["size"], actual)

    def accept_body(self, qid: str) -> bool:
        """Take the body as it is now (an administrator releasing a damaged message):
        its current size and digest become the accepted ones.  True if they changed."""
        path = self.msg / qid
        size = path.stat().st_size
        row = self.cat.execute("SELECT size FROM messages WHERE id=?", (qid,)).fetchone()
        if row is None or row["size"] == size:
            return False
        queuefile.append(self.env / qid, [{"accepted": size, "sha256": queuefile.body_digest(path)}])
        self.cat.execute("UPDATE messages SET size=? WHERE id=?", (size, qid))
        log.warning("%s: body accepted as it is now (%d bytes, %d were accepted first)", qid, size, row["size"])
        return True

    def hold_damaged(self, qid: str, why: str) -> None:
        self.set_hold(qid, True)
        log.error("%s: held: %s; it is not delivered until an administrator looks at it "
                  "('dialmail spool check' lists it, 'dialmail queue release %s' sends it as it is)", qid, why, qid)

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

    def next_due(self, route: str) -> float | None:
        """When the earliest waiting recipient on ``route`` (not held, not claimed) is due."""
        row = self.cat.execute(
            "SELECT MIN(r.next_retry) t FROM recipients r JOIN messages m ON m.id=r.msg_id "
            "WHERE r.route=? AND r.status IN ('queued','deferred') AND m.hold=0 AND r.claim IS NULL",
            (route,)).fetchone()
        return row["t"]

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
        """Store one recipient's outcome (and drop its claim); a final one goes into the
        envelope journal first."""
        if status in FINAL:
            queuefile.append(self.env / qid, [queuefile.final(rcpt, status, code, reply)])
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

    def record_deliveries(self, outcomes: Mapping[str, Mapping[str, Result]]) -> set[str]:
        """Store the outcomes of several messages' recipients in one transaction, and remove
        each message that is then settled (as ``record_outcomes(remove_settled=True)``);
        returns the ids of the messages that left.

        Local delivery's batch: one COMMIT (one fsync of the WAL) for a whole pass, and one
        journal write per message holding its final outcomes and, when it leaves, its
        removal.  Each journal is written before the COMMIT, as everywhere.
        """
        removed = set()
        with self.cat.transaction() as conn:
            journals = {}
            for qid, mine in outcomes.items():
                conn.executemany(_RECORD, [(o.status, o.code, o.reply, 1, None, qid, rcpt)
                                           for rcpt, o in mine.items()])
                settled = not _unsettled(conn, qid)
                journals[self.env / qid] = ([queuefile.final(rcpt, o.status, o.code, o.reply)
                                             for rcpt, o in mine.items() if o.status in FINAL]
                                            + ([{"removed": True}] if settled else []))
                if settled and conn.execute("DELETE FROM messages WHERE id=?", (qid,)).rowcount == 1:
                    removed.add(qid)
            queuefile.append_many(journals)
        for qid in removed:
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
            outcomes = {row["rcpt"]: why(_recipient(row)) for row in rows}
            journal(conn, qid, [queuefile.final(r, BOUNCED, o.code, o.reply) for r, o in outcomes.items()])
            for row in rows:
                o = outcomes[row["rcpt"]]
                conn.execute("UPDATE recipients SET status=?, last_code=?, last_reply=?, claim=NULL "
                             "WHERE msg_id=? AND rcpt=?", (BOUNCED, o.code, o.reply, qid, row["rcpt"]))
        return len(rows)

    def set_hold(self, qid: str, hold: bool) -> bool:
        queuefile.append(self.env / qid, [{"hold": hold}])
        return self.cat.execute("UPDATE messages SET hold=? WHERE id=?", (int(hold), qid)).rowcount == 1

    def set_warned(self, qid: str) -> None:
        queuefile.append(self.env / qid, [{"warned": True}])
        self.cat.execute("UPDATE messages SET warned=1 WHERE id=?", (qid,))

    def reschedule(self, qid: str, when: float) -> None:
        self.cat.execute("UPDATE recipients SET next_retry=? WHERE msg_id=? AND status IN ('queued','deferred')",
                         (when, qid))

    def remove(self, qid: str) -> None:
        """Forget a message: journal and catalogue first (the commit is the decision), then the files."""
        queuefile.append(self.env / qid, [{"removed": True}])
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
            journal(conn, qid, [{"removed": True}])
            conn.execute("DELETE FROM messages WHERE id=?", (qid,))
        self.discard_body(qid)
        return True

    def discard_body(self, qid: str) -> None:
        """The files of a message whose row a committed transaction removed.  Body first: a
        crash between leaves an envelope saying "removed", which ``recover`` deletes."""
        for path in (self.msg / qid, self.env / qid):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------ start-up recovery

    def recover(self) -> dict[str, int]:
        """Clean up after a crash (see ``spool.rebuild.recover`` for every step).

        Files are touched only while no other process is writing a message (the
        exclusive side of ``_writing``); if one is, only claims are released.
        """
        # Imported here: rebuild replays steps defined in spool.fetchstate and spool.notices,
        # which import this module.
        from spool import rebuild
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return {"tmp": 0, "orphans": 0, "claims": self.release_claims(), "missing": 0}
            return rebuild.recover(self)
        finally:
            os.close(fd)

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
        with self.writing():
            write(tmp)
            return self.enqueue_file(qid, tmp, sender, recipients, origin=origin, client=client,
                                     message_id=message_id, subject=subject, urgent=urgent, smtputf8=smtputf8,
                                     then=then, orcpts=orcpts)

    # ------------------------------------------------------------ who holds claims

    # Owners handed out by ``new_claimant`` and not yet retired, in this process (every
    # Queue object of the process shares it: a claim belongs to the process, not the object).
    _claimants_here: set[str] = set()

    def new_claimant(self, kind: str) -> str:
        """A fresh owner name for claims: ``kind:pid:start:random``, the pid and start time
        saying which process holds them (a pid reused after a restart is not the holder).

        It counts as at work in this process until ``retire_claimant``.
        """
        pid = os.getpid()
        owner = f"{kind}:{pid}:{_process_start(pid)}:{secrets.token_hex(4)}"
        Queue._claimants_here.add(owner)
        return owner

    def retire_claimant(self, owner: str) -> int:
        """Release every claim ``owner`` still holds; how many.  If that fails (the disk is
        full), the claims are left to ``release_dead_claims``, which no longer sees the owner
        at work here."""
        Queue._claimants_here.discard(owner)
        return self.release_claims(owner)

    def release_dead_claims(self) -> list[str]:
        """Release the claims whose holder is gone; returns those owners.

        Gone: its process died, its pid now belongs to a process started later, or it is
        this process's and no longer at work (a release that failed, say on a full disk).
        Owners not named ``kind:pid...`` are left alone.
        """
        gone = [owner for owner in self.claim_owners("") if not _claimant_alive(owner)]
        for owner in gone:
            self.release_claims(owner)
        return gone


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
        journal(conn, self.qid, [queuefile.final(rcpt, o.status, o.code, o.reply)
                                 for rcpt, o in self.outcomes.items() if o.status in FINAL])
        for rcpt, o in self.outcomes.items():
            retry = self.retry_at(before[rcpt], o) if rcpt in before else None
            conn.execute(_RECORD, (o.status, o.code, o.reply, int(self.count_attempt), retry, self.qid, rcpt))


def _remove_if_settled(conn: sqlite3.Connection, qid: str) -> bool:
    """Delete the message's row when every recipient is final and no bounced one still
    needs reporting (``spool.notices`` does that part); the caller unlinks after COMMIT."""
    if _unsettled(conn, qid):
        return False
    journal(conn, qid, [{"removed": True}])
    return conn.execute("DELETE FROM messages WHERE id=?", (qid,)).rowcount == 1


def _unsettled(conn: sqlite3.Connection, qid: str) -> int:
    """How many of ``qid``'s recipients still wait, or bounced and are not yet reported."""
    return conn.execute("SELECT COUNT(*) FROM recipients r WHERE r.msg_id=? AND (r.status NOT IN (?,?) OR "
                        "(r.status=? AND NOT EXISTS (SELECT 1 FROM bounce_reported b "
                        "WHERE b.msg_id=r.msg_id AND b.rcpt=r.rcpt)))", (qid, *FINAL, BOUNCED)).fetchone()[0]


def journal(conn: sqlite3.Connection, qid: str, records: list[dict]) -> None:
    """Append to ``qid``'s envelope journal from inside a catalogue transaction, before
    its COMMIT (see spool.queuefile)."""
    root = getattr(conn, "spool_root", None)
    if root is not None and records:
        queuefile.append(root / "queue" / "env" / qid, records)


def insert_envelope(conn: sqlite3.Connection, env: "queuefile.Envelope") -> None:
    conn.execute("INSERT INTO messages(id, sender, arrival, size, origin, client, message_id, subject,"
                 " urgent, smtputf8) VALUES (?,?,?,?,?,?,?,?,?,?)",
                 (env.qid, env.sender, env.arrival, env.size, env.origin, env.client, env.message_id, env.subject,
                  int(env.urgent), int(env.smtputf8)))
    conn.executemany("INSERT OR IGNORE INTO recipients(msg_id, rcpt, route, orcpt) VALUES (?,?,?,?)",
                     [(env.qid, r.rcpt, r.route, r.orcpt) for r in env.recipients])


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


def _process_start(pid: int) -> str:
    """When process ``pid`` started, in clock ticks since boot ("" where /proc cannot say)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: count from its closing one.
    fields = stat[stat.rfind(b")") + 2:].split()
    return fields[19].decode() if len(fields) > 19 else ""


def _claimant_alive(owner: str) -> bool:
    parts = owner.split(":")
    if len(parts) < 2 or not parts[1].isdigit():
        return True  # not ours to judge
    pid = int(parts[1])
    if pid == os.getpid():
        return owner in Queue._claimants_here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if len(parts) != 4:  # kind:pid or kind:pid:random, named before claims carried a start time
        return True
    now_started = _process_start(pid)
    return not parts[2] or not now_started or parts[2] == now_started
