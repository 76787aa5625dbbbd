"""Pulling mail out of the ISP's IMAP mailboxes into the spool (fetchmail's job, done safely).

This module is the IMAP conversation and the account loop; what to fetch is decided by
``plan``, who gets it by ``recipients``, large messages go to disk through ``partial``,
and every record of what was taken is made through ``spool.fetchstate``.

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
   ``<spool>/fetch-partial/`` so a cut line resumes there next session), then the enqueue
   whose transaction also records the UID, the copy's digest and the (recipient,
   Message-ID) pairs: the message is in the spool exactly when its UID is taken;
5. only then, with keep = false, ``\\Deleted`` + UID EXPUNGE (plain EXPUNGE at the end of
   the folder without UIDPLUS).  A cut anywhere leaves UIDs either untaken (fetched again
   next time, nothing was spooled) or taken and pending deletion (deleted next time).

imapclient is blocking: each account runs in a worker thread with socket timeouts, the
progress callback is handed back to the event loop, and ``stop_event`` is looked at
between messages and between the pieces of a large one.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from imapclient import IMAPClient, SocketTimeout
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError

from gateway.config import Config, FetchConfig
from gateway.fetch import plan
from gateway.fetch.compress import WireCount, count_only, deflate
from gateway.fetch.envelope import (
    first,
    header_block,
    message_digest,
    message_id,
    message_id_digest,
    return_path,
)
from gateway.fetch.notice import ORIGIN as NOTICE_ORIGIN
from gateway.fetch.notice import oversize_notice
from gateway.fetch.partial import Partials, move_into
from gateway.fetch.plan import DEFERRED, DELETED_OVERSIZE
from gateway.fetch.recipients import Recipients, review_header
from gateway.mail.errors import ConfigError
from gateway.oauth import tokens
from gateway.office.directory import Directory
from spool.fetchstate import (
    AccountLock,
    AlreadyFetching,
    Copy,
    FetchState,
    Noticing,
    Taking,
)
from spool.fsio import is_disk_full, write_file
from spool.queue import Catalogue, Queue

log = logging.getLogger("dialmail.fetch")

CONNECT_TIMEOUT = 30.0
# Per socket read, not per message: a 1 MB piece at 3 kB/s arrives in many reads.
READ_TIMEOUT = 120.0
SIZE_BATCH = 500      # UIDs per RFC822.SIZE / BODY[HEADER] round trip
DELETED = b"\\Deleted"

ORIGIN = "fetch"


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
    wire: WireCount = field(default_factory=WireCount)  # the IMAP bytes after login, as sent

    def summary(self) -> str:
        parts = [f"{self.fetched} fetched ({self.bytes} bytes)"]
        if self.wire.down:
            parts.append(f"{self.wire.down}/{self.wire.up} bytes down/up on the wire"
                         + (" compressed" if self.wire.compressed else ""))
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
    def wire_down(self) -> int:
        return sum(a.wire.down for a in self.accounts)

    @property
    def wire_up(self) -> int:
        return sum(a.wire.up for a in self.accounts)

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


class ProtocolViolation(Exception):
    """The ISP's server answered against the protocol or against its own word (a missing
    RFC822.SIZE, a literal larger than it announced): that account's error, never a crash
    of the fetch loop, and the connection is not used any further."""


LITERAL_MARGIN = 64 * 1024  # what a literal may exceed the size the server announced by


class LiteralGuard:
    """Refuses a literal larger than what dialmail asked for, before reading any of it.

    imaplib reads every literal into memory whole, trusting the ``{N}`` the server sends:
    a server that announced 120 bytes and then sent 700 MiB took 2.2 GB.  The guard sits
    where imaplib reads a literal; each request sets what it may receive.
    """

    def __init__(self, client: IMAPClient, default: int):
        self.default = default
        self.limit = default
        imap = client._imap  # imapclient's imaplib connection: literals are read through its read()
        self._read = imap.read

        self.tripped = False

        def read(size: int) -> bytes:
            if size > self.limit:
                self.tripped = True  # the stream is out of step: the connection is only closed now
                raise ProtocolViolation(f"the server announced a literal of {size} bytes where at most "
                                        f"{self.limit} were expected; not reading it")
            return self._read(size)
        imap.read = read

    def expect(self, size: int) -> "LiteralGuard":
        self.limit = size + LITERAL_MARGIN
        return self

    def __enter__(self) -> "LiteralGuard":
        return self

    def __exit__(self, *exc) -> None:
        self.limit = self.default


class _Stopped(Exception):
    """stop_event was set: leave the rest for the next session."""


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
        self.recipients = Recipients(config, account, directory)
        self.partials = Partials(config.spool_dir, account.name)
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
                    _close(client, polite=not self.guard.tripped)
        except _Stopped:
            self.result.error = None
        except AlreadyFetching as exc:
            self.result.error = str(exc)
        except LoginError as exc:
            self.result.error = f"login refused: {_text(exc)}"
        except tokens.TokenProblem as exc:
            self.result.error = str(exc)
            if isinstance(exc, tokens.TokenRefused):
                tokens.tell_postmaster_once(self.config, self.queue, self.account.oauth, str(exc))
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
        except ProtocolViolation as exc:
            log.error("fetch %s: the ISP's server broke the protocol: %s; this account waits for the next "
                      "session, the others go on", self.name, exc)
            self.result.error = f"the server broke the protocol: {exc}"
        except Exception as exc:  # noqa: BLE001 - whatever a server's answer breaks, the other accounts go on
            log.exception("fetch %s: stopped by an answer dialmail could not handle; the others go on", self.name)
            self.result.error = f"stopped by an unexpected answer ({type(exc).__name__}: {exc})"
        self.result.seconds = time.monotonic() - started
        log.info("fetch %s", self.result.summary())
        return self.result

    def connect(self) -> IMAPClient:
        a = self.account
        password = None
        if a.auth == "password":
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
        if password is not None:
            client.login(a.username, password)
        else:
            self.token_login(client)
        # Compression first: the literal guard then wraps the inflated reads.
        (deflate if a.compress == "auto" else count_only)(client, self.result.wire)
        self.uidplus = client.has_capability("UIDPLUS")
        limit = a.max_message_size or self.config.policy.max_message_size
        self.guard = LiteralGuard(client, max(limit, a.chunk_size) + LITERAL_MARGIN)
        return client

    def token_login(self, client: IMAPClient) -> None:
        """SASL XOAUTH2 or OAUTHBEARER with the account's access token.  A token the server
        refuses before its stated expiry (revoked early, clocks apart) is refreshed once."""
        a = self.account

        def login(token: str) -> None:
            if a.auth == "xoauth2":
                client.oauth2_login(a.username, token)
            else:
                client.oauthbearer_login(a.username, token)
        try:
            login(tokens.access_token(self.config, a.oauth, self.clock))
        except LoginError:
            login(tokens.access_token(self.config, a.oauth, self.clock, force=True))

    def check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise _Stopped()

    # ------------------------------------------------------------ one folder

    def folder(self, client: IMAPClient, folder: str) -> None:
        readonly = plan.opens_read_only(self.account)
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
            until = plan.kept_until(self.account, self.clock())
            if until is not None:
                self.state.mark_for_deletion(self.name, folder, self.state.older_than(self.name, folder, until))
            self.delete(client, folder, self.state.pending_deletion(self.name, folder))
        taken = self.state.taken(self.name, folder)
        # Mail someone deleted at the ISP (webmail) but not yet expunged is not fetched.
        undeleted = client.search(["UNDELETED"]) if on_server else []
        new = [uid for uid in undeleted if uid not in taken]
        self.uidvalidity = uidvalidity
        self.renumbered = renumbered
        self.partials.clean(folder, uidvalidity, set(new))
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
                size = item.get(b"RFC822.SIZE")
                if not isinstance(size, int) or size < 0:
                    raise ProtocolViolation(f"{folder}: no valid RFC822.SIZE for UID {uid} ({size!r})")
                sizes[uid] = size
        if renumbered:
            self.recognise(client, folder, sizes)
        decided = plan.plan_folder(a, sizes, self.clock(), self.result.fetched, self.result.bytes)
        if decided.oversize:
            self.size_policy(client, folder, uidvalidity, list(decided.oversize), sizes, decided.outcome)
        if decided.capped:
            self.capped = True
            self.result.deferred += decided.capped
        self.planned = (decided.messages, decided.bytes)
        try:
            for batch in plan.batches(decided.fetch, a.batch_size, a.chunk_size):
                if batch.in_pieces:
                    uid, size = batch.messages[0]
                    self.fetch_large(client, folder, uid, size)
                else:
                    self.fetch_batch(client, folder, list(batch.messages))
        except _Stopped:
            done = self.state.taken(self.name, folder)
            self.result.deferred += sum(1 for uid, _ in decided.fetch if uid not in done)
            raise

    def recognise(self, client: IMAPClient, folder: str, sizes: dict[int, int]) -> None:
        """After a UIDVALIDITY change: mark copies taken before, reading headers only."""
        uids = sorted(sizes)
        delete = not self.account.keep
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
            self.state.record_copies([Copy(self.name, folder, uid, sizes[uid], digests[uid], delete)
                                      for uid in again], self.clock())
            for uid in again:
                del sizes[uid]
            self.result.duplicates += len(again)
            if delete:
                self.delete(client, folder, again)

    # ------------------------------------------------------------ fetching

    def fetch_batch(self, client: IMAPClient, folder: str, batch: list[tuple[int, int]]) -> None:
        self.check_stop()
        with self.guard.expect(max(size for _, size in batch)):
            response = client.fetch([uid for uid, _ in batch], ["BODY.PEEK[]"])
        taken = []
        for uid, size in batch:
            data = _item(response.get(uid, {}), b"BODY[]")
            if data is None:
                continue  # expunged by someone else meanwhile
            if self.take(folder, uid, size, header_block(data),
                         lambda tmp, prefix, data=data: write_file(tmp, [prefix, data])):
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

        def read_piece(offset: int, length: int) -> bytes | None:
            self.check_stop()
            with self.guard.expect(length):
                return _item(client.fetch([uid], [f"BODY.PEEK[]<{offset}.{length}>"]).get(uid, {}), b"BODY[]")

        def on_piece(done_bytes: int) -> None:
            if self.report:
                self.report(self.progress(folder, uid, size, partial=True, done_bytes=done_bytes))

        def produce(tmp: Path, prefix: bytes) -> None:
            partial = self.partials.download(folder, self.uidvalidity, uid, size, self.account.chunk_size,
                                             read_piece, on_piece)
            move_into(partial, tmp, prefix)

        if self.take(folder, uid, size, block, produce) and not self.account.keep:
            self.delete(client, folder, [uid])

    def take(self, folder: str, uid: int, size: int, block: bytes, produce) -> bool:
        """Spool one copy and record its UID in the same transaction; True once the UID is taken.

        ``produce(tmp_path, prefix)`` writes the message file (fsynced); it is called only
        after the copy has been found new, so a copy taken before is never downloaded whole.
        """
        digest = message_digest(block, size)
        now = self.clock()
        copy = Copy(self.name, folder, uid, size, digest, delete=not self.account.keep)
        if plan.recognises_copies(self.account, self.renumbered) and self.state.known_copies(self.name, [digest]):
            log.info("fetch %s/%s uid %d: a copy taken before (same headers and size)", self.name, folder, uid)
            self.record_only(copy, now)
            return True
        routing = self.recipients.of(block)
        rcpts, review = list(routing.recipients), routing.review
        msgid = message_id(block)
        msgid_key = message_id_digest(msgid, block) if msgid and not review else None
        if msgid_key:
            already = self.state.delivered_to([r for r, _ in rcpts], msgid_key)
            rcpts = [(r, route) for r, route in rcpts if r not in already]
            if already:
                log.info("fetch %s/%s uid %d: %s already had %s; not delivered again", self.name, folder, uid,
                         ", ".join(sorted(already)), msgid)
            if not rcpts:
                self.record_only(copy, now)
                return True
        prefix = b""
        if review:
            prefix = review_header(review)
            log.warning("fetch %s/%s uid %d: to postmaster for review: %s", self.name, folder, uid, review)
        subject = first(block, "subject")
        taking = Taking(copy, now, tuple(r for r, _ in rcpts), msgid_key)
        qid = self.queue.enqueue_streamed(lambda tmp: produce(tmp, prefix), return_path(block), rcpts,
                                          origin=ORIGIN, client=f"{self.name}:{folder}:{uid}", message_id=msgid,
                                          subject=subject[:200] if subject else None, then=taking)
        if taking.had_it_all:
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

    def record_only(self, copy: Copy, now: float) -> None:
        """A copy taken before (other UID or other copy of the same message): mark it, spool nothing."""
        self.state.record_copies([copy], now)
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

    # ------------------------------------------------------------ size policy

    def size_policy(self, client: IMAPClient, folder: str, uidvalidity: int, uids: list[int],
                    sizes: dict[int, int], kind: str) -> None:
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
        rcpts = self.recipients.of_notice(block)
        notice = oversize_notice(self.account, folder, size, block, kind, [r for r, _ in rcpts],
                                 self.config.server.hostname, self.clock())
        now = self.clock()
        # A copy deleted unread is as good as taken: pending deletion until the EXPUNGE.
        taken = Copy(self.name, folder, uid, size, None, delete=True) if kind == DELETED_OVERSIZE else None
        self.queue.enqueue("", rcpts, notice.data, origin=NOTICE_ORIGIN, client=f"{self.name}:{folder}:{uid}",
                           subject=notice.subject, then=Noticing(self.name, folder, uidvalidity, uid, kind, now,
                                                                   taken))
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


def _close(client: IMAPClient, polite: bool = True) -> None:
    try:
        if not polite:  # no LOGOUT into a stream that is still sending what was refused
            raise ConnectionAbortedError
        client.logout()
    except Exception:
        try:
            client.shutdown()
        except Exception:
            pass


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
