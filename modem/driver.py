"""The Hayes driver: a pyserial port driven by ``modem.hayes`` from asyncio.

pyserial blocks, so one watcher thread per open port reads bytes (and polls the CD
line where the port can report it) and hands them to the event loop; writes and
status-line changes go through ``asyncio.to_thread``.  The dialogue decisions live in
``modem.hayes.Dialer``; this module only carries its actions out.
"""
from __future__ import annotations

import asyncio
import glob
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self

import serial

from modem import urlhandler
from modem.errors import DialFailed, ModemNotResponding, PortUnavailable
from modem.hayes import (
    ESCAPE_SEQUENCE,
    AbortDial,
    Connected,
    Dialer,
    DialPlan,
    GaveUp,
    Info,
    Pause,
    Paused,
    Reply,
    Result,
    ResultCode,
    ResultParser,
    SendCommand,
    TimedOut,
)

log = logging.getLogger(__name__)
# Every AT command and every line the modem answers, for the per-session transcript.
dialogue = logging.getLogger("modem.dialogue")

Progress = Callable[[str], None]

# DTR stays low at least this long: most modems take a drop of over 50 ms (S25) as "hang up".
DTR_MIN_HOLD = 0.1
_POLL = 0.05  # how often the watcher wakes to read or poll CD: carrier loss is seen within this


@dataclass
class CommandReply:
    result: Result | None  # None: no final result before the timeout
    info: list[str] = field(default_factory=list)


