"""Flushing the outbound queue while the link is up.

``flush`` opens ONE SMTP connection to the smarthost (EHLO with our hostname, STARTTLS
per ``[smarthost] starttls`` with certificate verification, AUTH) and sends every due
``relay`` recipient over it, message after message:

    MAIL FROM (rewritten sender, SIZE, BODY=8BITMIME, SMTPUTF8 as needed; 8-bit parts
               converted for a smarthost without 8BITMIME: gateway.relay.downgrade)
    RCPT TO for each recipient not yet final   -- each refusal is that recipient's outcome
    DATA                                       -- its reply is the accepted ones' outcome
    RSET after any refusal, so the next message starts clean

Each message's outcomes are stored (and the message settled: bounce, removal) before the
next message starts, so a drop loses at most the message in flight, whose waiting
recipients are deferred.  A recipient the server accepted is final and never sent again;
one in flight when the line dropped after the final "." may be sent twice (RFC 1047,
unavoidable in SMTP).  On a lost connection, timeout or carrier drop (``stop_event``)
the flush stops and returns: the dial session decides whether to try again, and the
message in flight is due again at once (``outcome.next_retry``).  When no connection
could be made at all (refused, TLS or AUTH failure) every recipient shows the reason in
the queue but counts no attempt: the office's line or setup says nothing about the mail.

Asked to stop (``finish_event``: an interrupt, the session's max_time) the flush finishes
the message in flight and takes no other; over several connections only the one that
started first is finished, the others are abandoned before their final dot (no attempt,
due at once), so the line carries one message to its end instead of sharing itself
between several until the session's grace runs out.  Each message is read again just before it is
sent, so one held or deleted meanwhile stays back; one whose file is gone is deferred with
that reason.  No message goes out while the spool lacks the room to record what the server
says about it: a full disk stops the flush instead of sending mail twice.

Recipients are claimed in the spool first, so a ``dialmail queue flush`` and a session in
the daemon never send the same recipient at the same time; the claims go when the flush
ends, however it ends, and those of a flush that died are freed by the next one.
"""
from __future__ import annotations

import asyncio
import base64
import errno
import logging
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field

import aiosmtplib

from gateway.config import Config
from gateway.mail import headers, outcome
from gateway.mail.outcome import Outcome
from gateway.oauth import tokens
from gateway.oauth.tokens import TokenProblem
from gateway.office import bounce
from gateway.relay import downgrade, fold, mx
from gateway.relay.expiry import expire
from gateway.relay.rewrite import SenderRewriter
from spool.fsio import free_bytes, is_disk_full
from spool.queue import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    FINAL,
    RELAY,
    DamagedBody,
    Message,
    Queue,
    Recipient,
)
from spool.smarthosts import SmarthostMemory

log = logging.getLogger("dialmail.relay")

FOREVER = 1e18  # "due" horizon for a forced flush: every waiting recipient


@dataclass(frozen=True)
class SendProgress:
    """Passed to ``progress`` after each message the server took (for the session's live view)."""
    qid: str
    size: int  # bytes of this message
    total: int  # bytes the server accepted so far in this flush
    seconds: float  # since the flush began sending
    messages: int  # messages sent so far in this flush
    remaining: int  # messages still to go in this flush


Progress = Callable[[SendProgress], None]


@dataclass(frozen=True)
class RecipientResult:
    qid: str
    rcpt: str
    outcome: Outcome


@dataclass
class FlushResult:
    sent: int = 0  # recipients accepted by the server
    deferred: int = 0  # recipients to be tried again
    bounced: int = 0  # recipients failed for good (bounce queued)
    bytes: int = 0  # message bytes the server accepted
    messages: int = 0  # messages the server accepted (at least one recipient)
    results: list[RecipientResult] = field(default_factory=list)
    error: Outcome | None = None  # what ended the flush early (connection, TLS, AUTH, drop)
    local_notices: int = 0  # bounces/warnings queued for local delivery
    expired: int = 0  # messages expired before sending


