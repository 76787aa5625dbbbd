"""Recovery: the catalogue made to agree with the queue files, which are the truth.

Run at every start (``Queue.recover``) and by ``dialmail spool repair``.  The rules:

* A body in ``queue/tmp`` or ``queue/msg`` without an envelope was never acknowledged
  (the envelope is fsynced before the catalogue commit that precedes 250): it is
  removed.  That is the only mail recovery ever deletes, and it says how many at WARNING.
* A body with an envelope that the catalogue does not list is imported from its
  envelope journal, with every final outcome, hold and report recorded since, and the
  catalogue step its queueing stood for (an ISP copy taken, a bounce reported) replayed.
  If that shows it was finished (every recipient final, every bounce reported, or
  removed), its files go; otherwise it is queued again.  A body whose envelope cannot be
  read goes to ``lost+found/``, never away.
* A catalogue row that is behind its journal (the catalogue lost commits: its WAL was
  lost or cut) catches up: final outcomes, holds, reports, removal.
* A listed message without a journal (queued by an older dialmail, or its journal lost)
  gets one written from its row.
* A listed message whose body and envelope are both gone was finished and its files
  removed in commits the catalogue lost: its row goes (written out to ``lost+found/``
  for the record, WARNING).  One whose envelope is still there lost its body: it stays
  listed, reported at ERROR, for ``spool repair``.
* A body whose size is not the one accepted is held and reported at ERROR.
* Claims are released (no worker of a previous process is alive).

``rebuild_catalogue`` handles a catalogue SQLite itself finds damaged: the file is moved
aside as ``dialmail.db.corrupt-<time>`` (never deleted), a new one is made, what can be
read of the tables that live only in the catalogue (fetch state, policy state, session
log) is copied over, and ``recover`` imports the queue from its files.
"""
from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from spool import queuefile
from spool.fsio import fsync_dir
from spool.queue import BOUNCED, CATALOGUE, FINAL, Catalogue, Queue, insert_envelope

log = logging.getLogger("dialmail.spool")

# Tables that exist only in the catalogue: copied row by row from a damaged one.
SALVAGED = ("fetch_folders", "fetch_uids", "fetch_copies", "fetch_delivered", "fetch_notices",
            "rr_counter", "rr_pick", "autoreply_sent", "vacation", "forwarded", "sessions")


