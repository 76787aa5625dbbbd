"""``dialmail spool check`` and ``repair``: the spool checked against itself, fsck style.

``check`` reads and changes nothing; every finding says what is wrong and exactly what
``repair`` will do about it.  ``repair`` (daemon stopped) does those things and keeps
every byte it cannot place back in the queue in ``<spool>/lost+found/``.

What is checked:

* the catalogue: present when queue files exist, and SQLite's ``integrity_check``;
* every listed message: its body present, of the size accepted and (when its envelope
  has one) of the SHA-256 accepted; its envelope journal present and readable, and the
  catalogue row not behind it;
* the queue files: bodies the catalogue does not list (with an envelope: a complete
  message to queue again; without: a partial write), envelopes without a body, and
  leftovers in ``queue/tmp`` older than an hour;
* claims held by processes that are gone (owners are ``local:<pid>``, ``relay:<pid>...``);
* Maildir ``tmp/`` files older than 36 hours (qmail's rule: a delivery that died);
* the fetch state: a queued fetched message whose ISP copy is not recorded as taken
  (the fetcher would take it again), and UIDs recorded for a folder without its
  UIDVALIDITY.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from spool import queuefile, rebuild
from spool.locks import PidLock
from spool.queue import CATALOGUE, Catalogue, Queue, catalogue_problem, is_damage

MAILDIR_TMP_AGE = 36 * 3600   # qmail: a tmp/ file this old is a delivery that died
QUEUE_TMP_AGE = 3600          # younger ones may be a message being written right now


@dataclass(frozen=True)
class Finding:
    """One thing wrong: what (``subject``), why, and what ``repair`` will do."""
    kind: str
    subject: str
    problem: str
    repair: str


class SpoolInUse(Exception):
    """``repair`` needs the daemon stopped."""


class CatalogueBusy(Exception):
    """SQLite could not read the catalogue just now (locked by a writer): try again."""


def check(root: Path, now: float | None = None) -> list[Finding]:
    """Every problem found in the spool at ``root``; changes nothing."""
    try:
        return _check(root, now)
    except sqlite3.OperationalError as exc:
        raise CatalogueBusy(str(exc)) from None


def _check(root: Path, now: float | None = None) -> list[Finding]:
    root = Path(root)
    now = time.time() if now is None else now
    out: list[Finding] = []
    qdir = root / "queue"
    bodies = _names(qdir / "msg")
    envelopes = _names(qdir / "env")
    db = root / CATALOGUE
    conn, problem = _open_readonly(db)
    if conn is None or problem is not None:
        if problem is None and not bodies and not envelopes:
            return out + _maildir_tmp(root, now)
        what = problem or "missing or empty"
        out.append(Finding("catalogue", str(db), f"the catalogue is {what}" if problem is None else
                           f"the catalogue is damaged: {problem}",
                           f"move it aside as {CATALOGUE}.corrupt-<time> (kept, never deleted) and rebuild it from "
                           f"the {len(bodies)} queue file(s); what can still be read of the fetch and policy state "
                           "is copied over"))
        out += _files_only(qdir, bodies, envelopes)
        return out + _maildir_tmp(root, now)
    try:
        out += _queue(conn, qdir, bodies, envelopes)
        out += _claims(conn)
        out += _fetch(conn, qdir, bodies, envelopes)
    finally:
        conn.close()
    out += _queue_tmp(qdir, now)
    return out + _maildir_tmp(root, now)


def _names(d: Path) -> set[str]:
    try:
        return set(os.listdir(d))
    except FileNotFoundError:
        return set()


def _open_readonly(db: Path) -> tuple[sqlite3.Connection | None, str | None]:
    if not db.exists() or db.stat().st_size == 0:
        return None, None
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
        conn.row_factory = sqlite3.Row
        problem = catalogue_problem(conn, full=True)
        if problem is None:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not {"messages", "recipients"} <= tables:
                problem = "it has no queue tables"
    except sqlite3.DatabaseError as exc:
        if not is_damage(exc):
            raise  # busy or unreadable is not damage: never a reason to move the catalogue aside
        return None, str(exc)
    if problem is not None:
        conn.close()
        return None, problem
    return conn, None


def _files_only(qdir: Path, bodies: set[str], envelopes: set[str]) -> list[Finding]:
    out = []
    for qid in sorted(bodies):
        if qid not in envelopes:
            out.append(Finding("partial", qid, "a body without an envelope (a write never acknowledged)",
                               "move it to lost+found/"))
            continue
        try:
            queuefile.read(qdir / "env" / qid)
        except queuefile.Unreadable as exc:
            out.append(Finding("unreadable", qid, str(exc), "move body and envelope to lost+found/"))
    return out


def _queue(conn: sqlite3.Connection, qdir: Path, bodies: set[str], envelopes: set[str]) -> list[Finding]:
    out = []
    rows = {r["id"]: r for r in conn.execute("SELECT id, size, hold FROM messages")}
    status = {}
    for r in conn.execute("SELECT msg_id, rcpt, status FROM recipients"):
        status.setdefault(r["msg_id"], {})[r["rcpt"]] = r["status"]
    for qid, row in sorted(rows.items()):
        if qid not in bodies and qid not in envelopes:
            out.append(Finding("missing-body", qid, "listed, but its body and envelope are gone (finished and "
                               "removed in commits the catalogue lost, or lost from the disk)",
                               "remove it from the catalogue, keeping the row in lost+found/"))
            continue
        if qid not in bodies:
            out.append(Finding("missing-body", qid, "listed, but its body file is gone: the message is lost",
                               "remove it from the catalogue, keeping its row and envelope in lost+found/ "
                               "(tell its sender by hand)"))
            continue
        body = qdir / "msg" / qid
        size = body.stat().st_size
        qf = None
        if qid not in envelopes:
            out.append(Finding("envelope", qid, "listed, but it has no queue envelope",
                               "write its envelope from the catalogue"))
        else:
            try:
                qf = queuefile.read(qdir / "env" / qid)
            except queuefile.Unreadable as exc:
                out.append(Finding("envelope", qid, str(exc), "rewrite its envelope from the catalogue, "
                                   "keeping the unreadable one in lost+found/"))
        held = "" if row["hold"] else "hold it; "
        advice = (f"{held}look at it with 'dialmail queue show {qid}', then 'dialmail queue release {qid}' sends "
                  f"it as it is or 'dialmail queue bounce {qid}' returns it")
        if size != row["size"]:
            out.append(Finding("body", qid, f"body is {size} bytes, {row['size']} were accepted", advice))
        elif qf is not None and qf.sha256 and _digest(body) != qf.sha256:
            out.append(Finding("body", qid, "body changed since it was accepted (SHA-256 differs)", advice))
        if qf is not None and _behind(qf, status.get(qid, {}), bool(row["hold"])):
            out.append(Finding("behind", qid, "the catalogue is behind its queue file (commits lost)",
                               "catch the catalogue up: final outcomes, holds, reports, removal"))
    for qid in sorted(bodies - set(rows)):
        if qid not in envelopes:
            out.append(Finding("partial", qid, "a body without an envelope or catalogue row (a write never "
                               "acknowledged)", "move it to lost+found/"))
            continue
        try:
            qf = queuefile.read(qdir / "env" / qid)
        except queuefile.Unreadable as exc:
            out.append(Finding("unreadable", qid, str(exc), "move body and envelope to lost+found/"))
            continue
        waiting = [r.rcpt for r in qf.envelope.recipients if r.rcpt not in qf.finals and r.rcpt not in qf.dropped]
        if qf.removed or not waiting:
            out.append(Finding("unlisted", qid, "finished, but its files are still here", "remove its files"))
        else:
            out.append(Finding("unlisted", qid, f"a complete message the catalogue does not list "
                               f"(from <{qf.envelope.sender}> to {', '.join(waiting)})",
                               "queue it again from its envelope"))
    for qid in sorted(envelopes - bodies - set(rows)):
        out.append(Finding("envelope", qid, "an envelope without its body", "move it to lost+found/"))
    return out


def _behind(qf: queuefile.QueueFile, status: dict[str, str], hold: bool) -> bool:
    if qf.removed:
        return True
    if any(r in status for r in qf.dropped):
        return True
    if any(status.get(r) not in (None, "delivered", "bounced") for r in qf.finals):
        return True
    return qf.hold is not None and qf.hold != hold


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def claim_pid(owner: str) -> int | None:
    """The process id in a claim owner (``local:<pid>``, ``relay:<pid>[:...]``), if any."""
    m = re.match(r"^[a-z]+:(\d+)", owner)
    return int(m.group(1)) if m else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_owners(owners: list[str]) -> list[str]:
    return [o for o in owners if (pid := claim_pid(o)) is not None and not _alive(pid)]


def _claims(conn: sqlite3.Connection) -> list[Finding]:
    owners = [r[0] for r in conn.execute("SELECT DISTINCT claim FROM recipients WHERE claim IS NOT NULL")]
    return [Finding("claim", owner, f"claimed by process {claim_pid(owner)}, which is gone",
                    "release the claim (the recipients are tried again)") for owner in stale_owners(owners)]


def _fetch(conn: sqlite3.Connection, qdir: Path, bodies: set[str], envelopes: set[str]) -> list[Finding]:
    out = []
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "fetch_uids" not in tables:
        return out
    listed = {r[0] for r in conn.execute("SELECT id FROM messages")}
    for qid in sorted(listed & bodies & envelopes):
        try:
            step = queuefile.read(qdir / "env" / qid).envelope.then
        except queuefile.Unreadable:
            continue
        if not step or step.get("kind") != "taking":
            continue
        c = step["copy"]
        if conn.execute("SELECT 1 FROM fetch_uids WHERE account=? AND folder=? AND uid=?",
                        (c["account"], c["folder"], c["uid"])).fetchone() is None:
            out.append(Finding("fetch", qid, f"fetched from {c['account']} {c['folder']} UID {c['uid']}, but that "
                               "copy is not recorded as taken (it would be fetched again)",
                               "record the copy as taken"))
    for r in conn.execute("SELECT u.account, u.folder, COUNT(*) n FROM fetch_uids u LEFT JOIN fetch_folders f "
                          "ON f.account=u.account AND f.folder=u.folder WHERE f.uidvalidity IS NULL "
                          "GROUP BY u.account, u.folder"):
        out.append(Finding("fetch-note", f"{r['account']} {r['folder']}", f"{r['n']} UID(s) recorded without the "
                           "folder's UIDVALIDITY", "nothing: the next fetch records the UIDVALIDITY again"))
    return out


def _queue_tmp(qdir: Path, now: float) -> list[Finding]:
    out = []
    for name in sorted(_names(qdir / "tmp")):
        try:
            age = now - (qdir / "tmp" / name).stat().st_mtime
        except FileNotFoundError:
            continue
        if age > QUEUE_TMP_AGE:
            out.append(Finding("queue-tmp", f"queue/tmp/{name}", f"a write left unfinished {age / 3600:.0f}h ago",
                               "move it to lost+found/"))
    return out


def _maildir_tmp(root: Path, now: float) -> list[Finding]:
    out = []
    mail = root / "mail"
    if not mail.is_dir():
        return out
    for tmp in sorted(mail.glob("*/tmp")) + sorted(mail.glob("*/.*/tmp")):
        for name in sorted(_names(tmp)):
            try:
                age = now - (tmp / name).stat().st_mtime
            except FileNotFoundError:
                continue
            if age > MAILDIR_TMP_AGE:
                out.append(Finding("maildir-tmp", str((tmp / name).relative_to(root)),
                                   f"a Maildir delivery that died {age / 3600:.0f}h ago", "move it to lost+found/"))
    return out


PROBLEM_KINDS_THAT_ARE_NOTES = ("fetch-note",)


def problems(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.kind not in PROBLEM_KINDS_THAT_ARE_NOTES]


# ------------------------------------------------------------------ repair

def repair(root: Path, now: float | None = None) -> list[str]:
    """Do what ``check`` said; returns one line per thing done.  Raises ``SpoolInUse``
    while the daemon runs (it recovers at its own start, and holds claims)."""
    root = Path(root)
    now = time.time() if now is None else now
    holder = PidLock(root / "daemon.pid").holder()
    if holder is not None:
        raise SpoolInUse(f"the dialmail daemon (pid {holder}) is running on {root}: stop it, then repair")
    findings = check(root, now)
    done: list[str] = []
    qdir = root / "queue"
    lost = root / "lost+found"
    (qdir / "tmp").mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = os.open(qdir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # no sendmail writes a message meanwhile
        for f in findings:
            if f.kind == "partial":
                _keep(qdir / "msg" / f.subject, lost / f"{f.subject}.partial")
                done.append(f"{f.subject}: body without envelope moved to lost+found/")
            elif f.kind == "queue-tmp":
                _keep(root / f.subject, lost / f"queue-tmp-{Path(f.subject).name}")
                done.append(f"{f.subject}: moved to lost+found/")
            elif f.kind == "maildir-tmp":
                _keep(root / f.subject, lost / "maildir-tmp" / f.subject.replace("/", "_"))
                done.append(f"{f.subject}: moved to lost+found/")
            elif f.kind == "unreadable":
                _keep(qdir / "env" / f.subject, lost / f"{f.subject}.env")
                _keep(qdir / "msg" / f.subject, lost / f"{f.subject}")
                done.append(f"{f.subject}: body and unreadable envelope moved to lost+found/")
            elif f.kind == "envelope" and (qdir / "env" / f.subject).exists():
                # listed: keep the unreadable journal, recovery writes a new one from the row;
                # or unlisted without a body: nothing to queue, keep it
                _keep(qdir / "env" / f.subject, lost / f"{f.subject}.env")
                done.append(f"{f.subject}: envelope moved to lost+found/")
        if any(f.kind == "catalogue" for f in findings):
            rebuilt = rebuild.rebuild_catalogue(root)
            done.append(f"catalogue moved aside to {rebuilt.moved_to} and rebuilt: "
                        f"{rebuilt.report.get('imported', 0)} message(s) queued again, "
                        f"{rebuilt.report.get('settled', 0)} finished, "
                        f"{rebuilt.report.get('lost_found', 0)} to lost+found; salvaged "
                        + (", ".join(f"{t} {n}" for t, n in rebuilt.salvaged.items() if n) or "no other rows"))
            return done
        cat = Catalogue(root)
        try:
            _repair_listed(Queue(cat), findings, lost, done)
        finally:
            cat.close()
    finally:
        os.close(lock)
    return done


def _repair_listed(q: Queue, findings: list[Finding], lost: Path, done: list[str]) -> None:
    for f in findings:
        if f.kind == "missing-body":
            rebuild.row_to_lost_found(q, f.subject, f.problem)
            done.append(f"{f.subject}: removed from the catalogue; its row (and envelope) kept in lost+found/")
        elif f.kind == "claim":
            n = q.release_claims(f.subject)
            done.append(f"{f.subject}: released {n} stale claim(s)")
    report = rebuild.recover(q, release_claims=False)
    done.extend(line for _level, line in rebuild.describe(report))
    for f in findings:
        msg = q.get(f.subject)
        if f.kind == "body" and msg is not None and not msg.hold:
            q.hold_damaged(f.subject, f.problem)
            done.append(f"{f.subject}: held ({f.problem})")
        elif f.kind == "fetch" and msg is not None:
            step = queuefile.read(q.envelope_path(f.subject)).envelope.then
            with q.cat.transaction() as conn:
                rebuild.replay(conn, f.subject, step)
            done.append(f"{f.subject}: ISP copy recorded as taken")


def _keep(src: Path, dst: Path) -> None:
    """Move ``src`` into lost+found under ``dst`` (a new name if taken); never deletes."""
    if not src.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    n, target = 0, dst
    while target.exists():
        n += 1
        target = dst.with_name(f"{dst.name}.{n}")
    os.rename(src, target)