class _Stop(Exception):
    """The flush cannot go on (the connection is gone, or the server refuses this office as a
    client): record what is in flight and end the flush."""

    def __init__(self, why: Outcome):
        super().__init__(why.reply)
        self.why = why


class _Abandoned(_Stop):
    """Asked to stop while another connection's message goes first: this message was left
    before its final dot, so the server has not taken it; no attempt, due at once."""


@dataclass
class _Job:
    """One message and the recipients this flush is to send it to."""
    qid: str
    rcpts: list[str]


async def flush(config: Config, queue: Queue, clock: Callable[[], float] = time.time,
                progress: Progress | None = None, stop_event: asyncio.Event | None = None, *,
                finish_event: asyncio.Event | None = None,
                force: bool = False, on_local_mail: Callable[[], None] | None = None,
                lookup: mx.Lookup | None = None, mx_port: int = mx.SMTP_PORT,
                result: FlushResult | None = None) -> FlushResult:
    """Send every due relay recipient; see the module doc.  ``force`` ignores back-off.

    ``stop_event``: the link is gone, abandon the message in flight.  ``finish_event``:
    asked to stop (an interrupt, max_time), so finish the message in flight, whose
    abandoning after the final dot would send it twice, and take no other.  ``result``
    is filled as the flush goes, so a caller cut off meanwhile still has the figures.
    """
    result = FlushResult() if result is None else result
    now = clock()
    ctx = _Context(config, queue, clock, progress, stop_event, result, finish_event)
    owner = queue.new_claimant(RELAY)
    try:
        try:
            expired = await asyncio.to_thread(expire, config, queue, now)
            result.expired = len(expired.bounced)
            result.local_notices += expired.local_notices
            await asyncio.to_thread(_release_dead_claims, queue)
            # No back-off exceeds retry_max: a retry time further ahead predates a step back of the clock.
            pairs = await asyncio.to_thread(queue.claim, RELAY, owner, 1_000_000, FOREVER if force else now,
                                            now + config.queue.retry_max)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            raise _Stop(outcome.spool_full("before sending")) from None
        jobs: dict[str, _Job] = {}
        for qid, rcpt in pairs:
            jobs.setdefault(qid, _Job(qid, [])).rcpts.append(rcpt)
        if jobs:
            ctx.remaining = len(jobs)
            if config.smarthost.route == "mx":
                await _flush_mx(ctx, list(jobs.values()), lookup or mx.dns_lookup, mx_port)
            else:
                await _flush_smarthost(ctx, list(jobs.values()))
    except _Stop as stop:  # the spool's disk is full: nothing more can be recorded
        result.error = stop.why
    finally:
        try:
            await _unless_disk_full(ctx.record_late(), "what the server took but could not be recorded "
                                    "will be sent again")
        finally:
            # Also when the flush is cancelled or fails: no recipient may stay claimed.
            await _unless_disk_full(asyncio.to_thread(queue.retire_claimant, owner),
                                    "a later flush or delivery pass releases the recipients this one claimed")
        if result.local_notices and on_local_mail is not None:
            on_local_mail()
    log.info("flush: %d delivered, %d deferred, %d bounced, %d messages, %d bytes%s", result.sent,
             result.deferred, result.bounced, result.messages, result.bytes,
             f"; stopped: {result.error.reply}" if result.error else "")
    return result


async def _unless_disk_full(step: Awaitable, then: str) -> None:
    """Run a closing step of the flush; a full disk is said in the log, not raised over
    the flush's own outcome."""
    try:
        await step
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        log.warning("flush: the spool's disk is full; %s", then)


def _release_dead_claims(queue: Queue) -> None:
    """Free recipients claimed by a worker that is gone (a ``queue flush`` killed with -9
    while the daemon runs on, a flush whose release met a full disk): without this they
    would wait for the next daemon start."""
    for owner in queue.release_dead_claims():
        log.warning("released recipients claimed by a worker that is gone (%s)", owner)


