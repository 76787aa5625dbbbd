"""The link behind one interface, whatever brings it up.

    link = open_link(settings)            # settings: modem.settings.LinkSettings
    async with link.up() as info:         # dials / runs pon / nothing / the simulator
        ...                               # info.rate, info.interface, info.started
        await info.wait_carrier_lost()    # or watch info.carrier_lost (an asyncio.Event)

Leaving the block hangs up: on normal exit, on an exception and on cancellation, even
if the task is cancelled again while hanging up.  A failure to come up raises a
``modem.errors.LinkError`` whose message says why in plain words (and nothing is left
off-hook).
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from modem.driver import HayesModem
from modem.errors import LinkConfigError, LinkUpFailed
from modem.settings import DialerSettings, LinkSettings
from modem.shaper import LineShaper
from modem.simulator import SimLine, register_line, unregister_line

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass
class LinkInfo:
    """What the session gets while the link is up."""

    backend: str
    started: datetime
    rate: int | None = None  # bits per second, as the modem reported at CONNECT
    interface: str | None = None
    protocol: str | None = None  # e.g. "ARQ/V34/LAPM/V42BIS"
    number: str | None = None  # the number that answered
    #: Where each forwarded route listens (sim backend), keyed by the route as configured.
    addresses: dict[str, tuple[str, int]] = field(default_factory=dict)
    carrier_lost: asyncio.Event = field(default_factory=asyncio.Event)
    loss_reason: str | None = None
    #: How the link was taken down, filled in on exit (e.g. "hung up by dropping DTR").
    hangup: str | None = None
    _counters: Callable[[], tuple[int, int]] | None = field(default=None, repr=False)

    @property
    def bytes_up(self) -> int | None:
        """Bytes carried towards the ISP so far: the shaper's count (sim) or the ppp
        interface's (modem, command with an interface); None where nothing counts them."""
        return self._counters()[0] if self._counters else None

    @property
    def bytes_down(self) -> int | None:
        return self._counters()[1] if self._counters else None

    def describe(self) -> str:
        parts = [self.backend]
        if self.rate:
            parts.append(f"{self.rate} bps")
        if self.protocol:
            parts.append(self.protocol)
        if self.interface:
            parts.append(f"on {self.interface}")
        return " ".join(parts)

    def lose_carrier(self, reason: str) -> None:
        if not self.carrier_lost.is_set():
            self.loss_reason = reason
            self.carrier_lost.set()

    async def wait_carrier_lost(self) -> str:
        """Return the reason once the link has gone down by itself."""
        await self.carrier_lost.wait()
        return self.loss_reason or "the link went down"


