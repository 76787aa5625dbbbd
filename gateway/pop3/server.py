"""The asyncio shell around the POP3 dialogue: sockets, files, passwords, TLS.

Each connection feeds what it reads to ``protocol.Session`` and carries out the
actions it gets back, one at a time, so pipelined commands keep their order.
Messages are read in chunks and written with flow control (``drain``), so a 20 MB
message never sits in memory whole.  A chunk the page cache holds is read on the event
loop without waiting for the disk (``read_cached``); any other goes to a worker thread.
"""
from __future__ import annotations

import asyncio
import logging
import ssl

from gateway.config import Config, is_loopback
from gateway.mail.errors import ConfigError
from gateway.policy.connections import Admission, Listener
from gateway.policy.throttle import LoginThrottle
from gateway.pop3.maildrop import Maildrop, MaildropLocks, OctetCounts, read_cached
from gateway.pop3.protocol import (
    Authenticate,
    Close,
    Response,
    Send,
    Session,
    StartTLS,
    Stream,
    Update,
    line,
)
from gateway.pop3.wire import CHUNK, MessageEncoder
from spool.maildir import mailbox_path
from spool.users import Users

log = logging.getLogger("dialmail.pop3")

IDLE_TIMEOUT = 600.0  # RFC 1939: an autologout timer of at least 10 minutes
STOP_GRACE = 5.0
TOO_MANY_CONNECTIONS = b"-ERR [SYS/TEMP] too many connections, try again later\r\n"