class _Context:
    def __init__(self, config, queue, clock, progress, stop_event, result, finish_event=None):
        self.config: Config = config
        self.queue: Queue = queue
        self.clock = clock
        self.progress = progress
        self.stop_event = stop_event
        self.finish_event = finish_event
        self.result: FlushResult = result
        self.rewriter = SenderRewriter(config.smarthost.rewrite)
        self.started = time.monotonic()
        self.remaining = 0
        # Outcomes the server gave that a full disk kept from being recorded: tried again
        # as the flush ends, so the mail the server took is not sent a second time.
        self.unrecorded: list[tuple[str, dict[str, Outcome], bool]] = []

    def stopped(self) -> bool:
        return any(e is not None and e.is_set() for e in (self.stop_event, self.finish_event))

    def link_gone(self) -> bool:
        return self.stop_event is not None and self.stop_event.is_set()

    def why_stopped(self) -> Outcome:
        if self.link_gone():
            return outcome.lost_connection("(link went down)")
        return outcome.stopped_early()

    async def record(self, qid: str, outcomes: dict[str, Outcome], unsent: bool = False) -> None:
        """Store one message's outcomes in one transaction, then settle the message.

        ``unsent``: the connection never got as far as this message (no server, TLS or
        AUTH refused): the reason is shown in the queue, but it is no attempt and the
        message stays due for the next session.
        """
        try:
            settled = await asyncio.to_thread(self._record, qid, outcomes, unsent)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            self.unrecorded.append((qid, outcomes, unsent))
            raise _Stop(outcome.spool_full(f"recording the outcome of {qid}")) from None
        self._count(qid, outcomes, settled)

    async def record_late(self) -> None:
        """Record what a full disk refused earlier in this flush, if there is room now."""
        while self.unrecorded:
            qid, outcomes, unsent = self.unrecorded[0]
            settled = await asyncio.to_thread(self._record, qid, outcomes, unsent)
            self.unrecorded.pop(0)
            self._count(qid, outcomes, settled)

    def _count(self, qid: str, outcomes: dict[str, Outcome], settled: bounce.Settled) -> None:
        for rcpt, o in outcomes.items():
            self.result.results.append(RecipientResult(qid, rcpt, o))
            if o.status == DELIVERED:
                self.result.sent += 1
            elif o.status == BOUNCED:
                self.result.bounced += 1
            else:
                self.result.deferred += 1
            log.info("%s: to=<%s> relay=%s status=%s (%s)", qid, rcpt, self.config.smarthost.host,
                     o.status, o.said)
        self.result.local_notices += settled.local

    def _record(self, qid: str, outcomes: dict[str, Outcome], unsent: bool) -> bounce.Settled:
        q, cfg = self.queue, self.config.queue
        now = self.clock()

        def retry_at(before: Recipient, o: Outcome) -> float | None:
            if o.status != DEFERRED or unsent:
                return None
            return outcome.next_retry(o, before.last_reply, before.attempts, now, cfg.retry_min, cfg.retry_max)

        # The common case (all delivered) leaves the queue in the commit that records it;
        # anything to report goes to ``settle``.
        if q.record_outcomes(qid, outcomes, count_attempt=not unsent, retry_at=retry_at, remove_settled=True):
            return bounce.Settled(removed=True)
        try:
            return bounce.settle(self.config, q, qid, now=now)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            # The outcomes are stored; the bounce and removal wait for room (local
            # delivery settles messages left with every recipient final).
            log.warning("%s: outcome recorded; settling it waits for room on the spool's disk", qid)
            return bounce.Settled()

    async def record_all(self, jobs: list[_Job], why: Outcome, unsent: bool = False) -> None:
        """The same outcome for every recipient of ``jobs`` (no connection, no route)."""
        for job in jobs:
            await self.record(job.qid, {r: why for r in job.rcpts}, unsent)


# ---------------------------------------------------------------- one SMTP connection


@dataclass(frozen=True)
class Peer:
    host: str
    port: int
    starttls: str  # required | opportunistic | off
    verify: bool
    ca_file: str | None
    username: str | None = None
    password: str | None = None
    auth: str = "password"  # password | xoauth2 | oauthbearer
    # An access token for the login (``True``: refresh it, the server refused the last one).
    token: Callable[[bool], Awaitable[str]] | None = field(default=None, compare=False)