def recover(q: Queue, release_claims: bool = True) -> dict[str, int]:
    """Every rule of the module doc, in order; the caller holds the queue's write lock.
    ``release_claims=False`` (repair) leaves claims to the caller, who releases only
    those of processes that are gone."""
    report = {"tmp": 0, "orphans": 0, "imported": 0, "settled": 0, "lost_found": 0, "missing": 0, "vanished": 0,
              "journals": 0, "reconciled": 0, "damaged": 0, "claims": 0, "created": int(q.cat.created)}
    for name in sorted(os.listdir(q.tmp)):
        path = q.tmp / name
        if not name.endswith(".env") and (q.env / name).exists() and not (q.msg / name).exists():
            # Its envelope reached env/ but the body's rename did not survive: finish it.
            os.rename(path, q.msg / name)
            fsync_dir(q.msg)
            continue
        os.unlink(path)
        report["tmp"] += 1
    rows = {r["id"]: (r["size"], bool(r["hold"])) for r in q.cat.execute("SELECT id, size, hold FROM messages")}
    bodies, envelopes = set(os.listdir(q.msg)), set(os.listdir(q.env))
    for qid in sorted(bodies - set(rows)):
        if qid not in envelopes:
            os.unlink(q.msg / qid)  # never acknowledged: no envelope was ever fsynced for it
            report["orphans"] += 1
            continue
        try:
            qf = queuefile.read(q.env / qid)
        except queuefile.Unreadable as exc:
            to_lost_found(q, qid, str(exc))
            report["lost_found"] += 1
            continue
        if import_message(q, qf):
            report["imported"] += 1
        else:
            report["settled"] += 1
    for qid in sorted(envelopes - bodies):
        if qid in rows:
            continue  # a listed message without its body: counted as missing below
        try:
            gone = queuefile.read(q.env / qid).removed
        except queuefile.Unreadable:
            gone = False
        if gone:
            os.unlink(q.env / qid)  # a removal cut short between its two unlinks
        else:
            to_lost_found(q, qid, "an envelope without its body")
            report["lost_found"] += 1
    for qid, (size, held) in rows.items():
        if qid not in bodies and qid not in envelopes:
            row_to_lost_found(q, qid, "listed, but both its files are gone: it was finished and removed in "
                              "commits the catalogue lost")
            report["vanished"] += 1
            continue
        if qid not in bodies:
            log.error("%s: listed, but its body file is gone (its envelope is kept); "
                      "'dialmail spool repair' moves what is left to lost+found/", qid)
            report["missing"] += 1
            continue
        if qid not in envelopes:
            write_journal(q, qid)
            report["journals"] += 1
        else:
            try:
                qf = queuefile.read(q.env / qid)
            except queuefile.Unreadable:
                log.error("%s: its envelope journal is unreadable; run 'dialmail spool repair'", qid)
                continue
            if reconcile(q, qf):
                report["reconciled"] += 1
                if q.get(qid) is None:
                    continue
        actual = (q.msg / qid).stat().st_size
        if actual != size:
            report["damaged"] += 1
            if not held:
                q.hold_damaged(qid, f"its body is {actual} bytes, {size} were accepted")
    if release_claims:
        report["claims"] = q.release_claims()
    return report


def import_message(q: Queue, qf: queuefile.QueueFile) -> bool:
    """Queue a message again from its journal; False when it turned out finished (its files go)."""
    env = qf.envelope
    with q.cat.transaction() as conn:
        insert_envelope(conn, env)
        # Whether a local delivery was under way when the catalogue lost it is unknown: count
        # an attempt, so delivery looks for a copy in the Maildir before making one.
        conn.execute("UPDATE recipients SET attempts=1 WHERE msg_id=? AND route='local'", (env.qid,))
        _apply(conn, qf)
        if env.then:
            replay(conn, env.qid, env.then)
        left = _settle(conn, env.qid, qf.removed)
    if not left:
        q.discard_body(env.qid)
        log.warning("%s: not in the catalogue, and its queue file shows it finished: files removed", env.qid)
        return False
    size = (q.msg / env.qid).stat().st_size
    log.warning("%s: not in the catalogue; queued again from its queue file (from <%s>, %d recipient(s) "
                "waiting)", env.qid, env.sender, left)
    if qf.accepted:
        q.cat.execute("UPDATE messages SET size=? WHERE id=?", (qf.size, env.qid))
    if size != qf.size:
        q.hold_damaged(env.qid, f"its body is {size} bytes, {qf.size} were accepted")
    return True


def reconcile(q: Queue, qf: queuefile.QueueFile) -> bool:
    """Bring a listed message's row up to its journal; True if anything changed."""
    qid = qf.envelope.qid
    with q.cat.transaction() as conn:
        before = conn.total_changes
        _apply(conn, qf)
        changed = conn.total_changes != before
        left = _settle(conn, qid, qf.removed) if changed else 1
    if changed:
        log.warning("%s: the catalogue was behind its queue file (lost commits); caught up", qid)
    if not left:
        q.discard_body(qid)
    return changed