class POP3Server:
    def __init__(self, config: Config, users: Users):
        self.config = config
        self.users = users
        self.locks = MaildropLocks()
        self.octets = OctetCounts()
        self.throttle = LoginThrottle(config.pop3.max_failures, config.pop3.lockout)
        self.tls = _tls_context(config) if config.pop3.tls_cert else None
        self.listeners: list[Listener] = []
        self.connections: set[asyncio.Task] = set()
        self.admission = Admission("POP3", config.pop3.max_connections, config.pop3.max_connections_per_client, log,
                                   unlimited=config.server.in_mynetworks)

    async def start(self) -> None:
        for listen in self.config.pop3.listen:
            try:
                server = await Listener.open(listen.host, listen.port, self.admission, self._serve,
                                             TOO_MANY_CONNECTIONS)
            except OSError as exc:
                await self.stop()
                raise ConfigError(f"pop3.listen: cannot listen on {listen}: {exc.strerror}") from None
            self.listeners.append(server)
            log.info("POP3 listening on %s%s", listen, " (STLS offered)" if self.tls else "")

    async def stop(self) -> None:
        for server in self.listeners:
            server.close()
        for task in list(self.connections):
            task.cancel()
        if self.connections:
            await asyncio.wait(list(self.connections), timeout=STOP_GRACE)
        for server in self.listeners:
            await server.wait_closed()
        self.listeners.clear()

    def plaintext_allowed(self, ip: str) -> bool:
        """Passwords in the clear: from loopback, or from mynetworks when the config says so."""
        if is_loopback(ip):
            return True
        return self.config.pop3.allow_plaintext_lan and self.config.server.in_mynetworks(ip)

    async def _serve(self, conn, ip: str, release) -> None:
        """Streams over an accepted socket, as ``asyncio.start_server`` would make them."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(loop=loop)

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await self._accept(reader, writer)
            finally:
                release()
        await loop.connect_accepted_socket(lambda: asyncio.StreamReaderProtocol(reader, accepted), conn)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.connections.add(task)
        try:
            await Connection(self, reader, writer).run()
        finally:
            self.connections.discard(task)


class Connection:
    def __init__(self, server: POP3Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.reader, self.writer = reader, writer
        peer = writer.get_extra_info("peername") or ("?", 0)
        self.ip = str(peer[0])
        self.session = Session(tls_available=server.tls is not None,
                               plaintext_allowed=server.plaintext_allowed(self.ip))
        self.user: str | None = None
        self.maildrop: Maildrop | None = None
        self.ending = "disconnected"
        self.streaming = False  # a reply line now would land inside a message

    async def run(self) -> None:
        try:
            self.writer.write(self.session.greeting())
            while True:
                action = self.session.next_action()
                if action is None:
                    try:
                        # asyncio.timeout, not wait_for: no extra task per command
                        async with asyncio.timeout(IDLE_TIMEOUT):
                            data = await self.reader.read(CHUNK)
                    except TimeoutError:
                        self.session.idle_timeout()
                        self.ending = "idle timeout"
                        continue
                    if not data:
                        break
                    self.session.receive_data(data)
                elif isinstance(action, Close):
                    await self.writer.drain()
                    break
                else:
                    await self._perform(action)
        except (ConnectionError, ssl.SSLError, TimeoutError) as exc:
            log.info("POP3 connection from %s lost: %s", self.ip, exc.__class__.__name__)
        except Exception:
            log.exception("POP3 session from %s failed", self.ip)
        except asyncio.CancelledError:
            self.ending = "server stopping"
            if not self.writer.is_closing() and not self.streaming:
                self.writer.write(line(Response.SHUTDOWN))
        finally:
            self._release()
            self.writer.close()

    async def _perform(self, action) -> None:
        if isinstance(action, Send):
            self.writer.write(action.data)
            await self.writer.drain()
        elif isinstance(action, Authenticate):
            await self._authenticate(action)
        elif isinstance(action, Stream):
            await self._stream(action)
        elif isinstance(action, StartTLS):
            await self.writer.drain()
            if await self._cleartext_waiting():
                # Cleartext that arrived behind STLS would be read as if it came over TLS
                # (command injection, RFC 2595 section 3.1 / CVE-2011-0411): refuse it.
                raise ConnectionAbortedError("data sent before the TLS handshake")
            await self.writer.start_tls(self.server.tls)
            self.session.tls_started()
        elif isinstance(action, Update):
            failed = await asyncio.to_thread(self.maildrop.remove, action.deleted)
            self.ending = "quit" if not failed else f"quit, {failed} deletions failed"
            self.session.update_finished(failed)
        else:
            raise TypeError(f"unknown POP3 action {action!r}")

    async def _cleartext_waiting(self) -> bool:
        """Whether the client sent anything after STLS that the session has not read yet.

        Reading stops first, so nothing can arrive between this look and the handshake
        (``start_tls`` resumes it for the TLS layer).  The reader hands over buffered bytes
        without waiting, so a zero timeout only expires when nothing is buffered.
        """
        self.writer.transport.pause_reading()
        try:
            async with asyncio.timeout(0):
                return bool(await self.reader.read(1))
        except TimeoutError:
            return False

    async def _authenticate(self, action: Authenticate) -> None:
        server, user = self.server, action.user.strip().lower()
        how = f"mechanism={action.mechanism} tls={'yes' if self.session.secure else 'no'}"
        if not server.throttle.reserve(self.ip):  # an attempt is reserved before any password is checked
            log.warning("POP3 login refused user=%s from=%s %s (address locked out)", user, self.ip, how)
            await asyncio.sleep(server.throttle.delay(self.ip))
            self.session.login_refused(Response.LOCKED_OUT)
            return
        try:
            ok = await server.users.check(user, action.password)
        except BaseException:
            server.throttle.release(self.ip)
            raise
        if ok and not server.throttle.succeeded(self.ip):
            log.warning("POP3 login refused user=%s from=%s %s (address locked out meanwhile)", user, self.ip, how)
            self.session.login_refused(Response.LOCKED_OUT)
            return
        if not ok:
            delay = server.throttle.failed(self.ip)
            locked = server.throttle.locked_out(self.ip)
            log.warning("POP3 login failed user=%s from=%s %s%s", user, self.ip, how,
                        " (address now locked out)" if locked else "")
            await asyncio.sleep(delay)
            self.session.login_refused(Response.LOCKED_OUT if locked else Response.AUTH_FAILED)
            return
        if not server.locks.acquire(user):
            log.info("POP3 login refused user=%s from=%s %s (maildrop in use)", user, self.ip, how)
            self.session.login_refused(Response.IN_USE)
            return
        maildrop = Maildrop(mailbox_path(server.config.spool_dir, user), server.octets)
        try:
            messages = await asyncio.to_thread(maildrop.open)
        except OSError as exc:
            server.locks.release(user)
            log.error("POP3 cannot open maildrop of %s: %s", user, exc)
            self.session.login_refused(Response.MAILDROP_FAILED)
            return
        except BaseException:
            server.locks.release(user)
            raise
        self.user, self.maildrop = user, maildrop
        self.session.login_accepted(messages)
        log.info("POP3 login user=%s from=%s %s messages=%d octets=%d", user, self.ip, how,
                 len(messages), sum(m.octets for m in messages))

    async def _stream(self, action: Stream) -> None:
        # Most messages fit in one chunk and are in the page cache: read at once.  Else
        # one worker-thread hop opens the file and reads the first chunk.
        opened = self._open_cached(action.message)
        if opened is None:
            opened = await asyncio.to_thread(self._open_and_read, action.message)
        if opened is None:
            self.writer.write(line(Response.MESSAGE_GONE))
            await self.writer.drain()
            return
        f, chunk = opened
        self.streaming = True
        try:
            encoder = MessageEncoder(action.body_lines, verbatim=action.message.verbatim)
            # Status line, text and terminator leave in one write (one send() for a
            # message that fits in a chunk, instead of three).
            out = [action.head]
            while True:
                out.append(encoder.encode(chunk))
                # A buffered read returns less than asked only at the end of the file.
                if encoder.done or len(chunk) < CHUNK:
                    break
                self.writer.write(b"".join(out))
                out = []
                await self.writer.drain()
                chunk = read_cached(f, CHUNK)
                if chunk is None:
                    chunk = await asyncio.to_thread(f.read, CHUNK)
            out.append(encoder.end())
            self.writer.write(b"".join(out))
            await self.writer.drain()
            self.streaming = False
        finally:
            f.close()  # a read-only file: closing it does not wait for the disk

    def _open_cached(self, message):
        """The open file and its first chunk if the page cache holds it, else None.  The
        open itself does not wait for the disk: the login's listing just looked the file up."""
        f = self.maildrop.open_message(message)
        if f is None:
            return None
        chunk = read_cached(f, CHUNK)
        if chunk is None:
            f.close()
            return None
        return f, chunk

    def _open_and_read(self, message):
        f = self.maildrop.open_message(message)
        if f is None:
            return None
        try:
            return f, f.read(CHUNK)
        except BaseException:
            f.close()
            raise

    def _release(self) -> None:
        if self.user is None:
            return
        self.server.locks.release(self.user)
        s = self.session
        log.info("POP3 logout user=%s from=%s retrieved=%d deleted=%d left=%d (%s)", self.user, self.ip,
                 s.retrieved, len(s.deleted) if self.ending.startswith("quit") else 0,
                 len(s.messages) - (len(s.deleted) if self.ending.startswith("quit") else 0), self.ending)
        self.user = None


def _tls_context(config: Config) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(config.pop3.tls_cert, config.pop3.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"pop3.tls_cert: cannot load {config.pop3.tls_cert}: {exc}") from None
    return ctx


async def service(daemon):
    """The daemon's POP3 service: listen on ``[pop3] listen``; returns ``stop``."""
    server = POP3Server(daemon.config, daemon.spool.users)
    daemon.login_throttles["pop3"] = server.throttle
    await server.start()
    return server.stop
