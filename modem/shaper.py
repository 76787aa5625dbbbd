"""The line shaper: TCP from local ports to the simulated ISP, only while the simulated
modem has carrier, at the connect rate, with the line's latency.

One modem line is one serial pipe each way, so the rate is shared by every forwarded
connection: each direction has a single "line free at" clock and every chunk books the
next slot on it.  A chunk reaches the far side ``latency`` after its last bit left.

On-hook, the listening ports are bound but not listening, so a client gets "connection
refused" exactly as it would with the modem down.  When carrier drops every forwarded
connection is reset at once, both sides, mid-transfer if need be.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import struct
import time
from dataclasses import dataclass
from typing import Protocol, Self

from modem.settings import Route

log = logging.getLogger(__name__)


class CarrierSource(Protocol):
    """What the shaper needs from a simulated modem (``SimLine`` or ``PtyModemServer``)."""

    @property
    def carrier(self) -> bool: ...

    def add_carrier_listener(self, listener) -> None: ...

    def remove_carrier_listener(self, listener) -> None: ...

    def count_data(self, nbytes: int) -> None: ...


class _Direction:
    """One direction of the line: bytes leave one after another at ``rate`` bits/s."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.free_at = 0.0
        self.bytes = 0

    #: A sender that comes back this late to a busy line still continues from where the
    #: line became free: timers wake a little late, and without this every chunk would
    #: lose that much time and the line would run slower than its rate.
    SLACK = 0.05

    def book(self, nbytes: int, now: float) -> float:
        """Reserve the line for ``nbytes``; return when their last bit has left."""
        start = self.free_at if 0 <= now - self.free_at < self.SLACK else max(now, self.free_at)
        self.free_at = start + nbytes * 8 / self.rate
        return self.free_at


@dataclass
class _Listener:
    route: Route
    sock: socket.socket | None = None
    server: asyncio.base_events.Server | None = None
    port: int = 0