class Connection:
    """One SMTP session with a server: connect, TLS, AUTH, then message after message."""

    def __init__(self, peer: Peer, helo: str, timeout: float):
        self.peer = peer
        self.helo = helo
        self.timeout = timeout
        self.abandon = asyncio.Event()  # leave the message in flight (another one finishes first)
        self.smtp: aiosmtplib.SMTP | None = None

    def _tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if self.peer.ca_file:
            ctx.load_verify_locations(cafile=self.peer.ca_file)  # in addition to the system's CAs
        if not self.peer.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def open(self) -> None:
        """Connect and get ready to send; raises ``_Stop`` with the reason on failure."""
        p = self.peer
        smtp = aiosmtplib.SMTP(hostname=p.host, port=p.port, local_hostname=self.helo, timeout=self.timeout,
                               start_tls=False)
        where = f"{p.host}:{p.port}"
        try:
            await smtp.connect()
            await smtp.ehlo()
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            raise _Stop(_deferral(outcome.from_reply(exc.code, exc.message))) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            raise _Stop(outcome.cannot_connect(f"{where}: {_connect_why(exc)}")) from None
        if p.starttls != "off":
            if smtp.supports_extension("starttls"):
                try:
                    await smtp.starttls(tls_context=self._tls_context(), server_hostname=p.host)
                    await smtp.ehlo()
                except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
                    smtp.close()
                    raise _Stop(outcome.tls_failed(f"{where}: {_why(exc)}")) from None
            elif p.starttls == "required":
                await _quit(smtp)
                raise _Stop(outcome.tls_required_not_offered(where))
        if p.username:
            try:
                if p.token is not None:
                    await _token_login(smtp, p)
                else:
                    await smtp.login(p.username, p.password or "")
            except TokenProblem as exc:
                await _quit(smtp)
                raise _Stop(outcome.auth_failed(0, str(exc))) from None
            except aiosmtplib.SMTPAuthenticationError as exc:
                await _quit(smtp)
                raise _Stop(outcome.auth_failed(exc.code, exc.message)) from None
            except aiosmtplib.SMTPException as exc:
                await _quit(smtp)
                raise _Stop(outcome.auth_failed(0, _why(exc))) from None
        self.smtp = smtp

    async def close(self, polite: bool = True, reset: bool = False) -> None:
        """QUIT and close; without ``polite`` (the link is gone) just close the socket.

        ``reset``: a message was left mid-DATA.  aiosmtplib wrote all of it, final dot
        included, at once, and most of it still waits in our buffers: a reset (zero
        linger, abort) throws that away, so the server never sees the dot and takes
        nothing, where a plain close would still send every byte.
        """
        if self.smtp is not None:
            if reset:
                transport = self.smtp.transport
                sock = transport.get_extra_info("socket") if transport is not None else None
                if sock is not None:
                    with suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                if transport is not None:
                    transport.abort()
            elif polite:
                await _quit(self.smtp)
            self.smtp.close()
            self.smtp = None

    @property
    def alive(self) -> bool:
        return self.smtp is not None and self.smtp.is_connected

    @property
    def size_limit(self) -> int:
        try:
            return int((self.smtp.esmtp_extensions.get("size") or "0").split()[0])
        except (ValueError, IndexError):
            return 0

    async def send(self, sender: str, rcpts: list[str], data: bytes, utf8: bool,
                   outcomes: dict[str, Outcome]) -> bool:
        """One transaction; fills ``outcomes`` as replies arrive.  True if DATA was accepted.

        Raises ``_Stop`` when the connection is gone (recipients without an outcome
        are then the caller's to defer).
        """
        smtp = self.smtp
        where = f"{self.peer.host}:{self.peer.port}"
        opts = []
        if smtp.supports_extension("size"):
            opts.append(f"SIZE={len(data)}")
        if smtp.supports_extension("8bitmime") and not data.isascii():
            opts.append("BODY=8BITMIME")
        if utf8:
            opts.append("SMTPUTF8")
        enc = "utf-8" if utf8 else "ascii"
        stage = "after MAIL FROM"
        try:
            try:
                await smtp.mail(sender, options=opts, encoding=enc)
            except aiosmtplib.SMTPSenderRefused as exc:
                o = outcome.from_reply(exc.code, exc.message)
                if outcome.refuses_client(o, outcome.MAIL_STAGE):
                    await self._reset()
                    raise _Stop(outcome.client_refused(o, where)) from None
                outcomes.update({r: o for r in rcpts})
                await self._reset()
                return False
            accepted = []
            stage = "after RCPT TO"
            for rcpt in rcpts:
                try:
                    await smtp.rcpt(rcpt, encoding=enc)
                    accepted.append(rcpt)
                except aiosmtplib.SMTPRecipientRefused as exc:
                    o = outcome.from_reply(exc.code, exc.message)
                    if not smtp.is_connected:
                        outcomes[rcpt] = o
                        raise _Stop(outcome.lost_connection(f"{where} {stage} ({exc.code} {exc.message})"))
                    if outcome.refuses_client(o, outcome.RCPT_STAGE):
                        # Every recipient of every message would meet it: stop the flush,
                        # keep them all queued, and say why.
                        await self._reset()
                        raise _Stop(outcome.client_refused(o, where))
                    outcomes[rcpt] = o
            if not accepted:
                await self._reset()
                return False
            stage = "while sending message body"
            try:
                reply = await smtp.data(data)
            except aiosmtplib.SMTPDataError as exc:
                o = outcome.from_reply(exc.code, exc.message)
                outcomes.update({r: o for r in accepted})
                if o.status != DELIVERED:
                    await self._reset()
                return False
            o = outcome.from_reply(reply.code, reply.message)
            outcomes.update({r: o for r in accepted})
            return True
        except aiosmtplib.SMTPTimeoutError:
            raise _Stop(outcome.timed_out(f"talking to {where} {stage}")) from None
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError, OSError) as exc:
            raise _Stop(outcome.lost_connection(f"{where} {stage}: {_why(exc)}")) from None

    async def _reset(self) -> None:
        if self.smtp.is_connected:
            try:
                await self.smtp.rset()
            except aiosmtplib.SMTPResponseException:
                pass


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    with suppress(Exception):
        if smtp.is_connected:
            await smtp.quit(timeout=10)
    smtp.close()


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _connect_why(exc: BaseException) -> str:
    """Why no connection could be made, in plain words where the cause is a known one."""
    cause = exc.__cause__ or exc  # aiosmtplib wraps the socket's error
    if isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED:
        return "connection refused (nothing listens there, or a firewall refuses it)"
    if isinstance(exc, aiosmtplib.SMTPConnectTimeoutError) or isinstance(cause, TimeoutError):
        return "no answer (connection timed out)"
    return _why(exc)


