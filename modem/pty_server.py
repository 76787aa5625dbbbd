"""The simulated modem on a pseudo-terminal, so real dialers (wvdial, chat, minicom,
dialmail's own driver) can open a tty path and dial it.

A pty has no modem status lines (TIOCMGET fails), so the dialer cannot see CD or drop
DTR.  What a pty does show is the dialer closing its end: that is treated like the
DTR drop a real port makes on close (HUPCL), so the simulated modem hangs up and the
next program to open the path finds it in command state.
"""
from __future__ import annotations

import asyncio
import errno
import os
import time
import tty
from pathlib import Path
from typing import Self

from modem.simulator import CarrierListener, SimKnobs, SimulatedModem

_REOPEN_POLL = 0.05


class PtyModemServer:
    """Serve one simulated modem on a pty until ``close()``; ``path`` links to the slave."""

    def __init__(self, knobs: SimKnobs | None = None, link: str | os.PathLike[str] | None = None) -> None:
        self.modem = SimulatedModem(knobs)
        self.link = Path(link) if link else None
        self.slave_name = ""
        self._master = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._poll: asyncio.TimerHandle | None = None
        self._pending = bytearray()
        self._client_open = False
        self.closed = asyncio.Event()

    @property
    def path(self) -> str:
        """What a dialer should open: the symlink if one was asked for, else /dev/pts/N."""
        return str(self.link) if self.link else self.slave_name

    @property
    def carrier(self) -> bool:
        return self.modem.carrier

    def add_carrier_listener(self, listener: CarrierListener) -> None:
        self.modem.add_carrier_listener(listener)

    def remove_carrier_listener(self, listener: CarrierListener) -> None:
        self.modem.remove_carrier_listener(listener)

    def count_data(self, nbytes: int) -> None:
        self.modem.count_data(nbytes, time.monotonic())
        self._after_change()

    def drop_carrier(self, reason: str = "the remote end hung up") -> None:
        self.modem.drop_carrier(time.monotonic(), reason)
        self._after_change()

    async def start(self) -> PtyModemServer:
        self._loop = asyncio.get_running_loop()
        # Only a stale symlink of ours may be replaced: the path could be a real device.
        if self.link is not None and self.link.exists() and not self.link.is_symlink():
            raise FileExistsError(f"{self.link} exists and is not a symlink; not replacing it")
        master, slave = os.openpty()
        # Raw from the start: a cooked slave would echo our own results back as commands.
        tty.setraw(slave)
        self.slave_name = os.ttyname(slave)
        os.close(slave)
        os.set_blocking(master, False)
        self._master = master
        if self.link is not None:
            if self.link.is_symlink():
                self.link.unlink()
            self.link.symlink_to(self.slave_name)
        self._wait_for_client()
        return self

    async def close(self) -> None:
        if self._master < 0:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._master)
            self._loop.remove_writer(self._master)
        for handle in (self._timer, self._poll):
            if handle is not None:
                handle.cancel()
        os.close(self._master)
        self._master = -1
        if self.link is not None and self.link.is_symlink():
            self.link.unlink()
        self.closed.set()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- I/O -------------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data = os.read(self._master, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            self._client_closed()
            return
        if data:
            self.modem.receive(data, time.monotonic())
            self._after_change()

    def _client_closed(self) -> None:
        # Every slave descriptor is closed: the dialer let go of the port.
        assert self._loop is not None
        self._loop.remove_reader(self._master)
        self._client_open = False
        self._pending.clear()
        self.modem.set_dtr(False, time.monotonic())
        self.modem.take_output()
        self._wait_for_client()

    def _wait_for_client(self) -> None:
        assert self._loop is not None
        if self._master < 0:
            return
        try:
            data = os.read(self._master, 4096)
        except BlockingIOError:
            data = b""
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            self._poll = self._loop.call_later(_REOPEN_POLL, self._wait_for_client)
            return
        # Someone opened the slave: DTR comes up with the port.
        self._client_open = True
        self.modem.set_dtr(True, time.monotonic())
        self._loop.add_reader(self._master, self._on_readable)
        if data:
            self.modem.receive(data, time.monotonic())
        self._after_change()

    def _after_change(self) -> None:
        out = self.modem.take_output()
        if out and self._client_open:
            self._pending += out
            self._flush()
        self._schedule_timer()

    def _flush(self) -> None:
        assert self._loop is not None
        while self._pending and self._master >= 0:
            try:
                sent = os.write(self._master, self._pending)
            except BlockingIOError:
                self._loop.add_writer(self._master, self._flush)
                return
            except OSError:
                self._pending.clear()
                return
            del self._pending[:sent]
        if self._master >= 0:
            self._loop.remove_writer(self._master)

    def _schedule_timer(self) -> None:
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.modem.next_deadline()
        if deadline is not None:
            delay = max(0.0, deadline - time.monotonic())
            self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.modem.tick(time.monotonic())
        self._after_change()
