"""Pulling mail out of the ISP's IMAP mailboxes into the spool (fetchmail's job, done safely).

For each ``[[fetch]]`` account and folder, in this order:

1. SELECT; a UIDVALIDITY other than the recorded one voids the recorded UIDs
   (``spool.fetchstate``), and copies taken before are then recognised by a digest of
   their header block and size, fetched with ``BODY.PEEK[HEADER]`` only;
2. finish what an earlier session left: ISP copies already spooled but not yet deleted,
   and copies kept longer than ``keep_days``;
3. read RFC822.SIZE of every new UID, apply the size policy (leave / defer to the
   off-peak window / delete, each with a notice), then fetch smallest first up to the
   session caps, so one big attachment never holds up the short urgent mail;
4. per message: body into a spool tmp file (large ones in ``BODY.PEEK[]<off.len>`` pieces
   straight to disk, so memory stays flat, each piece fsynced into
   ``<spool>/fetch-partial/`` so a cut line resumes there next session), then ``enqueue_file`` whose
   transaction also records the UID, the copy's digest and the (recipient, Message-ID)
   pairs: the message is in the spool exactly when its UID is taken;
5. only then, with keep = false, ``\\Deleted`` + UID EXPUNGE (plain EXPUNGE at the end of
   the folder without UIDPLUS).  A cut anywhere leaves UIDs either untaken (fetched again
   next time, nothing was spooled) or taken and pending deletion (deleted next time).

imapclient is blocking: each account runs in a worker thread with socket timeouts, the
progress callback is handed back to the event loop, and ``stop_event`` is looked at
between messages and between the pieces of a large one.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
import time
from dataclasses import dataclass, field
from email.utils import formatdate, make_msgid
from itertools import chain
from pathlib import Path
from typing import Callable

from imapclient import IMAPClient, SocketTimeout
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError

from gateway.config import Config, FetchConfig
from gateway.fetch.envelope import (
    envelope_recipients,
    first,
    header_block,
    message_digest,
    message_id,
    message_id_digest,
    return_path,
)
from gateway.mail import address
from gateway.mail.errors import ConfigError
from gateway.office.directory import Directory
from spool.fetchstate import AccountLock, AlreadyFetching, FetchState
from spool.fsio import is_disk_full, write_file
from spool.queue import LOCAL, RELAY, Catalogue, Queue

log = logging.getLogger("dialmail.fetch")

CONNECT_TIMEOUT = 30.0
# Per socket read, not per message: a 1 MB piece at 3 kB/s arrives in many reads.
READ_TIMEOUT = 120.0
SIZE_BATCH = 500      # UIDs per RFC822.SIZE / BODY[HEADER] round trip
DELETED = b"\\Deleted"

ORIGIN = "fetch"
NOTICE_ORIGIN = "fetch-notice"

# Outcomes of the size policy, also the notice kinds recorded once per copy.
LEFT = "oversize-left"
DEFERRED = "oversize-deferred"
DELETED_OVERSIZE = "oversize-deleted"


@dataclass(frozen=True)
class FetchProgress:
    """One message spooled (or one piece of a large one: ``partial`` True)."""
    account: str
    folder: str
    uid: int
    size: int
    messages: int          # spooled so far in this account's session
    bytes: int
    planned_messages: int  # what this folder's plan holds
    planned_bytes: int
    partial: bool = False
    done_bytes: int = 0    # of this message, for pieces


@dataclass
class AccountResult:
    account: str
    fetched: int = 0
    bytes: int = 0
    deferred: int = 0      # left for a later session: caps, off-peak window, stop
    oversize: int = 0      # over max_message_size: left, deferred or deleted by policy
    deleted: int = 0       # ISP copies removed (after spooling, by keep_days or policy)
    duplicates: int = 0    # copies or (recipient, Message-ID) pairs taken before
    review: int = 0        # sent to the postmaster: envelope recipient unknown
    notices: int = 0
    complete: bool = False  # every folder worked through, nothing left by caps or stop
    error: str | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        parts = [f"{self.fetched} fetched ({self.bytes} bytes)"]
        for name in ("deferred", "oversize", "deleted", "duplicates", "review", "notices"):
            if getattr(self, name):
                parts.append(f"{getattr(self, name)} {name}")
        parts.append(f"{self.seconds:.1f}s")
        if self.error:
            parts.append(f"error: {self.error}")
        return f"{self.account}: " + ", ".join(parts)


@dataclass
class FetchResult:
    accounts: list[AccountResult] = field(default_factory=list)

    def _sum(self, name: str) -> int:
        return sum(getattr(a, name) for a in self.accounts)

    @property
    def fetched(self) -> int:
        return self._sum("fetched")

    @property
    def bytes(self) -> int:
        return self._sum("bytes")

    @property
    def deferred(self) -> int:
        return self._sum("deferred")

    @property
    def deleted(self) -> int:
        return self._sum("deleted")

    @property
    def duplicates(self) -> int:
        return self._sum("duplicates")

    @property
    def review(self) -> int:
        return self._sum("review")

    @property
    def oversize(self) -> int:
        return self._sum("oversize")

    @property
    def notices(self) -> int:
        return self._sum("notices")

    @property
    def errors(self) -> list[str]:
        return [f"{a.account}: {a.error}" for a in self.accounts if a.error]

    @property
    def complete(self) -> bool:
        return all(a.complete for a in self.accounts)


class _Stopped(Exception):
    """stop_event was set: leave the rest for the next session."""


def in_window(window: tuple[int, int] | None, now: float) -> bool:
    """Is local time ``now`` inside ``(start, end)`` minutes (wrapping past midnight)?"""
    if window is None:
        return False
    lt = time.localtime(now)
    minute = lt.tm_hour * 60 + lt.tm_min
    start, end = window
    return start <= minute < end if start < end else (minute >= start or minute < end)


def _fmt_window(window: tuple[int, int]) -> str:
    return "-".join(f"{m // 60:02d}:{m % 60:02d}" for m in window)


class AccountFetcher:
    """One account's session; runs entirely in one worker thread."""

    def __init__(self, config: Config, account: FetchConfig, queue: Queue, state: FetchState,
                 directory: Directory, clock: Callable[[], float] = time.time,
                 report: Callable[[FetchProgress], None] | None = None, stop=None):
        self.config = config
        self.account = account
        self.name = account.name
        self.queue = queue
        self.state = state
        self.directory = directory
        self.clock = clock
        self.report = report
        self.stop = stop
        self.result = AccountResult(account.name)
        self.uidplus = False
        self.expunge_later: list[int] = []
        self.capped = False
        self.uidvalidity = 0
        self.renumbered = False
        self.planned = (0, 0)  # messages, bytes of the current folder's plan

    # ------------------------------------------------------------ session

    def run(self) -> AccountResult:
        started = time.monotonic()
        try:
            with AccountLock(self.config.spool_dir, self.name):
                client = self.connect()
                try:
                    failed = []
                    for folder in self.account.folders:
                        self.check_stop()
                        try:
                            self.folder(client, folder)
                        except IMAPClientAbortError:
                            raise
                        except IMAPClientError as exc:  # a NO/BAD for this folder: the others still go
                            failed.append(f"{folder}: server said {_text(exc)}")
                    self.result.error = "; ".join(failed) or None
                    self.result.complete = not self.capped and not failed
                finally:
                    _close(client)
        except _Stopped:
            self.result.error = None
        except AlreadyFetching as exc:
            self.result.error = str(exc)
        except LoginError as exc:
            self.result.error = f"login refused: {_text(exc)}"
        except ConfigError as exc:
            self.result.error = str(exc)
        except ssl.SSLCertVerificationError as exc:
            self.result.error = f"TLS certificate refused: {exc.verify_message or exc}"
        except OSError as exc:
            if is_disk_full(exc):
                self.result.error = f"spool disk full: {exc.strerror}"
            else:  # a carrier drop, a reset, a timeout
                self.result.error = f"connection lost: {exc.strerror or exc or type(exc).__name__}"
        except IMAPClientAbortError as exc:
            self.result.error = f"connection lost: {_text(exc) or 'aborted'}"
        except IMAPClientError as exc:
            self.result.error = f"server said: {_text(exc)}"
        self.result.seconds = time.monotonic() - started
        log.info("fetch %s", self.result.summary())
        return self.result

    def connect(self) -> IMAPClient:
        a = self.account
        password = a.password()
        if password is None:
            raise ConfigError(f"fetch[{a.name}]: password_file is required to log in")
        ctx = ssl.create_default_context(cafile=str(a.ca_file) if a.ca_file else None)
        timeout = SocketTimeout(connect=CONNECT_TIMEOUT, read=READ_TIMEOUT)
        if a.tls == "imaps":
            client = IMAPClient(a.host, port=a.port, ssl=True, ssl_context=ctx, timeout=timeout)
        else:
            client = IMAPClient(a.host, port=a.port, ssl=False, timeout=timeout)
            if a.tls == "starttls":
                client.starttls(ssl_context=ctx)
        client.login(a.username, password)
        self.uidplus = client.has_capability("UIDPLUS")
        return client

    def check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise _Stopped()

    # ------------------------------------------------------------ one folder

    def folder(self, client: IMAPClient, folder: str) -> None:
        a = self.account
        readonly = a.keep and a.keep_days is None and not (a.max_message_size and a.oversize == "delete")
        selected = client.select_folder(folder, readonly=readonly)
        uidvalidity = int(selected[b"UIDVALIDITY"])
        renumbered = self.state.open_folder(self.name, folder, uidvalidity)
        if renumbered:
            log.warning("fetch %s/%s: UIDVALIDITY changed to %d; recognising copies taken before by digest",
                        self.name, folder, uidvalidity)
        on_server = client.search(["ALL"]) if selected.get(b"EXISTS", 1) else []
        self.state.forget_missing(self.name, folder, on_server)
        self.expunge_later = []
        if not readonly:
            if not a.keep:  # copies kept while keep was true: they are spooled, so they may go now
                self.state.mark_for_deletion(self.name, folder, self.state.older_than(self.name, folder, float("inf")))
            elif a.keep_days:
                expired = self.state.older_than(self.name, folder, self.clock() - a.keep_days * 86400)
                self.state.mark_for_deletion(self.name, folder, expired)
            self.delete(client, folder, self.state.pending_deletion(self.name, folder))
        taken = self.state.taken(self.name, folder)
        # Mail someone deleted at the ISP (webmail) but not yet expunged is not fetched.
        undeleted = client.search(["UNDELETED"]) if on_server else []
        new = [uid for uid in undeleted if uid not in taken]
        self.uidvalidity = uidvalidity
        self.renumbered = renumbered
        self.clean_partials(folder, set(new))
        try:
            if new:
                self.take_new(client, folder, uidvalidity, new, renumbered)
        except BaseException:
            try:  # a stop leaves a working connection; after a cut this fails at once
                self.expunge(client, folder)
            except (OSError, IMAPClientError):
                pass
            raise
        self.expunge(client, folder)

    def expunge(self, client: IMAPClient, folder: str) -> None:
        """Without UIDPLUS: one EXPUNGE at the end of the folder for the copies flagged \\Deleted."""
        if self.expunge_later:
            client.expunge()
            self.state.forget(self.name, folder, self.expunge_later)
            self.result.deleted += len(self.expunge_later)
            self.expunge_later = []

    def take_new(self, client: IMAPClient, folder: str, uidvalidity: int, new: list[int], renumbered: bool) -> None:
        a = self.account
        sizes: dict[int, int] = {}
        for i in range(0, len(new), SIZE_BATCH):
            for uid, item in client.fetch(new[i:i + SIZE_BATCH], ["RFC822.SIZE"]).items():
                sizes[uid] = int(item[b"RFC822.SIZE"])
        if renumbered:
            self.recognise(client, folder, sizes)
        candidates = []
        oversize = []
        now = self.clock()
        for uid in sorted(sizes):
            size = sizes[uid]
            if a.max_message_size and size > a.max_message_size:
                if a.oversize == "defer" and in_window(a.offpeak, now):
                    candidates.append((size, uid))
                else:
                    oversize.append(uid)
            else:
                candidates.append((size, uid))
        if oversize:
            self.size_policy(client, folder, uidvalidity, oversize, sizes)
        # Smallest first: many short messages before one big attachment.
        candidates.sort()
        plan = []
        planned_bytes = 0
        for size, uid in candidates:
            count = self.result.fetched + len(plan)
            if a.max_messages and count >= a.max_messages:
                break
            if a.max_bytes and self.result.bytes + planned_bytes + size > a.max_bytes and count:
                break
            plan.append((uid, size))
            planned_bytes += size
        if len(plan) < len(candidates):
            self.capped = True
            self.result.deferred += len(candidates) - len(plan)
        self.planned = (len(plan), planned_bytes)
        try:
            batch: list[tuple[int, int]] = []
            batch_bytes = 0
            for uid, size in plan:
                if size > a.chunk_size:
                    if batch:
                        self.fetch_batch(client, folder, batch)
                        batch, batch_bytes = [], 0
                    self.fetch_large(client, folder, uid, size)
                    continue
                if batch and (len(batch) >= a.batch_size or batch_bytes + size > a.chunk_size):
                    self.fetch_batch(client, folder, batch)
                    batch, batch_bytes = [], 0
                batch.append((uid, size))
                batch_bytes += size
            if batch:
                self.fetch_batch(client, folder, batch)
        except _Stopped:
            done = self.state.taken(self.name, folder)
            self.result.deferred += sum(1 for uid, _ in plan if uid not in done)
            raise

    def recognise(self, client: IMAPClient, folder: str, sizes: dict[int, int]) -> None:
        """After a UIDVALIDITY change: mark copies taken before, reading headers only."""
        uids = sorted(sizes)
        for i in range(0, len(uids), SIZE_BATCH):
            part = uids[i:i + SIZE_BATCH]
            digests = {}
            for uid, item in client.fetch(part, ["BODY.PEEK[HEADER]"]).items():
                block = header_block(_item(item, b"BODY[HEADER]") or b"")
                digests[uid] = message_digest(block, sizes[uid])
            known = self.state.known_copies(self.name, digests.values())
            again = [uid for uid, d in digests.items() if d in known]
            if not again:
                continue
            now = self.clock()
            with self.queue.cat.transaction() as conn:
                for uid in again:
                    FetchState.record_taken(conn, self.name, folder, uid, sizes[uid], digests[uid],
                                            delete=not self.account.keep, qid=None, now=now)
            for uid in again:
                del sizes[uid]
            self.result.duplicates += len(again)
            if not self.account.keep:
                self.delete(client, folder, again)

    # ------------------------------------------------------------ fetching

    def fetch_batch(self, client: IMAPClient, folder: str, batch: list[tuple[int, int]]) -> None:
        self.check_stop()
        response = client.fetch([uid for uid, _ in batch], ["BODY.PEEK[]"])
        taken = []
        for uid, size in batch:
            data = _item(response.get(uid, {}), b"BODY[]")
            if data is None:
                continue  # expunged by someone else meanwhile
            if self.take(folder, uid, size, header_block(data),
                         lambda tmp, prefix, data=data: _write_durably(tmp, prefix, data, None)):
                taken.append(uid)
            self.check_stop_between(client, folder, taken)
        if not self.account.keep:
            self.delete(client, folder, taken)

    def check_stop_between(self, client, folder, taken) -> None:
        if self.stop is not None and self.stop.is_set():
            if not self.account.keep:
                self.delete(client, folder, taken)
            raise _Stopped()

    def fetch_large(self, client: IMAPClient, folder: str, uid: int, size: int) -> None:
        """Fetch in ``chunk_size`` pieces straight to disk: memory stays flat, and a cut line
        costs only the piece in flight (the next session resumes at the partial file's end)."""
        self.check_stop()
        response = client.fetch([uid], ["BODY.PEEK[HEADER]"])
        if uid not in response:
            return
        block = header_block(_item(response[uid], b"BODY[HEADER]") or b"")

        def produce(tmp, prefix: bytes) -> None:
            partial = self.download(client, folder, uid, size)
            if prefix:
                with open(partial, "rb") as body:
                    _write_durably(tmp, prefix, None, iter(lambda: body.read(1024 * 1024), b""))
                os.unlink(partial)
            else:
                os.rename(partial, tmp)  # same file system; its data is fsynced already

        if self.take(folder, uid, size, block, produce) and not self.account.keep:
            self.delete(client, folder, [uid])

    def partial_dir(self) -> Path:
        return Path(self.config.spool_dir) / "fetch-partial"

    def partial_prefix(self, folder: str) -> str:
        return hashlib.sha256(f"{self.name}\0{folder}".encode()).hexdigest()[:16]

    def download(self, client: IMAPClient, folder: str, uid: int, size: int) -> Path:
        """The whole message into a partial file named by (account, folder, UIDVALIDITY, UID).

        An IMAP message never changes under its UID, so bytes kept from an earlier
        session are still right; each piece is fsynced before the next is asked for.
        """
        self.partial_dir().mkdir(mode=0o700, exist_ok=True)
        path = self.partial_dir() / f"{self.partial_prefix(folder)}.{self.uidvalidity}.{uid}"
        chunk = self.account.chunk_size
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            offset = os.fstat(fd).st_size
            if offset:
                log.info("fetch %s/%s uid %d: resuming at byte %d of %d", self.name, folder, uid, offset, size)
            # Until a short piece, not until RFC822.SIZE: a server whose size is off must not
            # get its messages cut short.
            while True:
                self.check_stop()
                item = client.fetch([uid], [f"BODY.PEEK[]<{offset}.{chunk}>"]).get(uid, {})
                piece = _item(item, b"BODY[]")
                if not piece:
                    break
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
                offset += len(piece)
                if self.report:
                    self.report(self.progress(folder, uid, size, partial=True, done_bytes=offset))
                if len(piece) < chunk:
                    break
        except OSError as exc:
            if is_disk_full(exc):
                # Kept, the pieces would keep the spool full: no mail could come in (452), none
                # be delivered, the catalogue not be written.  The next session starts afresh.
                try:
                    os.unlink(path)
                except OSError:
                    pass
            raise
        finally:
            os.close(fd)
        return path

    def clean_partials(self, folder: str, wanted: set[int]) -> None:
        """Drop partial downloads no longer wanted: taken, gone, or from an older UIDVALIDITY."""
        d = self.partial_dir()
        if not d.is_dir():
            return
        prefix = self.partial_prefix(folder) + "."
        for name in os.listdir(d):
            if not name.startswith(prefix):
                continue
            _, validity, uid = name.split(".")
            if int(validity) != self.uidvalidity or int(uid) not in wanted:
                os.unlink(d / name)

    def take(self, folder: str, uid: int, size: int, block: bytes, produce) -> bool:
        """Spool one copy and record its UID in the same transaction; True once the UID is taken.

        ``produce(tmp_path, prefix)`` writes the message file (fsynced); it is called only
        after the copy has been found new, so a copy taken before is never downloaded whole.
        """
        digest = message_digest(block, size)
        now = self.clock()
        delete = not self.account.keep
        # Within one UIDVALIDITY a new UID is a new copy, however alike its headers and size
        # (mail without Message-ID or Received lines can be): the digest recognises copies
        # again after a renumbering, or a copy moved between the account's folders.
        recognise = self.renumbered or len(self.account.folders) > 1
        if recognise and self.state.known_copies(self.name, [digest]):
            log.info("fetch %s/%s uid %d: a copy taken before (same headers and size)", self.name, folder, uid)
            self.record_only(folder, uid, size, digest, now)
            return True
        rcpts, review = self.recipients(block)
        msgid = message_id(block)
        msgid_key = message_id_digest(msgid, block) if msgid and not review else None
        if msgid_key:
            already = self.state.delivered_to([r for r, _ in rcpts], msgid_key)
            rcpts = [(r, route) for r, route in rcpts if r not in already]
            if already:
                log.info("fetch %s/%s uid %d: %s already had %s; not delivered again", self.name, folder, uid,
                         ", ".join(sorted(already)), msgid)
            if not rcpts:
                self.record_only(folder, uid, size, digest, now)
                return True
        prefix = b""
        if review:
            prefix = f"X-Dialmail-Review: {review}\r\n".encode("utf-8", "surrogateescape")
            log.warning("fetch %s/%s uid %d: to postmaster for review: %s", self.name, folder, uid, review)
        subject = first(block, "subject")
        dropped_all = []

        def in_txn(conn, qid):
            FetchState.record_taken(conn, self.name, folder, uid, size, digest, delete, qid, now)
            if msgid_key:
                # Another account may have delivered the same message meanwhile: drop those recipients.
                dups = FetchState.record_delivered(conn, self.name, [r for r, _ in rcpts], msgid_key, now)
                for rcpt in dups:
                    conn.execute("DELETE FROM recipients WHERE msg_id=? AND rcpt=?", (qid, rcpt))
                if len(dups) == len(rcpts):
                    conn.execute("DELETE FROM messages WHERE id=?", (qid,))
                    dropped_all.append(qid)

        qid, tmp = self.queue.new_body()
        with self.queue._writing():  # keeps start-up recovery from removing the tmp file meanwhile
            produce(tmp, prefix)
            self.queue.enqueue_file(qid, tmp, return_path(block), rcpts, origin=ORIGIN,
                                    client=f"{self.name}:{folder}:{uid}", message_id=msgid,
                                    subject=subject[:200] if subject else None, in_txn=in_txn)
        if dropped_all:
            self.queue.remove(qid)
            self.result.duplicates += 1
            return True
        self.result.fetched += 1
        self.result.bytes += size
        if review:
            self.result.review += 1
        log.info("fetch %s/%s uid %d: %d bytes queued as %s for %s", self.name, folder, uid, size, qid,
                 ", ".join(r for r, _ in rcpts))
        if self.report:
            self.report(self.progress(folder, uid, size))
        return True

    def record_only(self, folder: str, uid: int, size: int, digest: str, now: float) -> None:
        """A copy taken before (other UID or other copy of the same message): mark it, spool nothing."""
        with self.queue.cat.transaction() as conn:
            FetchState.record_taken(conn, self.name, folder, uid, size, digest, not self.account.keep, None, now)
        self.result.duplicates += 1

    def progress(self, folder, uid, size, partial=False, done_bytes=0) -> FetchProgress:
        return FetchProgress(self.name, folder, uid, size, self.result.fetched, self.result.bytes,
                             self.planned[0], self.planned[1], partial, done_bytes)

    def delete(self, client: IMAPClient, folder: str, uids: list[int]) -> None:
        """Remove ISP copies that are safely spooled (their rows say pending_delete)."""
        if not uids:
            return
        client.add_flags(uids, [DELETED], silent=True)
        if self.uidplus:
            client.uid_expunge(uids)
            self.state.forget(self.name, folder, uids)
            self.result.deleted += len(uids)
        else:
            self.expunge_later.extend(uids)

    # ------------------------------------------------------------ recipients

    def local_address(self, addr: str) -> str | None:
        """An address the ISP wrote, as a local address, or None if it is nobody's here."""
        addr = address.normalise(addr)
        local, domain = address.split(addr)
        if self.account.domains and domain in self.account.domains:
            addr = f"{local}@{self.config.server.domains[0]}"
        if not self.directory.is_local(addr) or not self.directory.exists(addr):
            return None
        return addr

    def route(self, addr: str) -> tuple[str, str]:
        if "@" not in addr:
            addr = f"{addr}@{self.config.server.domains[0]}"
        addr = address.normalise(addr)
        return addr, (LOCAL if self.directory.is_local(addr) else RELAY)

    def recipients(self, block: bytes) -> tuple[list[tuple[str, str]], str | None]:
        """(recipients with routes, review reason or None)."""
        a = self.account
        postmaster = self.route(self.config.server.postmaster)
        if a.mode == "single":
            target = self.route(a.deliver_to)
            if target[1] == LOCAL and not self.directory.exists(target[0]):
                # local delivery would bounce it to a sender outside: the postmaster gets it instead
                return [postmaster], f"deliver_to {target[0]} is nobody here (account {self.name})"
            return [target], None
        env = envelope_recipients(block, a.envelope_header, a.envelope_skip, a.guess_from_headers)
        if env is None:
            where = f"{a.envelope_header}[{a.envelope_skip}]" if a.envelope_header else "To/Cc"
            return [postmaster], f"no envelope recipient in {where} (account {self.name})"
        local, unknown = [], []
        for addr in env.recipients:
            mapped = self.local_address(addr)
            (local if mapped else unknown).append(mapped or addr)
        rcpts = [self.route(r) for r in dict.fromkeys(local)]
        if unknown and env.source == "To/Cc guess" and rcpts:
            return rcpts, None  # outside addresses on To/Cc are expected when guessing
        if unknown:
            reason = f"no local user for {', '.join(unknown)} ({env.source}, account {self.name})"
            return rcpts + [postmaster], reason
        return rcpts, None

    # ------------------------------------------------------------ size policy

    def size_policy(self, client: IMAPClient, folder: str, uidvalidity: int, uids: list[int],
                    sizes: dict[int, int]) -> None:
        a = self.account
        kind = {"leave": LEFT, "defer": DEFERRED, "delete": DELETED_OVERSIZE}[a.oversize]
        self.result.oversize += len(uids)
        if kind == DEFERRED:
            self.result.deferred += len(uids)
        todo = [uid for uid in uids if not self.state.notice_sent(self.name, folder, uidvalidity, uid, kind)]
        removed = []
        for i in range(0, len(todo), SIZE_BATCH):
            part = todo[i:i + SIZE_BATCH]
            for uid, item in client.fetch(part, ["BODY.PEEK[HEADER]"]).items():
                self.check_stop()
                block = header_block(_item(item, b"BODY[HEADER]") or b"")
                self.notice(folder, uidvalidity, uid, sizes[uid], block, kind)
                if kind == DELETED_OVERSIZE:
                    removed.append(uid)
        if removed:
            self.delete(client, folder, removed)

    def notice(self, folder: str, uidvalidity: int, uid: int, size: int, block: bytes, kind: str) -> None:
        a = self.account
        rcpts, review = self.recipients(block)
        if review:
            rcpts = [self.route(self.config.server.postmaster)]
        limit = a.max_message_size or 0
        what = {
            LEFT: "It has been left on the ISP's server; ask the administrator to fetch it another way "
                  "or the sender to send a smaller message.",
            DEFERRED: f"It will be fetched during the off-peak window "
                      f"{_fmt_window(a.offpeak) if a.offpeak else ''} (local time).",
            DELETED_OVERSIZE: "It has been deleted from the ISP's server unread; ask the sender to send "
                              "it another way.",
        }[kind]
        host = self.config.server.hostname
        lines = [f"A message for you is larger than this office fetches over its link "
                 f"({size} bytes; the limit is {limit} bytes).", "", what, ""]
        for name in ("from", "subject", "date", "message-id"):
            value = first(block, name)
            if value:
                lines.append(f"  {name.title()}: {_one_line(value)}")
        lines += [f"  Size: {size} bytes", f"  Mailbox: {a.name} ({a.username}@{a.host}) {folder}", ""]
        subject = {LEFT: "Message too large, left at the ISP", DEFERRED: "Large message will be fetched off-peak",
                   DELETED_OVERSIZE: "Message too large, deleted at the ISP"}[kind]
        body = "\r\n".join(lines)
        head = (f"From: Mail Delivery System <MAILER-DAEMON@{host}>\r\n"
                f"To: {', '.join(r for r, _ in rcpts)}\r\n"
                f"Subject: {subject} ({size // 1000} kB)\r\n"
                f"Date: {formatdate(self.clock(), localtime=True)}\r\n"
                f"Message-ID: {make_msgid('fetch', domain=host)}\r\n"
                f"Auto-Submitted: auto-generated\r\nMIME-Version: 1.0\r\n"
                f"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n")
        now = self.clock()

        def in_txn(conn, qid):
            FetchState.record_notice(conn, self.name, folder, uidvalidity, uid, kind, now)
            if kind == DELETED_OVERSIZE:
                FetchState.record_taken(conn, self.name, folder, uid, size, None, True, None, now)

        self.queue.enqueue("", rcpts, (head + body).encode("utf-8", "surrogateescape"), origin=NOTICE_ORIGIN,
                           client=f"{self.name}:{folder}:{uid}", subject=subject, in_txn=in_txn)
        self.result.notices += 1
        log.info("fetch %s/%s uid %d: %s (%d bytes), notice to %s", self.name, folder, uid, kind, size,
                 ", ".join(r for r, _ in rcpts))