def _apply(conn: sqlite3.Connection, qf: queuefile.QueueFile) -> None:
    qid = qf.envelope.qid
    for rcpt in qf.dropped:
        conn.execute("DELETE FROM recipients WHERE msg_id=? AND rcpt=?", (qid, rcpt))
    for rcpt, f in qf.finals.items():
        conn.execute("UPDATE recipients SET status=?, last_code=?, last_reply=?, claim=NULL "
                     "WHERE msg_id=? AND rcpt=? AND status NOT IN (?,?)", (f.status, f.code, f.reply, qid, rcpt, *FINAL))
    for rcpt, notice in qf.reported.items():
        conn.execute("INSERT OR IGNORE INTO bounce_reported(msg_id, rcpt, notice) VALUES (?,?,?)", (qid, rcpt, notice))
    if qf.hold is not None:
        conn.execute("UPDATE messages SET hold=? WHERE id=? AND hold!=?", (int(qf.hold), qid, int(qf.hold)))
    if qf.warned:
        conn.execute("UPDATE messages SET warned=1 WHERE id=? AND warned=0", (qid,))


def _settle(conn: sqlite3.Connection, qid: str, removed: bool) -> int:
    """Delete the row of a message with nothing left to do; returns what is left to do."""
    left = conn.execute("SELECT COUNT(*) FROM recipients r WHERE r.msg_id=? AND (r.status NOT IN (?,?) OR "
                        "(r.status=? AND NOT EXISTS (SELECT 1 FROM bounce_reported b "
                        "WHERE b.msg_id=r.msg_id AND b.rcpt=r.rcpt)))", (qid, *FINAL, BOUNCED)).fetchone()[0]
    if removed or not left:
        conn.execute("DELETE FROM messages WHERE id=?", (qid,))
        return 0
    return left


def replay(conn: sqlite3.Connection, qid: str, step: dict) -> None:
    """Redo the catalogue step a message's queueing stood for (see each step's ``journal``)."""
    from spool.fetchstate import SCHEMA as FETCH_SCHEMA
    from spool.fetchstate import Noticing, Taking
    from spool.notices import MarkWarned, _ReportBounced
    from spool.policystate import SCHEMA as POLICY_SCHEMA
    kind = step.get("kind")
    if kind in ("taking", "noticing"):
        _tables(conn, FETCH_SCHEMA)
        (Taking.replay(conn, step, qid) if kind == "taking" else Noticing.replay(conn, step))
    elif kind == "reported":
        _ReportBounced.replay(conn, step, qid)
    elif kind == "warned":
        MarkWarned.replay(conn, step)
    elif kind == "replied":
        _tables(conn, POLICY_SCHEMA)
        conn.execute("INSERT OR REPLACE INTO autoreply_sent(responder, sender, at) VALUES (?,?,?)",
                     (step["responder"].lower(), step["sender"].lower(), step["at"]))
    elif kind == "forwarded":
        _tables(conn, POLICY_SCHEMA)
        conn.execute("INSERT OR REPLACE INTO forwarded(msg_id, rcpt, new_id, at) VALUES (?,?,?,?)",
                     (step["msg_id"], step["rcpt"], qid, time.time()))


def _tables(conn: sqlite3.Connection, schema: str) -> None:
    # Inside a transaction: executescript would COMMIT it, so one statement at a time.
    for stmt in schema.split(";"):
        if stmt.strip():
            conn.execute(stmt)


def write_journal(q: Queue, qid: str) -> None:
    """A journal for a listed message that has none, from its row (and its body's digest)."""
    msg = q.get(qid)
    if msg is None:
        return
    env = queuefile.Envelope(
        qid=qid, sender=msg.sender, arrival=msg.arrival, size=msg.size,
        sha256=queuefile.body_digest(q.msg / qid) if (q.msg / qid).stat().st_size == msg.size else None,
        origin=msg.origin, client=msg.client, message_id=msg.message_id, subject=msg.subject, urgent=msg.urgent,
        smtputf8=msg.smtputf8,
        recipients=tuple(queuefile.EnvelopeRecipient(r.rcpt, r.route, r.orcpt) for r in msg.recipients))
    tmp = q.tmp / f"{qid}.env"
    queuefile.write(tmp, env)
    records = [queuefile.final(r.rcpt, r.status, r.last_code, r.last_reply) for r in msg.recipients
               if r.status in FINAL]
    records += [{"hold": True}] if msg.hold else []
    records += [{"warned": True}] if msg.warned else []
    queuefile.append(tmp, records)
    os.rename(tmp, q.env / qid)
    fsync_dir(q.env)
    log.warning("%s: had no queue envelope; written from the catalogue", qid)


