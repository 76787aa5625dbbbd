"""How many connections a listener holds: in all, and per client address.

SMTP and POP3 accept connections through ``Listener`` rather than ``asyncio.Server``:
past a cap a connection is answered with a one-line refusal and closed at once (what
Postfix and Dovecot do), and when the process runs out of file descriptors accepting
pauses until a connection ends, instead of asyncio's accept loop retrying and logging
a traceback for each attempt.  Refusals are logged once per ``REPORT_EVERY`` with a
count, never once per connection: a flood must not fill the disk the spool lives on.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Awaitable, Callable

REPORT_EVERY = 60.0  # seconds between two log lines about refused connections
# Connections past the cap for a client on the host itself (127.0.0.1, ::1), so the admin's
# own client and the web/sendmail tools still get in while the LAN has taken every slot.
LOOPBACK_SPARE = 5
HOST_ITSELF = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
DESCRIPTOR_PAUSE = 1.0  # at most this long without accepting once descriptors ran out
CLIENT_GONE = (errno.ECONNABORTED, errno.EPROTO, errno.EAGAIN, errno.EINTR, errno.EPERM)


@dataclass
class Refusals:
    """Refusals of one kind, logged at most once per ``REPORT_EVERY``."""

    log: logging.Logger
    what: str
    pending: int = 0
    last_report: float = float("-inf")

    def note(self) -> None:
        self.pending += 1
        now = time.monotonic()
        if now - self.last_report >= REPORT_EVERY:
            self.log.warning("%s: %d time(s) since the last report (reported at most every %d s)",
                             self.what, self.pending, REPORT_EVERY)
            self.pending, self.last_report = 0, now


@dataclass
class Admission:
    """Connections held by one service (all its listeners), counted per client address."""

    service: str  # "SMTP", "POP3": for the log
    max_connections: int
    max_per_client: int
    log: logging.Logger
    # Clients the per-client cap does not apply to: mynetworks, as Postfix's
    # smtpd_client_event_limit_exceptions.  A terminal server or a NAT inside the office is
    # many people behind one address; the total cap still holds for them.
    unlimited: Callable[[str], bool] = lambda ip: False
    held: Counter = field(default_factory=Counter)
    total: int = 0

    def __post_init__(self) -> None:
        self.too_many = Refusals(self.log, f"{self.service} connection limit ({self.max_connections}) reached")
        self.too_many_from = Refusals(self.log, f"{self.service} per-client connection limit "
                                                f"({self.max_per_client}) reached")
        self.no_descriptors = Refusals(self.log, f"{self.service} out of file descriptors, accepting paused")
        self.freed = asyncio.Event()

    def admit(self, ip: str) -> bool:
        if self.held[ip] >= self.max_per_client and not self.unlimited(ip):
            self.too_many_from.note()
            return False
        cap = self.max_connections + (LOOPBACK_SPARE if ip in HOST_ITSELF else 0)
        if self.total >= cap:
            self.too_many.note()
            return False
        self.held[ip] += 1
        self.total += 1
        return True

    def release(self, ip: str) -> None:
        self.held[ip] -= 1
        if self.held[ip] <= 0:
            del self.held[ip]
        self.total -= 1
        self.freed.set()

    async def wait_for_descriptor(self) -> None:
        self.no_descriptors.note()
        self.freed.clear()
        try:
            async with asyncio.timeout(DESCRIPTOR_PAUSE):
                await self.freed.wait()
        except TimeoutError:
            pass


# ``serve(conn, ip, release)`` takes over an accepted socket and calls ``release()`` once
# the connection is over.
Serve = Callable[[socket.socket, str, Callable[[], None]], Awaitable[None]]


# The accept queue the kernel keeps for each listening socket (it caps this at
# net.core.somaxconn, 4096 on current kernels).  asyncio's 100 is too short for a burst of
# a few hundred connects: past it the kernel drops the handshake's last ACK, the client
# believes it is connected, and since SMTP and POP3 servers speak first, it waits for a
# greeting that never comes.  The connection caps, not the queue, are what bound the load.
LISTEN_BACKLOG = 4096


class Listener:
    """The listening sockets of one ``host:port`` (all its addresses, as asyncio binds them)
    and their accept loops; ``close``/``wait_closed``/``sockets`` as ``asyncio.Server``."""

    def __init__(self, sockets: list[socket.socket], admission: Admission, serve: Serve, refusal: bytes):
        self.sockets = sockets
        self.admission = admission
        self.serve = serve
        self.refusal = refusal
        self.failures = Refusals(admission.log, f"{admission.service} accept() failing, accepting paused")
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._accept_loop(sock), name=f"accept {sock.getsockname()}")
                      for sock in sockets]

    @classmethod
    async def open(cls, host: str, port: int, admission: Admission, serve: Serve, refusal: bytes) -> Listener:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(LISTEN_BACKLOG)
                sock.setblocking(False)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return cls(sockets, admission, serve, refusal)

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno in OUT_OF_DESCRIPTORS:
                    await self.admission.wait_for_descriptor()
                elif exc.errno not in CLIENT_GONE:  # never retried in a tight loop
                    self.failures.note()
                    await asyncio.sleep(DESCRIPTOR_PAUSE)
                continue
            ip = str(peer[0]) if isinstance(peer, tuple) else str(peer)
            if not self.admission.admit(ip):
                try:
                    conn.send(self.refusal)  # a fresh socket's buffer takes one line
                except OSError:
                    pass
                conn.close()
                continue
            release = _releaser(self.admission, ip)
            try:
                await self.serve(conn, ip, release)
            except OSError:
                release()
                conn.close()
            except asyncio.CancelledError:
                release()
                conn.close()
                raise

    def close(self) -> None:
        # each socket is closed once its accept loop is out of sock_accept (which must
        # unregister it from the selector first)
        for sock, task in zip(self.sockets, self.tasks):
            task.add_done_callback(lambda _, sock=sock: sock.close())
            task.cancel()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _releaser(admission: Admission, ip: str) -> Callable[[], None]:
    """``release`` for one connection: safe to call twice (close after a failed start)."""
    held = True

    def release() -> None:
        nonlocal held
        if held:
            held = False
            admission.release(ip)
    return release