async def _token_login(smtp: aiosmtplib.SMTP, p: Peer) -> None:
    """AUTH XOAUTH2 (aiosmtplib's) or OAUTHBEARER (RFC 7628, which aiosmtplib lacks); a token
    the server refuses before its stated expiry is refreshed once and tried again."""
    async def login(token: str) -> None:
        if p.auth == "xoauth2":
            await smtp.auth_xoauth2(p.username, token)
            return
        initial = base64.b64encode(f"n,a={p.username},\x01auth=Bearer {token}\x01\x01".encode())
        reply = await smtp.execute_command(b"AUTH", b"OAUTHBEARER", initial)
        if reply.code == 334:  # the error as a JSON challenge: a lone ^A ends the exchange
            reply = await smtp.execute_command(base64.b64encode(b"\x01"))
        if reply.code != 235:
            raise aiosmtplib.SMTPAuthenticationError(reply.code, reply.message)
    try:
        await login(await p.token(False))
    except aiosmtplib.SMTPAuthenticationError:
        await login(await p.token(True))


def _deferral(o: Outcome) -> Outcome:
    """A refusal of the whole connection (greeting, EHLO) defers: it is about us, not a recipient."""
    if o.status == DEFERRED:
        return o
    return Outcome(DEFERRED, o.code, "4" + o.dsn[1:], o.reason)