class HayesModem:
    """One modem on one port (a device path such as /dev/ttyS0, or a pyserial URL)."""

    def __init__(self, port: str, baud: int = 115200, *, guard_time: float = 1.0,
                 dtr_hold: float = 0.5, command_timeout: float = 5.0,
                 progress: Progress | None = None) -> None:
        self.port_name = port
        self.baud = baud
        self.guard_time = guard_time
        self.dtr_hold = dtr_hold
        self.command_timeout = command_timeout
        self._progress = progress or (lambda text: log.info("%s", text))
        self._port: serial.SerialBase | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._incoming: asyncio.Queue[bytes] = asyncio.Queue()
        self._parser = ResultParser()
        self._stop = threading.Event()
        self._reading = threading.Event()
        self._read_idle = threading.Event()
        self._released = False
        self._watcher: threading.Thread | None = None
        self._idle_task: asyncio.Task[None] | None = None
        self._cd_supported: bool | None = None
        self._last_cd: bool | None = None
        self.online = False
        self._in_command_state = True
        self.connection: Connected | None = None
        self.carrier_lost = asyncio.Event()
        self.loss_reason: str | None = None

    # -- port lifetime ---------------------------------------------------------------

    async def open(self) -> None:
        urlhandler.register()
        self._loop = asyncio.get_running_loop()

        def _open() -> serial.SerialBase:
            return serial.serial_for_url(self.port_name, baudrate=self.baud, timeout=_POLL,
                                         write_timeout=10, rtscts=False, dsrdtr=False)
        try:
            self._port = await asyncio.to_thread(_open)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise PortUnavailable(f"cannot open the modem port {self.port_name}: {exc}") from None
        self._cd_supported = self._probe_line(lambda p: p.cd)
        self._stop.clear()
        self._reading.set()
        self._watcher = threading.Thread(target=self._watch, name=f"modem {self.port_name}", daemon=True)
        self._watcher.start()

    async def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            await asyncio.to_thread(self._watcher.join, 2)
            self._watcher = None
        if self._port is not None:
            port, self._port = self._port, None
            await asyncio.to_thread(port.close)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def is_open(self) -> bool:
        return self._port is not None

    @property
    def device_path(self) -> str | None:
        """The tty path another program (pppd) can open, or None for URL ports."""
        return None if "://" in self.port_name else self.port_name

    def carrier(self) -> bool | None:
        """Carrier detect as the port reports it; None when it cannot (ptys, sockets)."""
        if not self._cd_supported or self._port is None:
            return None
        try:
            return bool(self._port.cd)
        except (OSError, serial.SerialException):
            return None

    def _probe_line(self, read: Callable[[serial.SerialBase], object]) -> bool:
        try:
            read(self._port)  # type: ignore[arg-type]
            return True
        except (OSError, serial.SerialException):
            return False

    # -- the watcher thread ----------------------------------------------------------

    def _watch(self) -> None:
        port = self._port
        assert port is not None and self._loop is not None
        while not self._stop.is_set():
            if self._reading.is_set():
                self._read_idle.clear()
                try:
                    data = port.read(max(1, port.in_waiting))
                except (OSError, serial.SerialException) as exc:
                    self._loop.call_soon_threadsafe(self._port_failed, str(exc))
                    return
                if data:
                    self._loop.call_soon_threadsafe(self._incoming.put_nowait, data)
            else:
                self._read_idle.set()
                self._stop.wait(_POLL)
            if self._cd_supported and self.online:
                try:
                    cd = bool(port.cd)
                except (OSError, serial.SerialException):
                    cd = None
                if cd is False and self._last_cd:
                    self._loop.call_soon_threadsafe(
                        self.mark_carrier_lost, "the modem dropped carrier detect (CD): the line went dead")
                self._last_cd = cd
        self._read_idle.set()

    def _port_failed(self, why: str) -> None:
        if self.online:
            self.mark_carrier_lost(f"the modem port failed: {why}")

    def mark_carrier_lost(self, reason: str) -> None:
        """Record the first reason the connection ended; later ones are consequences."""
        if self.online and not self.carrier_lost.is_set():
            self.loss_reason = reason
            self.carrier_lost.set()

    async def release_data_stream(self) -> None:
        """Stop reading so another program (pppd) owns the bytes; CD is still watched."""
        self._reading.clear()
        self._released = True
        await asyncio.to_thread(self._read_idle.wait, 2)

    async def reclaim_data_stream(self) -> None:
        """Read again, with our line settings: pppd leaves its own termios on the tty."""
        if self._released and self._port is not None:
            port = self._port

            def reapply() -> None:
                port.baudrate = port.baudrate  # pyserial rewrites every termios setting
            try:
                await asyncio.to_thread(reapply)
            except (OSError, serial.SerialException, ValueError):
                pass
        self._released = False
        self._reading.set()

    # -- the AT dialogue -------------------------------------------------------------

    def _need_port(self) -> serial.SerialBase:
        if self._port is None:
            raise PortUnavailable(f"the modem port {self.port_name} is not open")
        return self._port

    async def _write(self, data: bytes) -> None:
        port = self._need_port()
        await asyncio.to_thread(port.write, data)

    def _drain(self) -> None:
        while not self._incoming.empty():
            self._incoming.get_nowait()

    async def _read_result(self, timeout: float) -> CommandReply:
        reply = CommandReply(None)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    data = await self._incoming.get()
                    for event in self._parser.feed(data):
                        if isinstance(event, Info):
                            reply.info.append(event.text)
                        elif event.is_final:
                            reply.result = event
                            return reply
        except TimeoutError:
            return reply

    async def command(self, text: str, timeout: float | None = None) -> CommandReply:
        """Send one AT command line; wait for its final result."""
        self._drain()
        self._parser.back_to_command_state()
        dialogue.debug("> %s", text)
        await self._write(text.encode("ascii") + b"\r")
        reply = await self._read_result(self.command_timeout if timeout is None else timeout)
        for line in reply.info:
            dialogue.debug("< %s", line)
        dialogue.debug("< %s", (reply.result.text or reply.result.code.value) if reply.result else "(no answer)")
        # Echo (E1) comes back as an info line: it is not part of the answer.
        reply.info = [line for line in reply.info if line.strip().upper() != text.strip().upper()]
        return reply

    async def dial(self, plan: DialPlan) -> Connected:
        """Initialise and dial per ``plan``; raise DialFailed / ModemNotResponding with the reason."""
        dialer = Dialer(plan)
        action = dialer.start(time.monotonic())
        while True:
            if isinstance(action, Connected):
                self._progress(f"connected to {action.number} at {action.result.describe()}")
                self._go_online(action)
                return action
            if isinstance(action, GaveUp):
                if not action.failures:
                    raise ModemNotResponding(action.reason)
                raise DialFailed(action.reason, action.failures)
            if isinstance(action, SendCommand):
                if action.command.upper().startswith("ATD"):
                    number, attempt = dialer.current or ("?", 0)
                    self._progress(f"dialling {number} (attempt {attempt} of {plan.attempts_per_number})")
                reply = await self.command(action.command, action.timeout)
                event = (Reply(reply.result, time.monotonic()) if reply.result
                         else TimedOut(time.monotonic()))
                if isinstance(event, Reply) and action.command.upper().startswith("ATD") \
                        and event.result.code is not ResultCode.CONNECT:
                    self._progress(f"{action.command[4:]}: {event.result.code.value}")
            elif isinstance(action, AbortDial):
                self._progress("no result from the modem: aborting the dial")
                await self._write(b"\r")
                reply = await self._read_result(action.timeout)
                event = Reply(reply.result, time.monotonic()) if reply.result else TimedOut(time.monotonic())
            elif isinstance(action, Pause):
                self._progress(action.reason)
                await asyncio.sleep(action.seconds)
                event = Paused(time.monotonic())
            else:  # pragma: no cover - the action set is closed
                raise TypeError(action)
            action = dialer.handle(event)

    def _go_online(self, connected: Connected) -> None:
        self.connection = connected
        self._in_command_state = False
        self.carrier_lost.clear()
        self.loss_reason = None
        self.online = True
        self._last_cd = self.carrier()
        # What follows CONNECT on an idle line can only be the modem's NO CARRIER.
        leftover = bytes(self._parser.trailing)
        self._parser = ResultParser()
        self._watch_idle_line(leftover)

    def _watch_idle_line(self, first: bytes) -> None:
        async def watch() -> None:
            data = first
            while self.online:
                for event in self._parser.feed(data):
                    if isinstance(event, Result) and event.code is ResultCode.NO_CARRIER:
                        self._in_command_state = True
                        self.mark_carrier_lost("the modem reported NO CARRIER: the line dropped")
                        return
                data = await self._incoming.get()
        self._idle_task = asyncio.get_running_loop().create_task(watch())

    def _stop_idle_watch(self) -> None:
        if self._idle_task is not None:
            self._idle_task.cancel()
            self._idle_task = None

    # -- hanging up ------------------------------------------------------------------

    async def hang_up(self) -> str:
        """End the call: drop DTR; if the modem still has carrier (or the port cannot
        tell or cannot drop DTR), escape with ``+++`` and send ATH0.  Returns how."""
        self._stop_idle_watch()
        was_online = self.online
        self.online = False
        await self.reclaim_data_stream()
        port = self._need_port()
        how: list[str] = []
        dtr_dropped = False
        try:
            await asyncio.to_thread(setattr, port, "dtr", False)
            await self._hold_dtr_low()
            await asyncio.to_thread(setattr, port, "dtr", True)
            dtr_dropped = True
            how.append("dropped DTR")
        except (OSError, serial.SerialException):
            how.append("the port cannot drop DTR")
        if dtr_dropped and self.carrier() is False:
            return "hung up by dropping DTR"
        self._drain()
        self._parser = ResultParser()
        escape = not self._in_command_state
        if escape:
            # Guard time of silence, +++, guard time again: the modem returns to command state.
            await asyncio.sleep(self.guard_time)
            await self._write(ESCAPE_SEQUENCE)
            await asyncio.sleep(self.guard_time)
            await self._read_result(min(self.command_timeout, 1.0))
        reply = await self.command("ATH0")
        sent = "sent +++ and ATH0" if escape else "sent ATH0 (the modem had reported NO CARRIER)"
        if reply.result is not None and reply.result.code in (ResultCode.OK, ResultCode.NO_CARRIER):
            how.append(sent)
        else:
            how.append(sent + " without an answer")
        if self.carrier():
            how.append("but the port still reports carrier")
        log.debug("hang-up after online=%s: %s", was_online, how)
        return "hung up: " + ", ".join(how)

    async def _hold_dtr_low(self) -> None:
        """Keep DTR low until the modem has dropped carrier, and no longer: on a metered
        line every fraction of a second counts.  Where the port cannot report carrier,
        the whole ``dtr_hold``."""
        await asyncio.sleep(min(DTR_MIN_HOLD, self.dtr_hold))
        deadline = time.monotonic() + self.dtr_hold - DTR_MIN_HOLD
        while self.carrier() is not False and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    # -- identification --------------------------------------------------------------

    async def identify(self, init: tuple[str, ...] = (), queries: tuple[str, ...] = ("ATI0", "ATI3", "ATI4"),
                       ) -> dict[str, list[str] | str]:
        """Answer the questions ``dialmail modem probe`` asks; raise if the modem is silent."""
        found: dict[str, list[str] | str] = {}
        reply = await self.command("AT", min(self.command_timeout, 2.0))
        if reply.result is None or reply.result.code is not ResultCode.OK:
            reply = await self.command("AT", min(self.command_timeout, 2.0))  # first may be eaten by noise
        if reply.result is None:
            raise ModemNotResponding(f"no answer to AT on {self.port_name} at {self.baud} bps")
        for text in init:
            r = await self.command(text)
            found[text] = r.result.code.value if r.result else "no answer"
        for text in queries:
            r = await self.command(text)
            if r.result is not None and r.result.code is ResultCode.OK:
                found[text] = r.info
        return found


def candidate_ports() -> list[str]:
    """Where modems usually are, the way wvdialconf looks for them."""
    found = sorted(glob.glob("/dev/ttyACM*")) + sorted(glob.glob("/dev/ttyUSB*"))
    found += [p for p in (f"/dev/ttyS{i}" for i in range(4)) if glob.glob(p)]
    found += sorted(glob.glob("/dev/modem"))
    return found