class LineShaper:
    def __init__(self, routes: tuple[Route, ...] | list[Route], rate: int, latency: float = 0.0,
                 source: CarrierSource | None = None) -> None:
        if rate <= 0:
            raise ValueError("the line rate must be positive")
        self.rate = rate
        self.latency = latency
        self.source = source
        self._listeners = [_Listener(r) for r in routes]
        self._up = _Direction(rate)
        self._down = _Direction(rate)
        # Small chunks keep the pacing smooth: about 20 ms of line time each.  A byte costs
        # 8 bits: the modem-to-modem link is synchronous (V.42), no start and stop bits.
        self._chunk = max(16, int(rate / 8 * 0.02))
        self._connections: set[_Forward] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = False
        self._carrier_task: asyncio.Task[None] | None = None
        self.connections_cut = 0
        self.connections_total = 0

    # -- lifetime --------------------------------------------------------------------

    async def start(self) -> LineShaper:
        self._loop = asyncio.get_running_loop()
        for listener in self._listeners:
            self._bind(listener)
        if self.source is not None:
            self.source.add_carrier_listener(self._carrier_listener)
            if self.source.carrier:
                await self.open()
        return self

    async def close(self) -> None:
        if self.source is not None:
            self.source.remove_carrier_listener(self._carrier_listener)
        await self.cut("the shaper is shutting down")
        for listener in self._listeners:
            if listener.sock is not None:
                listener.sock.close()
                listener.sock = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where clients connect, with ephemeral ports resolved."""
        return [(l.route.listen_host, l.port) for l in self._listeners]

    @property
    def bytes_up(self) -> int:
        return self._up.bytes

    @property
    def bytes_down(self) -> int:
        return self._down.bytes

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def active_connections(self) -> int:
        return len(self._connections)

    # -- carrier ---------------------------------------------------------------------

    def _carrier_listener(self, carrier: bool, reason: str) -> None:
        # Called on the modem's thread (SimLine) or on the loop (pty server), before the
        # modem's CONNECT reaches the dialer.  Listening starts right here so a client that
        # connects the moment it reads CONNECT waits in the backlog instead of being
        # refused; accepting starts once the loop gets to it.
        assert self._loop is not None
        if carrier:
            for listener in self._listeners:
                if listener.sock is not None:
                    with contextlib.suppress(OSError):
                        listener.sock.listen(64)
        self._loop.call_soon_threadsafe(self._on_carrier, carrier, reason)

    def _on_carrier(self, carrier: bool, reason: str) -> None:
        if carrier:
            self._opening()
        else:
            self.cut_now(reason)

    def _opening(self) -> asyncio.Task[None]:
        # One opening at a time, shared by the carrier listener and explicit open() calls.
        if self._carrier_task is None:
            self._carrier_task = asyncio.ensure_future(self._open_listeners())
        return self._carrier_task

    async def open(self) -> None:
        """Start carrying traffic (carrier is up); returns once every port listens."""
        await asyncio.shield(self._opening())

    async def _open_listeners(self) -> None:
        if self._open:
            return
        self._open = True
        now = time.monotonic()
        self._up.free_at = self._down.free_at = now
        for listener in self._listeners:
            if not self._open:  # carrier dropped meanwhile; cut_now rebound the sockets
                return
            if listener.sock is None:
                self._bind(listener)
            sock, listener.sock = listener.sock, None
            listener.server = await asyncio.start_server(functools.partial(self._accept, listener.route),
                                                         sock=sock, backlog=64)
            if not self._open:
                listener.server.close()
                listener.server = None
                self._bind(listener)
                return
        log.info("line shaper open at %d bps on %s", self.rate, self.addresses)

    def cut_now(self, reason: str) -> None:
        """Carrier is gone: stop listening and reset every forwarded connection, now."""
        was_open = self._open
        self._open = False
        self._carrier_task = None
        for listener in self._listeners:
            if listener.server is not None:
                listener.server.close()
                listener.server = None
            if listener.sock is None and self._loop is not None:
                self._bind(listener)
        for forward in list(self._connections):
            forward.abort()
            self.connections_cut += 1
        self._connections.clear()
        if was_open:
            log.info("line shaper closed: %s", reason)

    async def cut(self, reason: str) -> None:
        self.cut_now(reason)
        await asyncio.sleep(0)

    def _bind(self, listener: _Listener) -> None:
        # Bound but not listening: connects are refused until carrier comes up.
        route = listener.route
        family = socket.AF_INET6 if ":" in route.listen_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((route.listen_host, listener.port or route.listen_port))
        sock.setblocking(False)
        listener.port = sock.getsockname()[1]
        listener.sock = sock

    # -- forwarding ------------------------------------------------------------------

    async def _accept(self, route: Route, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if not self._open:
            _abort(client_w)
            return
        try:
            target_r, target_w = await asyncio.open_connection(route.target_host, route.target_port)
        except OSError as exc:
            log.warning("line shaper: %s unreachable: %s", route, exc)
            _abort(client_w)
            return
        if not self._open:  # carrier dropped while connecting
            _abort(client_w)
            _abort(target_w)
            return
        forward = _Forward(self, client_r, client_w, target_r, target_w)
        self._connections.add(forward)
        self.connections_total += 1
        try:
            await forward.run()
        finally:
            self._connections.discard(forward)

    def _sent(self, nbytes: int) -> None:
        if self.source is not None:
            self.source.count_data(nbytes)


class _Forward:
    """One forwarded connection: two paced pumps, each with its own delivery queue."""

    def __init__(self, shaper: LineShaper, cr: asyncio.StreamReader, cw: asyncio.StreamWriter,
                 tr: asyncio.StreamReader, tw: asyncio.StreamWriter) -> None:
        self.shaper = shaper
        self.writers = (cw, tw)
        self._pipes = [(cr, tw, shaper._up), (tr, cw, shaper._down)]
        self._tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        for reader, writer, direction in self._pipes:
            queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
            self._tasks.append(asyncio.ensure_future(self._transmit(reader, direction, queue)))
            self._tasks.append(asyncio.ensure_future(self._deliver(writer, queue)))
        try:
            await asyncio.gather(*self._tasks)
        except (asyncio.CancelledError, ConnectionError, OSError):
            pass
        finally:
            for writer in self.writers:
                if not writer.is_closing():
                    writer.close()

    async def _transmit(self, reader: asyncio.StreamReader, direction: _Direction,
                        queue: asyncio.Queue[tuple[float, bytes] | None]) -> None:
        shaper = self.shaper
        try:
            while True:
                data = await reader.read(shaper._chunk)
                if not data:
                    break
                sent_at = direction.book(len(data), time.monotonic())
                await asyncio.sleep(max(0.0, sent_at - time.monotonic()))
                if not shaper._open:
                    return
                direction.bytes += len(data)
                shaper._sent(len(data))
                queue.put_nowait((sent_at + shaper.latency, data))
        finally:
            queue.put_nowait(None)

    async def _deliver(self, writer: asyncio.StreamWriter,
                       queue: asyncio.Queue[tuple[float, bytes] | None]) -> None:
        while True:
            item = await queue.get()
            if item is None:
                if writer.can_write_eof() and not writer.is_closing():
                    writer.write_eof()
                return
            due, data = item
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()

    def abort(self) -> None:
        for writer in self.writers:
            _abort(writer)
        for task in self._tasks:
            task.cancel()


def _abort(writer: asyncio.StreamWriter) -> None:
    # A reset, not a polite close: the line is gone and the peer must not mistake the
    # cut for the end of the data (zero linger makes close() send RST instead of FIN).
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()