# ---------------------------------------------------------------- the message loop


async def _flush_smarthost(ctx: _Context, jobs: list[_Job]) -> None:
    sh = ctx.config.smarthost
    if not sh.host:
        ctx.result.error = outcome.cannot_connect("no [smarthost] host configured")
        await ctx.record_all(jobs, ctx.result.error, unsent=True)
        return
    token = None
    if sh.oauth is not None:
        async def token(force: bool) -> str:
            try:
                return await asyncio.to_thread(tokens.access_token, ctx.config, sh.oauth, ctx.clock, force)
            except tokens.TokenRefused as exc:
                await asyncio.to_thread(tokens.tell_postmaster_once, ctx.config, ctx.queue, sh.oauth, str(exc))
                raise
    peer = Peer(sh.host, sh.port, sh.starttls, verify=True, ca_file=str(sh.ca_file) if sh.ca_file else None,
                username=sh.username, password=sh.password() if sh.username and token is None else None,
                auth=sh.auth, token=token)
    await _over_connection(ctx, peer, jobs)


async def _over_connection(ctx: _Context, peer: Peer, jobs: list[_Job]) -> bool:
    """Send ``jobs`` to ``peer`` over ``[smarthost] connections`` connections, each taking
    the next waiting message; False if not even the first connection could be made.

    Every message waits for the server's replies to MAIL, RCPT, DATA and the final dot
    (about four round trips); with a second connection the line carries that one's
    message meanwhile instead of idling.  Each connection still settles its message in
    the spool before it takes the next, so a drop leaves at most one message in flight
    per connection.
    """
    conn = Connection(peer, ctx.config.server.hostname, ctx.config.smarthost.timeout)
    try:
        await _abortable(ctx, conn.open())
    except _Stop as stop:
        ctx.result.error = stop.why
        await ctx.record_all(jobs, stop.why, unsent=True)
        return False
    # what it offers now, so SMTP can refuse at RCPT what it cannot carry (spool.smarthosts)
    await asyncio.to_thread(_remember_ehlo, ctx.queue, f"{peer.host}:{peer.port}",
                            list(conn.smtp.esmtp_extensions))
    waiting = deque(jobs)
    halted: list[Outcome] = []
    in_flight: dict[Connection, float] = {}  # when each connection's current message started

    async def send_over(conn: Connection) -> None:
        abandoned = False
        try:
            while waiting and not halted:
                if ctx.stopped():
                    ctx.result.error = ctx.why_stopped()
                    break
                if not conn.alive:  # the server said 421 and hung up: the rest waits, untouched
                    ctx.result.error = outcome.lost_connection(f"{peer.host}:{peer.port} (the server closed it)")
                    break
                in_flight[conn] = time.monotonic()
                try:
                    await _send_job(ctx, conn, waiting.popleft())
                except _Stop as stop:
                    abandoned = isinstance(stop, _Abandoned)
                    ctx.result.error = stop.why
                    halted.append(stop.why)
                    break
                finally:
                    in_flight.pop(conn, None)
        finally:
            # An abandoned message stopped mid-DATA: a QUIT now would be read as its text.
            await conn.close(polite=not ctx.link_gone(), reset=abandoned)

    async def finish_one() -> None:
        """Asked to stop: the message that started first goes on, the others are left."""
        await ctx.finish_event.wait()
        first = min(in_flight, key=in_flight.__getitem__, default=None)
        for other in list(in_flight):
            if other is not first:
                other.abandon.set()

    async def open_and_send() -> None:
        extra = Connection(peer, ctx.config.server.hostname, ctx.config.smarthost.timeout)
        try:
            await _abortable(ctx, extra.open())
        except _Stop as stop:  # e.g. the server's per-client limit: the first one carries on alone
            log.info("relay: no extra connection to %s:%d: %s", peer.host, peer.port, stop.why.reply)
            return
        await send_over(extra)

    extras = min(ctx.config.smarthost.connections, len(jobs)) - 1
    finishing = None
    async with asyncio.TaskGroup() as group:
        senders = [group.create_task(send_over(conn))]
        for _ in range(extras):
            senders.append(group.create_task(open_and_send()))
        if extras and ctx.finish_event is not None:
            finishing = asyncio.ensure_future(finish_one())
        try:
            await asyncio.gather(*senders, return_exceptions=True)
        finally:
            if finishing is not None:
                finishing.cancel()
    return True


