"""SMTP submission from the LAN: aiosmtpd in the daemon's own loop, policy as handler hooks.

Relay rules (what keeps this from being an open relay):
  * a recipient in a local domain is accepted if somebody here has that address,
    else ``550 5.1.1``;
  * any other recipient only from ``[server] mynetworks`` or after AUTH, else
    ``554 5.7.1 relay access denied``.
AUTH is offered only under TLS, except to loopback clients; failed AUTH attempts are
answered slowly and then locked out per client address (``[smtp] max_auth_failures``).

Port 587 (``[submission]``, RFC 6409) is the same server with the rules mail clients
expect there: nothing but EHLO, NOOP and QUIT before STARTTLS (loopback included), and no
MAIL before AUTH.  It shares port 25's handler, so the users, the lockouts (a guesser
gains nothing by switching ports) and every limit are the same.

A message is answered 250 only after ``spool.queue`` has it on disk (see its order of
operations); a spool write failure answers 452 and keeps nothing.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import logging
import re
import ssl
import time
from dataclasses import dataclass
from typing import Callable

from aiosmtpd.smtp import MISSING, AuthResult, Envelope, Session, _AuthMechAttr, syntax
from aiosmtpd.smtp import SMTP as SMTPProtocol

from gateway.config import Config, is_loopback
from gateway.mail import address
from gateway.mail.errors import ConfigError
from gateway.office.directory import Directory
from gateway.policy.connections import Admission, Listener
from gateway.policy.throttle import LoginThrottle
from gateway.smtp import received
from gateway.smtp.incoming import IncomingBody
from gateway.smtp.received import Received
from gateway.smtp.replies import Reply, with_status_code
from spool.fsio import free_bytes, is_disk_full
from spool.queue import LOCAL, RELAY, Arrival, Queue
from spool.smarthosts import SmarthostMemory
from spool.users import Users
from spool.writer import QueueWriter

log = logging.getLogger("dialmail.submit")

# Commands that move no mail forward (Postfix's smtpd_junk_command_limit): past this many
# since the last message a client is told 421 and disconnected, so a NOOP every few
# minutes cannot hold a connection slot for ever.
JUNK_COMMAND_LIMIT = 100

# aiosmtpd logs every client line at INFO, AUTH exchanges included: keep it quiet.
logging.getLogger("mail.log").setLevel(logging.WARNING)


def peer_is_loopback(peer) -> bool:
    return is_loopback(peer[0] if isinstance(peer, tuple) else str(peer))


def peer_ip(session: Session) -> str:
    peer = session.peer
    return peer[0] if isinstance(peer, tuple) else str(peer)


@dataclass
class Accepted:
    qid: str
    local: int
    remote: int


class SubmissionHandler:
    """aiosmtpd hooks: each returns the reply; none touches the transport."""

    def __init__(self, config: Config, queue: Queue, directory: Directory, users: Users,
                 on_queued=None, policy=None):
        self.config = config
        self.queue = queue
        self.directory = directory
        self.users = users
        self.on_queued = on_queued or (lambda accepted: None)
        self.policy = policy  # optional gateway.delivery.pipeline hooks (block lists, virus scan)
        self.hostname = config.server.hostname
        self.smarthosts = SmarthostMemory.beside(queue)
        # not named auth_*: aiosmtpd takes every handler attribute so named for a mechanism
        self.login_throttle = LoginThrottle(config.smtp.max_auth_failures, config.smtp.auth_lockout)
        # Messages go on disk in a process of their own, with whatever else reached its dot
        # meanwhile (spool.writer): the event loop keeps the interpreter to itself.
        self.writer = QueueWriter(queue)

    async def close(self) -> None:
        """Once no client is left: the queue's writer finishes what it was given."""
        await self.writer.close()

    # ------------------------------------------------------------ AUTH
    #
    # The mechanisms are the handler's own ``auth_PLAIN`` / ``auth_LOGIN`` (aiosmtpd's
    # documented way to provide them), so the argon2 check runs on the spool's password
    # thread instead of the event loop, and the login throttle reserves an attempt before
    # any password is looked at.

    async def auth_PLAIN(self, server, args: list[str]) -> AuthResult:
        if len(args) == 1:
            data = await server.challenge_auth("")
            if data is MISSING:
                return AuthResult(success=False)
        else:
            data = _b64(args[1])
            if data is None:
                await server.push(Reply.AUTH_BAD_BASE64)
                return AuthResult(success=False, handled=True)
        try:
            _authz, login, password = data.split(b"\x00")
        except ValueError:
            await server.push(Reply.AUTH_BAD_PLAIN)
            return AuthResult(success=False, handled=True)
        return await self._check_password(server, "PLAIN", login, password)

    async def auth_LOGIN(self, server, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await server.challenge_auth(server.AuthLoginUsernameChallenge)
            if login is MISSING:
                return AuthResult(success=False)
        else:
            login = _b64(args[1])
            if login is None:
                await server.push(Reply.AUTH_BAD_BASE64)
                return AuthResult(success=False, handled=True)
        password = await server.challenge_auth(server.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False)
        return await self._check_password(server, "LOGIN", login, password)

    async def _check_password(self, server, mechanism: str, login: bytes, password: bytes) -> AuthResult:
        ip = peer_ip(server.session)
        user = login.decode("utf-8", "replace")
        throttle = self.login_throttle
        if not throttle.reserve(ip):
            log.warning("auth refused user=%s from=%s: too many failed logins", user, ip)
            return AuthResult(success=False, handled=False, message=Reply.AUTH_LOCKED)
        try:
            ok = await self.users.check(user, password.decode("utf-8", "replace"))
        except BaseException:
            throttle.release(ip)
            raise
        if ok and throttle.succeeded(ip):
            log.info("auth ok user=%s from=%s mechanism=%s", user, ip, mechanism)
            return AuthResult(success=True, auth_data=user)
        if ok:  # right password, but the address was locked out while it was checked
            log.warning("auth refused user=%s from=%s: address locked out meanwhile", user, ip)
            return AuthResult(success=False, handled=False, message=Reply.AUTH_LOCKED)
        delay = throttle.failed(ip)
        locked = throttle.locked_out(ip)
        log.info("auth failed user=%s from=%s mechanism=%s%s", user, ip, mechanism,
                 " (address now locked out)" if locked else "")
        await asyncio.sleep(delay)
        return AuthResult(success=False, handled=False)

    def authenticate(self, server, session: Session, envelope: Envelope, mechanism: str, auth_data) -> AuthResult:
        """aiosmtpd's synchronous hook, for a mechanism not implemented above: none is offered."""
        return AuthResult(success=False, handled=False)

    # ------------------------------------------------------------ hooks

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        # aiosmtpd reads pipelined commands in order; say so (RFC 2920).
        out = [r for r in responses if not r.startswith("250 HELP")]
        last = responses[-1]
        out.insert(1, "250-PIPELINING")
        out.append("250-ENHANCEDSTATUSCODES")
        out.append("250 HELP" if last.startswith("250 HELP") else last.replace("250 ", "250-", 1))
        if not out[-1].startswith("250 "):
            out[-1] = out[-1].replace("250-", "250 ", 1)
        return out

    async def handle_MAIL(self, server, session, envelope, addr, mail_options):
        size = _size_option(mail_options)
        limit = self.config.smtp.max_message_size
        if size is not None and size > limit:
            return Reply.TOO_BIG.format(limit=limit)
        try:
            # statvfs reads counters the kernel keeps in memory: no disk wait, so no thread hop
            free = free_bytes(self.queue.dir)
        except OSError:
            free = 0
        if free < (size or 0) + self.config.smtp.min_free_space:
            log.warning("refusing mail from=<%s>: only %d bytes free in the spool", addr, free)
            return Reply.NO_SPACE
        sender = address.normalise(addr) if addr else ""
        if address.needs_smtputf8(sender) and not envelope.smtp_utf8:
            return Reply.UTF8_NEEDS_SMTPUTF8  # RFC 6531 §3.4
        if self.policy is not None:
            refusal = await self.policy.check_sender(sender, peer_ip(session))
            if refusal:
                return refusal
        # aiosmtpd takes an empty mail_from for "no MAIL yet" and would answer RCPT with
        # 503; the null sender (bounces, auto-replies) is kept as "<>" until DATA.
        envelope.mail_from = sender or NULL_SENDER
        envelope.mail_options.extend(mail_options)
        return Reply.SENDER_OK

    async def handle_RCPT(self, server, session, envelope, addr, rcpt_options):
        rcpt = address.normalise(addr)
        if len(envelope.rcpt_tos) >= 1000:
            return Reply.TOO_MANY_RCPTS
        if address.needs_smtputf8(rcpt) and not envelope.smtp_utf8:
            return Reply.UTF8_NEEDS_SMTPUTF8  # RFC 6531 §3.4
        if self.directory.is_local(rcpt):
            if not self.directory.exists(rcpt):
                log.info("reject rcpt=<%s> from=%s: no such user", rcpt, peer_ip(session))
                return Reply.NO_SUCH_USER
        elif not (session.authenticated or self.config.server.in_mynetworks(peer_ip(session))):
            log.warning("reject rcpt=<%s> from=%s: relay access denied", rcpt, peer_ip(session))
            return Reply.RELAY_DENIED
        elif not address.is_relayable(rcpt):
            return Reply.BAD_ADDRESS
        elif (address.needs_smtputf8(rcpt) or address.needs_smtputf8(_sender(envelope))) \
                and not await self._smarthost_takes_utf8():
            log.info("reject rcpt=<%s> from=%s: the smarthost offers no SMTPUTF8", rcpt, peer_ip(session))
            return Reply.UTF8_NO_ROUTE
        if self.policy is not None:
            refusal = await self.policy.check_recipient(_sender(envelope), rcpt, peer_ip(session))
            if refusal:
                return refusal
        envelope.rcpt_tos.append(rcpt)
        envelope.rcpt_options.extend(rcpt_options)
        return Reply.RECIPIENT_OK

    async def _smarthost_takes_utf8(self) -> bool:
        """False only when the smarthost's last EHLO lacked SMTPUTF8 (direct MX: not known)."""
        sh = self.config.smarthost
        if sh.route != "smarthost" or not sh.host:
            return True
        offered = await asyncio.to_thread(self.smarthosts.keywords, f"{sh.host}:{sh.port}")
        return offered is None or "SMTPUTF8" in offered

    def open_body(self, session: Session, envelope: Envelope) -> IncomingBody:
        """Where the DATA of this transaction goes as it arrives: the spool's tmp file,
        starting with our Received: header; LAN mail gets a missing Date:/Message-ID:."""
        lan = session.authenticated or self.config.server.in_mynetworks(peer_ip(session))
        return IncomingBody.start(self.queue, self._received(session, envelope),
                                  complete_for=self.hostname if lan else None)

    async def handle_DATA(self, server, session, envelope: "SubmissionEnvelope"):
        body = envelope.body
        peer = peer_ip(session)
        if body.size > self.config.smtp.max_message_size:
            return Reply.TOO_BIG.format(limit=self.config.smtp.max_message_size)
        try:
            headers = await body.finish()  # read once, here, for everything below
        except OSError as exc:
            return self._not_kept(envelope, peer, exc)
        if self.policy is not None:
            if self.policy.reads_body(body.size):
                try:
                    await body.written()
                except OSError as exc:
                    return self._not_kept(envelope, peer, exc)
            refusal = await self.policy.check_content(_sender(envelope), envelope.rcpt_tos, body.path, body.size,
                                                      headers, peer)
            if refusal:
                return refusal
        routes = [(r, LOCAL if self.directory.is_local(r) else RELAY) for r in envelope.rcpt_tos]
        arrival = Arrival(body.qid, body.path, _sender(envelope), routes, origin="smtp",
                          client=f"{peer} user={session.auth_data}" if session.authenticated else peer,
                          message_id=headers.get("Message-ID"), subject=headers.get("Subject"),
                          urgent=_is_urgent(headers), smtputf8=bool(envelope.smtp_utf8))
        try:
            if body.created:  # over the buffer: the rest goes into the file here
                await body.written()
                body.handed_over = True  # the writer queues or removes the file
                qid = await self.writer.put(arrival, b"", body.on_disk, body.sha256)
            else:
                body.handed_over = True
                qid = await self.writer.put(arrival, body.whole())
        except OSError as exc:
            return self._not_kept(envelope, peer, exc)
        local = sum(1 for _, route in routes if route == LOCAL)
        log.info("%s: from=<%s> size=%d nrcpt=%d (local %d, remote %d) client=%s%s", qid, _sender(envelope),
                 body.size, len(routes), local, len(routes) - local, peer,
                 f" user={session.auth_data}" if session.authenticated else "")
        self.on_queued(Accepted(qid, local, len(routes) - local))
        return Reply.QUEUED.format(qid=qid)

    def _not_kept(self, envelope: Envelope, peer: str, exc: OSError) -> str:
        reason = "disk full" if is_disk_full(exc) else (getattr(exc, "strerror", None) or str(exc))
        log.error("spool write failed from=<%s> client=%s: %s; answered 452, nothing kept",
                  _sender(envelope), peer, reason)
        return Reply.NO_SPACE if is_disk_full(exc) else Reply.LOCAL_ERROR

    def _received(self, session: Session, envelope: Envelope) -> bytes:
        trace = Received(
            helo=session.host_name, client_ip=peer_ip(session), by=self.hostname,
            with_protocol=received.protocol(session.extended_smtp, session.ssl is not None,
                                            bool(session.authenticated), bool(envelope.smtp_utf8)),
            date=email.utils.formatdate(time.time(), localtime=True),
            recipient=envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else None)
        return trace.header().encode("utf-8", "replace")


NULL_SENDER = "<>"

# A path aiosmtpd's parser reads as itself: an ASCII dot-atom at a host name, in brackets.
_ATOM = r"[A-Za-z0-9!#$&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9-]+"
_PLAIN_PATH = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*)>")
# what the parser would take for comments or folding after the path: left to it
_CFWS_LEADERS = ("(", "\t", "\r", "\n")