def row_to_lost_found(q: Queue, qid: str, why: str) -> None:
    """Write a listed message's row out to ``lost+found/<qid>.row.txt`` and drop it."""
    msg = q.get(qid)
    if msg is None:
        return
    q.lost_found.mkdir(exist_ok=True, mode=0o700)
    lines = [f"why: {why}", f"queue id: {msg.id}", f"sender: <{msg.sender}>", f"arrival: {time.ctime(msg.arrival)}",
             f"size: {msg.size}", f"origin: {msg.origin} {msg.client or ''}", f"subject: {msg.subject or ''}",
             f"message-id: {msg.message_id or ''}"]
    lines += [f"recipient: {r.rcpt} [{r.route}] {r.status} {r.last_code or ''} {r.last_reply or ''}".rstrip()
              for r in msg.recipients]
    (q.lost_found / f"{qid}.row.txt").write_text("\n".join(lines) + "\n")
    fsync_dir(q.lost_found)
    env = q.env / qid
    if env.exists():
        os.rename(env, q.lost_found / f"{qid}.env")
    q.remove(qid)
    log.warning("%s: %s; its catalogue row is kept in %s", qid, why, q.lost_found / f"{qid}.row.txt")


def to_lost_found(q: Queue, qid: str, why: str) -> Path:
    """Keep whatever is left of ``qid`` (body, envelope) in ``lost+found/`` for a person to read."""
    q.lost_found.mkdir(exist_ok=True, mode=0o700)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for src, suffix in ((q.msg / qid, ""), (q.env / qid, ".env")):
        if src.exists():
            os.rename(src, q.lost_found / f"{qid}{suffix}.{stamp}")
    fsync_dir(q.lost_found)
    log.error("%s: moved to %s: %s", qid, q.lost_found, why)
    return q.lost_found


def describe(report: dict[str, int]) -> list[tuple[int, str]]:
    """What a recovery did, as (log level, line): removals and rebuilds are never INFO."""
    r = report
    out: list[tuple[int, str]] = []
    queued_again = r.get("imported", 0) + r.get("settled", 0)
    if r.get("created") and queued_again:
        out.append((logging.ERROR, f"recovery: the catalogue was missing or empty while {queued_again} message(s) "
                    f"were in the queue files: rebuilt from them ({r['imported']} queued again, "
                    f"{r['settled']} already finished)"))
    elif queued_again:
        out.append((logging.WARNING, f"recovery: {queued_again} message(s) the catalogue did not list were read "
                    f"back from their queue files ({r['imported']} queued again, {r['settled']} already finished)"))
    if r.get("tmp") or r.get("orphans"):
        out.append((logging.WARNING, f"recovery: removed {r.get('tmp', 0) + r.get('orphans', 0)} partial write(s) "
                    "(bodies without an envelope: never acknowledged)"))
    if r.get("reconciled"):
        out.append((logging.WARNING, f"recovery: {r['reconciled']} message(s) caught up with their queue files "
                    "(the catalogue had lost commits)"))
    if r.get("journals"):
        out.append((logging.WARNING, f"recovery: wrote {r['journals']} missing queue envelope(s) from the catalogue"))
    if r.get("lost_found"):
        out.append((logging.ERROR, f"recovery: {r['lost_found']} unreadable queue file(s) moved to lost+found/"))
    if r.get("damaged"):
        out.append((logging.ERROR, f"recovery: {r['damaged']} message(s) held: body size differs from the size "
                    "accepted ('dialmail spool check' lists them)"))
    if r.get("vanished"):
        out.append((logging.WARNING, f"recovery: {r['vanished']} listed message(s) had neither body nor envelope "
                    "(finished in commits the catalogue lost); their rows are kept in lost+found/"))
    if r.get("missing"):
        out.append((logging.ERROR, f"recovery: {r['missing']} queued message(s) have lost their body files "
                    "('dialmail spool check' lists them)"))
    if r.get("claims"):
        out.append((logging.INFO, f"recovery: released {r['claims']} claim(s) of the previous run"))
    return out