def _remember_ehlo(queue: Queue, server: str, keywords: list[str]) -> None:
    SmarthostMemory.beside(queue).remember(server, keywords)


async def _abortable(ctx: _Context, coro: Awaitable, abandon: asyncio.Event | None = None):
    """Await ``coro`` unless the link goes down first (``stop_event``): then ``_Stop``; or
    unless ``abandon`` is set first: then ``_Abandoned``."""
    if ctx.stop_event is None and abandon is None:
        return await coro
    task = asyncio.ensure_future(coro)
    stoppers = [asyncio.ensure_future(e.wait()) for e in (ctx.stop_event, abandon) if e is not None]
    try:
        await asyncio.wait({task, *stoppers}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        # Cancelled from outside: the transfer must not go on as an orphan and finish a
        # message whose reply nobody would record.
        task.cancel()
        raise
    finally:
        for stopper in stoppers:
            stopper.cancel()
    if not task.done():
        task.cancel()
        with suppress(asyncio.CancelledError, Exception):
            await task
        if ctx.link_gone():
            raise _Stop(outcome.lost_connection("(link went down)"))
        raise _Abandoned(outcome.stopped_early())
    return task.result()


def _load(queue: Queue, qid: str) -> tuple[Message | None, bytes | None]:
    """The message as it is now (None: deleted meanwhile, or held by the spool because its
    body was damaged) and its body (None: the file is gone)."""
    msg = queue.get(qid)
    if msg is None:
        return None, None
    try:
        with queue.open_body(qid) as f:
            return msg, f.read()
    except DamagedBody:
        return None, None  # held by the spool, which logged why
    except FileNotFoundError:
        return msg, None


# Free space the spool must have before another message goes out: what the server says
# about it has to be recorded, or it would be sent again.  A few pages of the catalogue's
# log suffice; this leaves a wide margin.
ROOM_TO_RECORD = 1_000_000


def _room_to_record(queue: Queue) -> bool:
    return free_bytes(queue.dir) >= ROOM_TO_RECORD


def _utf8_headers(msg: Message, data: bytes) -> bool:
    """Non-ASCII in the header block of a message that came in with SMTPUTF8."""
    if not msg.smtputf8:
        return False
    return not headers.split(data)[0].isascii()


async def _send_job(ctx: _Context, conn: Connection, job: _Job) -> None:
    ctx.remaining -= 1
    if not await asyncio.to_thread(_room_to_record, ctx.queue):
        raise _Stop(outcome.spool_full(f"less than {ROOM_TO_RECORD} bytes free"))
    # Read again just before sending: the administrator may have held, deleted or bounced
    # it since the flush claimed it.
    msg, data = await asyncio.to_thread(_load, ctx.queue, job.qid)
    if msg is None:
        log.info("%s: deleted from the queue before it was sent", job.qid)
        return
    if msg.hold:
        log.info("%s: held by the administrator; not sent", job.qid)
        return
    by_rcpt = {r.rcpt: r for r in msg.recipients}
    rcpts = [r for r in job.rcpts if r in by_rcpt and by_rcpt[r].status not in FINAL]
    if not rcpts:
        return
    if data is None:
        missing = outcome.body_missing(job.qid)
        log.error("%s: not sent: %s", job.qid, missing.reply)
        await ctx.record(job.qid, {r: missing for r in rcpts})
        return
    sender = ctx.rewriter.address(msg.sender)
    data = ctx.rewriter.message(data)
    outcomes: dict[str, Outcome] = {}
    where = f"{conn.peer.host}:{conn.peer.port}"
    utf8 = not sender.isascii() or _utf8_headers(msg, data) or any(not r.isascii() for r in rcpts)
    if utf8 and not conn.smtp.supports_extension("smtputf8"):
        # Only what truly needs SMTPUTF8 fails: ASCII recipients of an ASCII message still go.
        whole = not sender.isascii() or _utf8_headers(msg, data)
        failed = [r for r in rcpts if whole or not r.isascii()]
        outcomes.update({r: outcome.smtputf8_not_offered(where) for r in failed})
        rcpts = [r for r in rcpts if r not in outcomes]
        utf8 = False
        if not rcpts:
            await ctx.record(job.qid, outcomes)
            return
    if not data.isascii() and not conn.smtp.supports_extension("8bitmime"):
        # never 8-bit to a 7-bit hop (RFC 6152 §3): convert, or keep it with the reason
        try:
            data = await asyncio.to_thread(downgrade.to_7bit, data)
        except downgrade.CannotDowngrade as exc:
            outcomes.update({r: outcome.not_convertible_to_7bit(where, str(exc)) for r in rcpts})
            await ctx.record(job.qid, outcomes)
            return
    # Submission takes lines over 1,000 octets; the smarthost gets them folded.
    data = fold.long_lines(data)
    limit = conn.size_limit
    if limit and len(data) > limit:
        outcomes.update({r: outcome.too_big(len(data), limit) for r in rcpts})
        await ctx.record(job.qid, outcomes)
        return
    try:
        accepted = await _abortable(ctx, conn.send(sender, rcpts, data, utf8, outcomes), conn.abandon)
    except _Stop as stop:
        for r in rcpts:
            outcomes.setdefault(r, stop.why)
        await ctx.record(job.qid, outcomes, unsent=isinstance(stop, _Abandoned))
        raise
    await ctx.record(job.qid, outcomes)
    if accepted:
        ctx.result.messages += 1
        ctx.result.bytes += len(data)
        if ctx.progress is not None:
            ctx.progress(SendProgress(job.qid, len(data), ctx.result.bytes, time.monotonic() - ctx.started,
                                      ctx.result.messages, ctx.remaining))


# ---------------------------------------------------------------- direct MX delivery


async def _flush_mx(ctx: _Context, jobs: list[_Job], lookup: mx.Lookup, port: int) -> None:
    """One connection per destination domain, to the best MX host that answers."""
    by_domain: dict[str, list[_Job]] = {}
    for job in jobs:
        for rcpt in job.rcpts:
            domain = rcpt.rpartition("@")[2].lower()
            group = by_domain.setdefault(domain, [])
            if group and group[-1].qid == job.qid:
                group[-1].rcpts.append(rcpt)
            else:
                group.append(_Job(job.qid, [rcpt]))
    ctx.remaining = sum(len(group) for group in by_domain.values())
    sh = ctx.config.smarthost
    for domain, domain_jobs in by_domain.items():
        if ctx.stopped():
            ctx.result.error = ctx.why_stopped()
            return
        route = await mx.plan(domain, lookup)
        if route.failure is not None:
            await ctx.record_all(domain_jobs, route.failure)
            continue
        # Opportunistic, unverified TLS towards MX hosts (what Postfix calls "may"), unless
        # the admin requires TLS: then it is verified as for the smarthost.
        required = sh.starttls == "required"
        ca = str(sh.ca_file) if sh.ca_file else None
        for host in route.hosts:
            peer = Peer(host, port, "required" if required else "opportunistic", verify=required, ca_file=ca)
            saved_error = ctx.result.error
            conn = Connection(peer, ctx.config.server.hostname, sh.timeout)
            try:
                await _abortable(ctx, conn.open())
            except _Stop as stop:
                ctx.result.error = stop.why
                if host == route.hosts[-1]:
                    await ctx.record_all(domain_jobs, stop.why, unsent=True)
                continue
            ctx.result.error = saved_error
            try:
                for job in domain_jobs:
                    if not conn.alive:
                        break
                    if ctx.stopped():
                        ctx.result.error = ctx.why_stopped()
                        break
                    await _send_job(ctx, conn, job)
            except _Stop as stop:
                ctx.result.error = stop.why
            finally:
                await conn.close(polite=not ctx.link_gone())
            break