def _item(item: dict, prefix: bytes) -> bytes | None:
    """The literal of a FETCH item whose key starts with ``prefix`` (``BODY[]<0>`` for pieces)."""
    value = item.get(prefix)
    if value is not None:
        return value
    for key, value in item.items():
        if isinstance(key, bytes) and key.startswith(prefix):
            return value
    return None


def _write_durably(path, prefix: bytes, data: bytes | None, pieces) -> None:
    """Create ``path``, write prefix + data (or the pieces as they arrive), fsync; remove on failure."""
    write_file(path, chain([prefix], [data] if data is not None else pieces))


def _close(client: IMAPClient) -> None:
    try:
        client.logout()
    except Exception:
        try:
            client.shutdown()
        except Exception:
            pass


def _one_line(value: str) -> str:
    return " ".join(value.split())[:200]


def _text(exc: BaseException) -> str:
    text = str(exc)
    if text.startswith("b'") or text.startswith('b"'):
        text = text[2:-1]
    return text


async def fetch_all(config: Config, queue: Queue, catalogue: Catalogue, directory: Directory,
                    clock: Callable[[], float] = time.time,
                    progress: Callable[[FetchProgress], None] | None = None,
                    stop_event=None, accounts: list[str] | None = None) -> FetchResult:
    """Fetch every configured account (or those named in ``accounts``), one after another.

    ``progress`` runs on the event loop for each message spooled (and each piece of a
    large one).  ``stop_event`` (asyncio.Event or threading.Event) is looked at between
    messages; what is left waits for the next session.  Errors are per account and end up
    in the result, never raised: one broken account does not stop the others.
    """
    loop = asyncio.get_running_loop()
    state = await asyncio.to_thread(FetchState, catalogue)
    await asyncio.to_thread(state.prune, clock())
    report = None
    if progress is not None:
        def report(event: FetchProgress) -> None:
            loop.call_soon_threadsafe(progress, event)
    result = FetchResult()
    for account in config.fetch:
        if accounts is not None and account.name not in accounts:
            continue
        if stop_event is not None and stop_event.is_set():
            result.accounts.append(AccountResult(account.name, error=None))
            continue
        fetcher = AccountFetcher(config, account, queue, state, directory, clock, report, stop_event)
        result.accounts.append(await asyncio.to_thread(fetcher.run))
    return result