@dataclass
class Rebuilt:
    moved_to: Path | None
    salvaged: dict[str, int] = field(default_factory=dict)
    report: dict[str, int] = field(default_factory=dict)


def move_aside(root: Path) -> Path | None:
    """Rename the catalogue (and its -wal/-shm) to ``dialmail.db.corrupt-<time>``; never deletes."""
    db = Path(root) / CATALOGUE
    if not db.exists():
        return None
    aside = db.with_name(f"{CATALOGUE}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    n = 0
    while aside.exists():
        n += 1
        aside = aside.with_name(f"{aside.name.split('~')[0]}~{n}")
    for suffix in ("-wal", "-shm"):
        side = db.with_name(db.name + suffix)
        if side.exists():
            os.rename(side, aside.with_name(aside.name + suffix))
    os.rename(db, aside)
    fsync_dir(db.parent)
    return aside


def rebuild_catalogue(root: Path) -> Rebuilt:
    """Move the catalogue aside and make a new one from the queue files (and what can be
    read of the old one's other tables).  The daemon must not be running, and the caller
    holds the queue's write lock (as ``Queue.recover`` takes it)."""
    from spool.fetchstate import FetchState
    from spool.policystate import PolicyState
    from spool.sessions import SessionLog
    aside = move_aside(root)
    cat = Catalogue(root)
    try:
        FetchState(cat), PolicyState(cat), SessionLog(cat)
        salvaged = _salvage(aside, cat) if aside is not None else {}
        q = Queue(cat)
        report = recover(q)
    finally:
        cat.close()
    log.error("catalogue rebuilt from the queue files: %d message(s) queued again, %d finished, %d to lost+found; "
              "the damaged catalogue is kept as %s", report.get("imported", 0), report.get("settled", 0),
              report.get("lost_found", 0), aside)
    return Rebuilt(aside, salvaged, report)


def _salvage(aside: Path, cat: Catalogue) -> dict[str, int]:
    """Copy what SQLite can still read of the catalogue-only tables, row by row."""
    # Read a copy: opening the damaged file itself could let SQLite change it (WAL replay).
    work = aside.with_name(aside.name + ".reading")
    shutil.copyfile(aside, work)
    wal = aside.with_name(aside.name + "-wal")
    if wal.exists():
        shutil.copyfile(wal, work.with_name(work.name + "-wal"))
    out: dict[str, int] = {}
    try:
        old = sqlite3.connect(work, isolation_level=None)
        try:
            for table in SALVAGED:
                cols = [r[1] for r in cat.conn.execute(f"PRAGMA table_info({table})")]
                if not cols:
                    continue
                n = 0
                with cat.transaction() as conn:
                    try:
                        for row in old.execute(f"SELECT {', '.join(cols)} FROM {table}"):
                            conn.execute(f"INSERT OR IGNORE INTO {table}({', '.join(cols)}) "
                                         f"VALUES ({', '.join('?' * len(cols))})", row)
                            n += 1
                    except sqlite3.DatabaseError as exc:
                        log.warning("catalogue rebuild: table %s read only in part (%s)", table, exc)
                out[table] = n
        except sqlite3.DatabaseError as exc:
            log.warning("catalogue rebuild: nothing could be read from %s (%s)", aside, exc)
        finally:
            old.close()
    finally:
        for leftover in (work, work.with_name(work.name + "-wal"), work.with_name(work.name + "-shm")):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
    return out