def _sender(envelope: Envelope) -> str:
    return "" if envelope.mail_from == NULL_SENDER else envelope.mail_from


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text or "")


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.encode(), validate=True)
    except (ValueError, binascii.Error):
        return None


def _size_option(options: list[str]) -> int | None:
    for opt in options:
        key, _, value = opt.partition("=")
        if key.upper() == "SIZE" and value.isdigit():
            return int(value)
    return None


def _is_urgent(headers) -> bool:
    try:
        prio = str(headers.get("X-Priority", "")).strip()[:1]
        imp = str(headers.get("Importance", "")).strip().lower()
    except Exception:
        return False
    return prio == "1" or imp == "high"


class SubmissionSession(Session):
    """aiosmtpd's Session without its legacy ``login_data`` warning.

    aiosmtpd 1.4 itself assigns ``session.login_data`` after every successful AUTH, even
    with an ``authenticator`` returning ``AuthResult`` (whose ``auth_data`` is what we
    read), and the deprecated property logs a warning on each assignment.  Here it is a
    plain attribute that nothing reads.
    """

    login_data = None


class SubmissionEnvelope(Envelope):
    """aiosmtpd's Envelope, with the message in the spool's tmp file instead of ``content``."""

    def __init__(self) -> None:
        super().__init__()
        self.body: IncomingBody | None = None