class Link(ABC):
    """One way of getting online.  ``up()`` may be entered again after it has exited."""

    def __init__(self, settings: LinkSettings, progress: Progress | None = None) -> None:
        self.settings = settings
        self.progress: Progress = progress or (lambda text: log.info("%s", text))
        self._tasks: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def up(self) -> AsyncIterator[LinkInfo]:
        info: LinkInfo | None = None
        try:
            info = await self._bring_up()
            yield info
        finally:
            await _complete_despite_cancel(self._shut_down(info))

    async def _shut_down(self, info: LinkInfo | None) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()
        try:
            how = await self._take_down(info)
        except Exception as exc:  # noqa: BLE001 - a failed hang-up must not hide the session's own error
            log.warning("taking the link down failed: %s", exc)
            how = f"taking the link down failed: {exc}"
        if info is not None:
            info.hangup = how
        if how:
            self.progress(how)

    def _watch(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @abstractmethod
    async def _bring_up(self) -> LinkInfo: ...

    @abstractmethod
    async def _take_down(self, info: LinkInfo | None) -> str | None: ...


async def _complete_despite_cancel(coro) -> None:
    """Run ``coro`` to the end even if our task is cancelled meanwhile; then re-raise that."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                break
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


def _now() -> datetime:
    return datetime.now(UTC)


# --- always-on ------------------------------------------------------------------------


class AlwaysOnLink(Link):
    """Broadband, a LAN, or tests: there is nothing to bring up."""

    async def _bring_up(self) -> LinkInfo:
        return LinkInfo("always-on", _now(), interface=self.settings.interface)

    async def _take_down(self, info: LinkInfo | None) -> str | None:
        return None


# --- shared helpers -------------------------------------------------------------------


def interface_counters(name: str) -> Callable[[], tuple[int, int]] | None:
    """Bytes sent and received on ``name`` since now, from the kernel's counters.

    Used for ppp interfaces, which exist only for this call, so every byte on them is
    the session's.  None if the interface has no counters.
    """
    base = Path("/sys/class/net", name, "statistics")

    def read() -> tuple[int, int] | None:
        try:
            return (int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text()))
        except (OSError, ValueError):
            return None

    start = read()
    if start is None:
        return None
    last = [start]

    def since_start() -> tuple[int, int]:
        now = read()
        if now is not None:  # once pppd has removed the interface, keep the final figures
            last[0] = now
        return (last[0][0] - start[0], last[0][1] - start[1])
    return since_start


def interface_is_up(name: str) -> bool:
    """The kernel's IFF_UP flag for ``name`` (False if there is no such interface)."""
    try:
        flags = Path("/sys/class/net", name, "flags").read_text().strip()
    except OSError:
        return False
    return bool(int(flags, 16) & 0x1)


async def _spawn(command: str | tuple[str, ...]) -> asyncio.subprocess.Process:
    if isinstance(command, str):
        return await asyncio.create_subprocess_shell(
            command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    return await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True)


async def _run(command: str | tuple[str, ...], timeout: float) -> tuple[int | None, str]:
    """Run to completion (killed after ``timeout``); return status and the output's tail."""
    proc = await _spawn(command)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        await _stop_process(proc, 1.0)
        return None, f"still running after {timeout:g} s"
    except asyncio.CancelledError:
        await _stop_process(proc, 1.0)
        raise
    return proc.returncode, _tail(out)


def _tail(out: bytes | None, lines: int = 3) -> str:
    text = (out or b"").decode("utf-8", "replace").strip().splitlines()
    return " / ".join(text[-lines:])


async def _stop_process(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the process group, then SIGKILL after ``grace`` seconds."""
    if proc.returncode is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            await asyncio.wait_for(proc.wait(), wait)
            return
        except TimeoutError:
            continue


def _describe_command(command: str | tuple[str, ...]) -> str:
    return command if isinstance(command, str) else " ".join(command)


# --- command (pon / poff) -------------------------------------------------------------


class CommandLink(Link):
    """User-supplied up and down commands, e.g. ``pon isp`` / ``poff isp``."""

    def __init__(self, settings: LinkSettings, progress: Progress | None = None) -> None:
        super().__init__(settings, progress)
        assert settings.command is not None
        self.config = settings.command
        self._proc: asyncio.subprocess.Process | None = None

    async def _ready(self) -> bool:
        if self.config.interface is not None and not interface_is_up(self.config.interface):
            return False
        if self.config.check_command is not None:
            status, _ = await _run(self.config.check_command, max(self.config.check_interval, 5.0))
            return status == 0
        return True

    async def _bring_up(self) -> LinkInfo:
        cfg = self.config
        self.progress(f"running {_describe_command(cfg.up_command)}")
        self._proc = proc = await _spawn(cfg.up_command)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.up_timeout
        output = asyncio.ensure_future(proc.stdout.read()) if proc.stdout else None
        waited_for = cfg.interface or _describe_command(cfg.check_command or "")
        while True:
            if proc.returncode is not None and proc.returncode != 0:
                tail = _tail(await output) if output else ""
                raise LinkUpFailed(f"the up command {_describe_command(cfg.up_command)!r} failed "
                                   f"with exit status {proc.returncode}" + (f": {tail}" if tail else ""))
            if await self._ready():
                break
            if loop.time() >= deadline:
                raise LinkUpFailed(f"the link did not come up within {cfg.up_timeout:g} s "
                                   f"(waited for {waited_for})")
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), 0.2)
            except TimeoutError:
                pass
        info = LinkInfo("command", _now(), interface=cfg.interface,
                        _counters=interface_counters(cfg.interface) if cfg.interface else None)
        self._watch(self._watch_link(info))
        return info

    async def _watch_link(self, info: LinkInfo) -> None:
        proc = self._proc
        while True:
            await asyncio.sleep(self.config.check_interval)
            if not await self._ready():
                what = (f"interface {self.config.interface} went down" if self.config.interface
                        and not interface_is_up(self.config.interface) else "the check command failed")
                info.lose_carrier(what)
                return
            if proc is not None and proc.returncode not in (None, 0):
                info.lose_carrier(f"the up command ended with exit status {proc.returncode}")
                return

    async def _take_down(self, info: LinkInfo | None) -> str | None:
        how = None
        if self.config.down_command is not None:
            status, tail = await _run(self.config.down_command, self.config.up_timeout)
            how = f"ran {_describe_command(self.config.down_command)}"
            if status != 0:
                how += f" (exit status {status}{': ' + tail if tail else ''})"
        if self._proc is not None:
            await _stop_process(self._proc, 2.0)
            self._proc = None
        return how


# --- modem + pppd ---------------------------------------------------------------------

#: pppd's exit statuses (pppd(8) "EXIT STATUS"), as a user would want them told.
PPPD_EXIT = {
    0: "pppd finished normally (the peer closed the connection)",
    1: "pppd hit a fatal error",
    2: "pppd rejected its options: check [link] pppd_options",
    3: "pppd is not setuid-root and needs privileges",
    4: "the kernel has no PPP support (no /dev/ppp)",
    5: "pppd was stopped by a signal",
    6: "the serial port is locked by another program",
    7: "pppd could not open the serial port",
    8: "the connect script failed",
    9: "the pty command could not be run",
    10: "PPP negotiation with the ISP failed",
    11: "the ISP failed to authenticate itself",
    12: "the link was idle too long",
    13: "the connect time limit was reached",
    14: "callback was negotiated",
    15: "the ISP stopped answering LCP echo requests",
    16: "the modem hung up",
    17: "the line is looped back",
    18: "the init script failed",
    19: "the ISP refused our user name or password",
}


def explain_pppd_exit(status: int | None) -> str:
    if status is None:
        return "pppd is still running"
    if status < 0:
        return f"pppd was killed by signal {-status}"
    return PPPD_EXIT.get(status, f"pppd ended with status {status}")


class ModemLink(Link):
    """Dial with the Hayes driver, then hand the port to pppd until the session ends."""

    def __init__(self, settings: LinkSettings, progress: Progress | None = None) -> None:
        super().__init__(settings, progress)
        assert settings.dialer is not None and settings.pppd is not None
        self.dialer = settings.dialer
        self.pppd = settings.pppd
        self.modem: HayesModem | None = None
        self._proc: asyncio.subprocess.Process | None = None

    def pppd_command(self, device: str) -> list[str]:
        options = list(self.pppd.options)
        # pppd must stay our child: its exit is how a dropped line is noticed, and
        # stopping it is how the link comes down.  A detached pppd would look like one
        # that exited at once.
        if "nodetach" not in options and "-detach" not in options:
            options.append("nodetach")
        return [self.pppd.path, device, str(self.dialer.baud), *options]

    async def _bring_up(self) -> LinkInfo:
        modem = self.modem = _driver_for(self.dialer, self.progress)
        await modem.open()
        device = modem.device_path
        if device is None:
            raise LinkConfigError("device", "pppd needs a tty path (e.g. /dev/ttyS0), not a URL")
        connected = await modem.dial(self.dialer.plan())
        info = LinkInfo("modem", _now(), rate=connected.result.rate, interface=self.pppd.interface,
                        protocol="/".join(connected.result.protocol) or None, number=connected.number)
        # pppd reads the line from now on; we keep the port open so DTR stays up.
        await modem.release_data_stream()
        argv = self.pppd_command(device)
        self.progress(f"starting {' '.join(argv)}")
        try:
            self._proc = proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            raise LinkUpFailed(f"cannot start pppd ({self.pppd.path}): {exc}") from None
        output = asyncio.ensure_future(proc.stdout.read()) if proc.stdout else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.pppd.up_timeout
        while not interface_is_up(self.pppd.interface):
            if proc.returncode is not None:
                tail = _tail(await output) if output else ""
                raise LinkUpFailed(f"{explain_pppd_exit(proc.returncode)}"
                                   f" (pppd exit status {proc.returncode})" + (f": {tail}" if tail else ""))
            if loop.time() >= deadline:
                raise LinkUpFailed(f"{self.pppd.interface} did not come up within "
                                   f"{self.pppd.up_timeout:g} s of CONNECT")
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), 0.1)
            except TimeoutError:
                pass
        self.progress(f"{self.pppd.interface} is up")
        info._counters = interface_counters(self.pppd.interface)
        self._watch(self._watch_pppd(info, proc))
        self._watch(self._watch_modem(info, modem))
        return info

    async def _watch_pppd(self, info: LinkInfo, proc: asyncio.subprocess.Process) -> None:
        status = await proc.wait()
        info.lose_carrier(f"pppd ended: {explain_pppd_exit(status)}")

    async def _watch_modem(self, info: LinkInfo, modem: HayesModem) -> None:
        await modem.carrier_lost.wait()
        info.lose_carrier(modem.loss_reason or "the modem lost carrier")

    async def _take_down(self, info: LinkInfo | None) -> str | None:
        if self._proc is not None:
            await _stop_process(self._proc, 5.0)
            self._proc = None
        how = None
        if self.modem is not None:
            modem, self.modem = self.modem, None
            try:
                if modem.is_open:
                    how = await modem.hang_up()
            finally:
                await modem.close()
        return how


def _driver_for(dialer: DialerSettings, progress: Progress, port: str | None = None) -> HayesModem:
    return HayesModem(port or dialer.device, dialer.baud, guard_time=dialer.guard_time,
                      command_timeout=dialer.command_timeout, progress=progress)


# --- simulated ------------------------------------------------------------------------

_sim_names = itertools.count(1)


class SimLink(Link):
    """The simulated modem, dialled by the real driver; the ISP is reached through the
    line shaper, which carries traffic only while the simulated carrier is up."""

    def __init__(self, settings: LinkSettings, progress: Progress | None = None) -> None:
        super().__init__(settings, progress)
        assert settings.sim is not None and settings.dialer is not None
        self.sim = settings.sim
        self.dialer = settings.dialer
        self.line: SimLine | None = None
        self.shaper: LineShaper | None = None
        self.modem: HayesModem | None = None
        self._name = ""

    async def _bring_up(self) -> LinkInfo:
        self._name = f"link{os.getpid()}-{next(_sim_names)}"
        self.line = line = SimLine(self.sim.knobs)
        register_line(self._name, line)
        self.shaper = shaper = LineShaper(self.sim.routes, self.sim.knobs.rate, self.sim.latency_ms / 1000, line)
        await shaper.start()
        modem = self.modem = _driver_for(self.dialer, self.progress, f"sim://{self._name}")
        await modem.open()
        connected = await modem.dial(self.dialer.plan())
        await shaper.open()
        info = LinkInfo("sim", _now(), rate=connected.result.rate, interface=self.settings.interface,
                        protocol="/".join(connected.result.protocol) or None, number=connected.number,
                        addresses={str(r): a for r, a in zip(self.sim.routes, shaper.addresses)},
                        _counters=lambda: (shaper.bytes_up, shaper.bytes_down))
        self._watch(self._watch_modem(info, modem))
        return info

    async def _watch_modem(self, info: LinkInfo, modem: HayesModem) -> None:
        await modem.carrier_lost.wait()
        info.lose_carrier(modem.loss_reason or "the simulated modem lost carrier")

    async def _take_down(self, info: LinkInfo | None) -> str | None:
        how = None
        try:
            if self.modem is not None:
                modem, self.modem = self.modem, None
                try:
                    if modem.is_open:
                        how = await modem.hang_up()
                finally:
                    await modem.close()
        finally:
            if self.shaper is not None:
                await self.shaper.close()
                self.shaper = None
            if self.line is not None:
                self.line.close()
                unregister_line(self._name)
                self.line = None
        return how


_BACKENDS: dict[str, type[Link]] = {
    "always-on": AlwaysOnLink,
    "command": CommandLink,
    "modem": ModemLink,
    "sim": SimLink,
}


def open_link(settings: LinkSettings, progress: Progress | None = None) -> Link:
    """The link for ``[link] type``; nothing is dialled until ``up()`` is entered."""
    return _BACKENDS[settings.type](settings, progress)