class SubmissionProtocol(SMTPProtocol):
    """aiosmtpd's SMTP with AUTH allowed in the clear only for loopback peers."""

    live: "set[SubmissionProtocol]" = set()  # open connections, for a graceful shutdown
    clear_auth_on_loopback = True  # port 25: a script on this machine may AUTH without TLS
    release: Callable[[], None] = staticmethod(lambda: None)  # gives the connection slot back
    junk_commands = 0
    # RFC 2034 §3: the greeting and the answers to HELO/EHLO carry no enhanced status code
    greeted = False
    answering_helo = False

    @classmethod
    def maker(cls, handler: SubmissionHandler, **options) -> Callable[[], "SubmissionProtocol"]:
        """A factory of protocols for one listener.

        aiosmtpd's ``__init__`` inspects the class and the handler (``inspect.getmembers``,
        ``dir``, ``inspect.signature``) on every connection, a third of a millisecond that
        gives the same answer each time.  Here it runs once, for a pattern protocol that
        never serves; each connection gets a copy of its state with what belongs to one
        connection made afresh (see ``_copy``).
        """
        pattern: SubmissionProtocol | None = None

        def make() -> SubmissionProtocol:
            nonlocal pattern
            if pattern is None:
                pattern = cls(handler, **options)
            return pattern._copy()
        return make

    def _copy(self) -> "SubmissionProtocol":
        """A new protocol with this one's settings: new streams (StreamReaderProtocol's own
        ``__init__``, which resets the flow control and connection state too), and the SMTP
        command and built-in AUTH methods bound to the new protocol.  Nothing else aiosmtpd's
        ``__init__`` sets is changed per connection (tests/test_submit_upstream.py records it)."""
        proto = object.__new__(type(self))
        proto.__dict__.update(self.__dict__)
        reader = asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit)
        asyncio.StreamReaderProtocol.__init__(proto, reader, client_connected_cb=proto._cb_client_connected,
                                              loop=self.loop)
        proto._smtp_methods = {command: getattr(proto, method.__name__)
                               for command, method in self._smtp_methods.items()}
        proto._auth_methods = {
            name: _AuthMechAttr(getattr(proto, mech.method.__name__), True) if mech.is_builtin else mech
            for name, mech in self._auth_methods.items()}
        return proto

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's reading of a MAIL/RCPT path, with the usual ``<user@host.domain>``
        read by one regular expression instead of the RFC 5322 header parser (a fifth of a
        millisecond per command); anything else goes to aiosmtpd.  Both give the same answer
        for every path the quick one takes (tests/test_submit_per_connection.py)."""
        plain = _PLAIN_PATH.match(arg)
        if plain is not None and not self.local_part_limit:
            rest = arg[plain.end():].lstrip(" ")
            if rest[:1] not in _CFWS_LEADERS:
                return plain.group(1), rest
        return super()._getaddr(arg)

    def _create_session(self) -> Session:
        return SubmissionSession(self.loop)

    def connection_made(self, transport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            self._auth_require_tls = not (self.clear_auth_on_loopback and peer_is_loopback(self.session.peer))
            SubmissionProtocol.live.add(self)

    def connection_lost(self, error) -> None:
        SubmissionProtocol.live.discard(self)
        self.release()
        super().connection_lost(error)

    def _create_envelope(self) -> Envelope:
        return SubmissionEnvelope()

    async def push(self, status) -> None:
        """Every reply leaves with an enhanced status code (see gateway.smtp.replies), aiosmtpd's too."""
        if isinstance(status, str) and self.greeted and not self.answering_helo:
            status = with_status_code(status, self.data_size_limit)
        self.greeted = True
        await super().push(status)

    async def _junk(self) -> bool:
        """Count a command that moves no mail; True when the client was disconnected for it."""
        self.junk_commands += 1
        if self.junk_commands <= JUNK_COMMAND_LIMIT:
            return False
        log.warning("disconnecting %s: too many commands that move no mail", peer_ip(self.session))
        await self.push(Reply.TOO_MANY_JUNK.format(host=self.hostname))
        if self.transport is not None:
            self.transport.close()
        return True

    def _set_post_data_state(self) -> None:
        # aiosmtpd's end of every DATA: a message was sent, so the client makes progress
        self.junk_commands = 0
        super()._set_post_data_state()

    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str) -> None:
        if not await self._junk():
            await super().smtp_NOOP(arg)

    @syntax("RSET")
    async def smtp_RSET(self, arg: str) -> None:
        if not await self._junk():
            await super().smtp_RSET(arg)

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:
        if not await self._junk():
            await super().smtp_VRFY(arg)

    async def smtp_EXPN(self, arg: str) -> None:
        if not await self._junk():
            await super().smtp_EXPN(arg)

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str) -> None:
        if not await self._junk():
            await super().smtp_HELP(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, with the message written to the spool as it arrives.

        aiosmtpd collects DATA in memory (one object per line, then a joined copy), so a
        client that sent 20 MB and stalled before the final dot held 20 MB of the daemon's
        memory for as long as it liked.  Here each line, unstuffed, goes to the queue's tmp
        file through ``IncomingBody`` (a small buffer per transaction), and the handler gets
        that file in ``envelope.body``.  Two more differences from aiosmtpd, on purpose:

        * a line longer than 1,000 octets is taken (the reader hands it over in pieces of
          its limit) rather than refused, as Postfix does: scan-to-mail copiers and scripts
          send them.  The message size limit bounds it; the relay folds it on the way out.
        * the time limit is per read (``[smtp] data_timeout``, Postfix's smtpd_timeout), not
          one for the whole command: a slow but steady upload is never cut; a client silent
          for longer is told 421 and disconnected.

        Only ``<CRLF>.<CRLF>`` ends the message (a bare CR or LF around a dot is data: no
        SMTP smuggling).  Replies, the size limit and the order of events are aiosmtpd's.
        It reads aiosmtpd's private ``_reader``/``_writer`` and replaces its idle timer
        (``_timeout_handle``/``_reset_timeout``), which have no public equivalent, so aiosmtpd
        is pinned in pyproject.toml and tests/test_submit_upstream.py fails when the
        upstream code it depends on changes.
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        handler: SubmissionHandler = self.event_handler
        idle = handler.config.smtp.data_timeout
        body = handler.open_body(self.session, self.envelope)
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            # aiosmtpd's timer runs from the DATA command to the end of the message: replaced
            # by one that each read pushes back.
            self._timeout_handle.cancel()
            try:
                async with asyncio.timeout(None) as deadline:
                    silence = SilenceLimit(self.loop, deadline, idle)
                    try:
                        refusal = await self._receive(body, silence)
                    finally:
                        silence.cancel()
            except TimeoutError:
                log.info("%r: no data for %ds during DATA: cut", self.session.peer, idle)
                await self.push(Reply.DATA_TIMEOUT.format(hostname=self.hostname))
                self.transport.close()
                return
            except asyncio.IncompleteReadError:
                log.info("%r: connection closed during DATA", self.session.peer)
                self.transport.close()
                return
            except asyncio.CancelledError:
                log.info("connection lost during DATA")
                self._writer.close()
                raise
            self._reset_timeout()
            if refusal:
                await self.push(refusal)
                self._set_post_data_state()
                return
            self.envelope.body = body
            status = await self._call_handler_hook("DATA")
            self._set_post_data_state()
            await self.push("250 OK" if status is MISSING else status)
        finally:
            body.close()  # removes the tmp file unless the queue took it

    async def _receive(self, body: IncomingBody, silence: "SilenceLimit") -> str | None:
        """Read DATA up to its final dot into ``body``; the refusal to answer there, if any."""
        reader = self._reader
        limit = self.data_size_limit
        size = 0
        refusal = None  # replied once the client has sent the whole message (RFC 5321 4.2.5)
        at_line_start = True
        while True:
            try:
                piece = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:
                # A line longer than the reader's buffer: take what is buffered so far (it
                # holds no CRLF; a CR at its very end stays behind for the next read).
                piece = await reader.readexactly(exc.consumed)
            silence.heard()
            if at_line_start and piece == b".\r\n":
                return refusal
            starts_line, at_line_start = at_line_start, piece.endswith(b"\r\n")
            size += len(piece)
            if refusal:
                continue
            if limit and size > limit:
                refusal = Reply.TOO_MUCH_DATA
                body.refuse()
            elif starts_line and piece[:1] == b".":
                await body.write(memoryview(piece)[1:])
            else:
                await body.write(piece)

    # A HELO/EHLO argument ends up in our own Received: header: one with a control
    # character (a bare CR or LF smuggles a header line in) is refused, as Postfix does.
    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if _has_control(hostname):
            await self.push(Reply.BAD_HELO)
            return
        self.answering_helo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self.answering_helo = False

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if _has_control(hostname):
            await self.push(Reply.BAD_HELO)
            return
        self.answering_helo = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self.answering_helo = False

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        # A locked-out address is refused before any password is looked at; each recent
        # failure from the address slows the next answer.  A refusal that is not a login
        # (538 before TLS, a syntax error) is not a failed password and counts for nothing.
        throttle: LoginThrottle = self.event_handler.login_throttle
        ip = peer_ip(self.session)
        if throttle.locked_out(ip):
            log.warning("auth refused from=%s: too many failed logins", ip)
            await self.push(Reply.AUTH_LOCKED)
            return
        await asyncio.sleep(throttle.delay(ip))
        await super().smtp_AUTH(arg)


class SilenceLimit:
    """The per-read time limit in DATA: expires ``deadline`` once the client has sent
    nothing for ``idle`` seconds.

    A read only notes its time (pushing a timer back for each line of a message cost a
    cancel and a new timer, a tenth of a millisecond per message).  The one timer fires at
    the earliest moment the silence could have lasted ``idle``; if something was heard since,
    it is set again from the last read, so the limit is exactly as strict as before.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, deadline: asyncio.Timeout, idle: float):
        self.loop, self.deadline, self.idle = loop, deadline, idle
        self.last = loop.time()
        self.timer = loop.call_at(self.last + idle, self._check)

    def heard(self) -> None:
        self.last = self.loop.time()

    def _check(self) -> None:
        due = self.last + self.idle
        if self.loop.time() >= due:
            self.deadline.reschedule(self.loop.time())  # the DATA task gets TimeoutError
        else:
            self.timer = self.loop.call_at(due, self._check)

    def cancel(self) -> None:
        self.timer.cancel()


class ClientSubmissionProtocol(SubmissionProtocol):
    """Port 587: TLS first and AUTH before MAIL for every client, loopback included (the
    requirement itself is aiosmtpd's ``require_starttls`` and ``auth_required``)."""

    clear_auth_on_loopback = False


def tls_context(cert, key) -> ssl.SSLContext | None:
    if not cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def start_servers(config: Config, handler: SubmissionHandler) -> list[Listener]:
    loop = asyncio.get_running_loop()
    ctx = tls_context(config.smtp.tls_cert, config.smtp.tls_key)
    admission = Admission("SMTP", config.smtp.max_connections, config.smtp.max_connections_per_client, log,
                          unlimited=config.server.in_mynetworks)
    refusal = Reply.TOO_MANY_CONNECTIONS.format(host=config.server.hostname).encode() + b"\r\n"

    make = SubmissionProtocol.maker(handler, hostname=config.server.hostname, ident="dialmail",
                                    data_size_limit=config.smtp.max_message_size, enable_SMTPUTF8=True,
                                    tls_context=ctx, authenticator=handler.authenticate,
                                    auth_require_tls=True, timeout=300)

    async def serve(conn, ip: str, release: Callable[[], None]) -> None:
        protocol = make()
        protocol.release = release
        await loop.connect_accepted_socket(lambda: protocol, conn)

    return await _open_all(config.smtp.listen, admission, serve, refusal, "smtp", "SMTP")


async def start_submission(config: Config, handler: SubmissionHandler) -> list[Listener]:
    """The ``[submission]`` listeners (port 587), or none when the section is absent.

    Their own connection caps (a flood on port 25 must not lock the office's mail clients
    out), with ``[smtp]``'s numbers."""
    if config.submission is None:
        return []
    loop = asyncio.get_running_loop()
    ctx = tls_context(config.submission.tls_cert, config.submission.tls_key)
    admission = Admission("submission", config.smtp.max_connections, config.smtp.max_connections_per_client, log)
    refusal = Reply.TOO_MANY_CONNECTIONS.format(host=config.server.hostname).encode() + b"\r\n"

    make = ClientSubmissionProtocol.maker(handler, hostname=config.server.hostname, ident="dialmail",
                                          data_size_limit=config.smtp.max_message_size, enable_SMTPUTF8=True,
                                          tls_context=ctx, require_starttls=True, auth_required=True,
                                          authenticator=handler.authenticate, auth_require_tls=True,
                                          timeout=300)

    async def serve(conn, ip: str, release: Callable[[], None]) -> None:
        protocol = make()
        protocol.release = release
        await loop.connect_accepted_socket(lambda: protocol, conn)

    return await _open_all(config.submission.listen, admission, serve, refusal, "submission", "submission")


async def _open_all(listens, admission: Admission, serve, refusal: bytes, section: str, what: str) -> list[Listener]:
    servers: list[Listener] = []
    for listen in listens:
        try:
            server = await Listener.open(listen.host, listen.port, admission, serve, refusal)
        except OSError as exc:  # one line for the admin, not a traceback
            for started in servers:
                started.close()
            raise ConfigError(f"{section}.listen: cannot listen on {listen}: {exc.strerror or exc}") from None
        servers.append(server)
        log.info("%s listening on %s", what, listen)
    return servers
