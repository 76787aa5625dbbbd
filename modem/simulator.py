"""A simulated Hayes modem: the engine, and a thread-safe line around it.

``SimulatedModem`` is the modem's brain with the clock passed in (``now`` arguments),
so its timing (dial delay, guard time, carrier drop after N seconds) is exact and
testable.  Two front ends drive it:

- ``SimLine`` (here): a background thread keeps time; the pyserial ``sim://`` URL
  handler (``modem.urlhandler.protocol_sim``) reads and writes through it, and the
  line shaper listens to its carrier.
- ``modem.pty_server``: an asyncio loop on a pseudo-terminal master, so wvdial, chat
  and minicom can dial it.

Result codes and command parsing come from ``modem.hayes``, the same names the
driver reads.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace

from modem.hayes import (
    DEFAULT_GUARD_TIME,
    Command,
    CommandSyntaxError,
    Result,
    ResultCode,
    format_result,
    parse_command_line,
)

#: Called with (carrier, reason) whenever the carrier comes up or goes down.
CarrierListener = Callable[[bool, str], None]


@dataclass(frozen=True)
class SimKnobs:
    """What the simulated line does; the same names serve URL queries, CLI options and [link]."""

    rate: int = 33600
    protocol: tuple[str, ...] = ("ARQ", "V34", "LAPM", "V42BIS")
    # The script, in dial order: the first no_dialtone dials get NO DIALTONE, the next
    # busy get BUSY, then no_answer NO ANSWER, then no_carrier NO CARRIER (a voice
    # answered); every dial after that connects.
    busy: int = 0
    no_answer: int = 0
    no_dialtone: int = 0
    no_carrier: int = 0
    dial_delay: float = 1.0
    drop_after_seconds: float | None = None
    drop_after_bytes: int | None = None
    guard_time: float = DEFAULT_GUARD_TIME
    ident: str = "dialmail simulated modem V.34"

    @classmethod
    def from_mapping(cls, values: Mapping[str, str | int | float | None]) -> SimKnobs:
        """Build from text values (URL query, CLI); raises ValueError naming the bad knob."""
        kwargs: dict[str, object] = {}
        known = {f.name: f for f in fields(cls)}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name == "guard":
                name = "guard_time"
            if name not in known:
                raise ValueError(f"unknown simulated-modem knob {key!r}")
            if value is None or value == "":
                continue
            try:
                if name in ("rate", "busy", "no_answer", "no_dialtone", "no_carrier", "drop_after_bytes"):
                    number = int(value)
                    if number < 0 or (name == "rate" and number == 0):
                        raise ValueError
                    kwargs[name] = number
                elif name in ("dial_delay", "drop_after_seconds", "guard_time"):
                    seconds = float(value)
                    if seconds < 0:
                        raise ValueError
                    kwargs[name] = seconds
                elif name == "protocol":
                    kwargs[name] = tuple(p for p in str(value).split("/") if p)
                else:
                    kwargs[name] = str(value)
            except ValueError:
                raise ValueError(f"bad value {value!r} for simulated-modem knob {key!r}") from None
        return cls(**kwargs)  # type: ignore[arg-type]


_INFO = {
    "0": lambda k: ["33600"],
    "1": lambda k: ["255"],
    "2": lambda k: ["OK"],
    "3": lambda k: [k.ident],
    "4": lambda k: ["a007840C6C7D80", "b0F155FFF6F", "r1005111151010000"],
    "5": lambda k: ["009"],
    "6": lambda k: ["dialmail sim DSP rev 1"],
    "7": lambda k: ["Product type: simulated external"],
}


@dataclass
class _Settings:
    echo: bool = True
    verbose: bool = True
    quiet: bool = False
    dtr_mode: int = 2  # &D
    registers: dict[int, int] = field(default_factory=lambda: {0: 0, 2: 43, 3: 13, 4: 10, 5: 8,
                                                               7: 50, 12: 50})


class SimulatedModem:
    """The modem's behaviour.  Not thread-safe: one driver (a thread or a loop) owns it."""

    def __init__(self, knobs: SimKnobs | None = None) -> None:
        self.knobs = knobs or SimKnobs()
        self.settings = _Settings()
        self.settings.registers[12] = round(self.knobs.guard_time * 50)
        self.state = "command"  # command | dialing | online
        self.carrier = False
        self.dtr = True
        self.dials = 0
        self.connects = 0
        self.dialled: list[str] = []
        self.commands: list[str] = []  # every command line received, for tests and logs
        self.bytes_online = 0
        self._line = bytearray()
        self._out = bytearray()
        self._timers: dict[str, float] = {}
        self._last_rx = float("-inf")
        self._pluses = 0
        self._connected_at = 0.0
        self._listeners: list[CarrierListener] = []

    # -- observation -----------------------------------------------------------------

    def add_carrier_listener(self, listener: CarrierListener) -> None:
        self._listeners.append(listener)

    def remove_carrier_listener(self, listener: CarrierListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def take_output(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_deadline(self) -> float | None:
        return min(self._timers.values()) if self._timers else None

    @property
    def guard_time(self) -> float:
        return self.settings.registers.get(12, 50) / 50.0

    # -- inputs ----------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> None:
        """Bytes from the DTE (the computer)."""
        self._now_hint = now
        for byte in data:
            if self.state == "online":
                self._receive_online(byte, now)
            elif self.state == "dialing":
                # Any character aborts a dial in progress, as on a real modem.
                self._timers.pop("dial", None)
                self.state = "command"
                self._line.clear()
                self._result(Result(ResultCode.NO_CARRIER))
            else:
                self._receive_command(byte)
            self._last_rx = now

    def set_dtr(self, level: bool, now: float) -> None:
        was = self.dtr
        self.dtr = level
        if was and not level and self.settings.dtr_mode == 2 and self.state in ("online", "dialing"):
            self._hang_up(now, "the computer dropped DTR", announce=True)

    def count_data(self, nbytes: int, now: float) -> None:
        """Traffic carried over the connection by other means (the line shaper)."""
        if self.carrier:
            self._count(nbytes, now)

    def drop_carrier(self, now: float, reason: str = "the remote end hung up") -> None:
        if self.carrier or self.state == "dialing":
            self._hang_up(now, reason, announce=True)

    def tick(self, now: float) -> None:
        """Fire every timer due at ``now``."""
        self._now_hint = now
        for name, when in sorted(self._timers.items(), key=lambda item: item[1]):
            if when <= now and self._timers.get(name) == when:
                del self._timers[name]
                getattr(self, f"_fire_{name}")(now)

    # -- command state ---------------------------------------------------------------

    def _receive_command(self, byte: int) -> None:
        regs = self.settings.registers
        if self.settings.echo:
            self._out.append(byte)
        if byte == regs.get(3, 13):
            line = self._line.decode("ascii", "replace")
            self._line.clear()
            self._execute_line(line)
        elif byte == regs.get(5, 8):
            if self._line:
                self._line.pop()
        elif byte == 10:
            pass
        else:
            self._line.append(byte)
            if len(self._line) > 255:
                self._line.clear()

    def _execute_line(self, line: str) -> None:
        # Characters before "AT" are line noise (or a stray "+++"): real modems skip them.
        start = line.upper().find("AT")
        if start < 0:
            return
        body = line[start + 2:]
        self.commands.append("AT" + body)
        try:
            commands = parse_command_line(body)
        except CommandSyntaxError:
            self._result(Result(ResultCode.ERROR))
            return
        for command in commands:
            outcome = self._execute(command)
            if outcome is None:  # the command produced its own result (dial, online)
                return
            if outcome is False:
                self._result(Result(ResultCode.ERROR))
                return
        self._result(Result(ResultCode.OK))

    def _execute(self, command: Command) -> bool | None:
        name, arg = command.name, command.arg
        s = self.settings
        if name in ("Z", "&F"):
            self._reset_settings()
        elif name == "E":
            s.echo = arg != "0"
        elif name == "V":
            s.verbose = arg != "0"
        elif name == "Q":
            s.quiet = arg == "1"
        elif name == "&D":
            s.dtr_mode = int(arg or "0")
        elif name == "I":
            lines = _INFO.get(arg or "0")
            if lines is None:
                return False
            for text in lines(self.knobs):
                self._info(text)
        elif name == "H":
            if self.carrier:
                self._hang_up(None, "the computer sent ATH", announce=False)
        elif name == "O":
            if not self.carrier:
                self._result(Result(ResultCode.NO_CARRIER))
                return None
            self.state = "online"
            self._pluses = 0
            self._result(self._connect_result())
            return None
        elif name == "D":
            return self._dial(arg)
        elif name == "A":
            self._result(Result(ResultCode.NO_CARRIER))  # nobody is calling in
            return None
        elif name == "S":
            return self._register(arg)
        elif name.startswith("+") and arg.endswith("?"):
            self._info("0")
        # &C, &K, &W, L, M, X, W, \N, %C ...: accepted, no effect on a simulated line.
        return True

    def _register(self, arg: str) -> bool:
        number, _, rest = arg.partition("=")
        if arg.endswith("?"):
            reg = int(arg[:-1])
            self._info(f"{self.settings.registers.get(reg, 0):03d}")
            return True
        if not rest.isdigit() or not 0 <= int(rest) <= 255:
            return False
        self.settings.registers[int(number)] = int(rest)
        return True

    def _reset_settings(self) -> None:
        self.settings = _Settings()
        self.settings.registers[12] = round(self.knobs.guard_time * 50)

    def _dial(self, arg: str) -> bool | None:
        digits = arg.lstrip("TtPp").strip()
        if digits.endswith(";"):
            return True  # dial and stay in command state: nothing to connect
        if not digits or any(c not in "0123456789*#,WwPpTt!@ -()" for c in digits):
            return False
        if self.carrier:
            return False
        self.dials += 1
        self.dialled.append(digits)
        self.state = "dialing"
        self._timers["dial"] = self._now_hint + self.knobs.dial_delay
        return None

    # Commands run inside receive(), which knows the time; the dial timer needs it.
    _now_hint = 0.0

    def _fire_dial(self, now: float) -> None:
        self.state = "command"
        k = self.knobs
        n = self.dials
        for count, code in ((k.no_dialtone, ResultCode.NO_DIALTONE), (k.busy, ResultCode.BUSY),
                            (k.no_answer, ResultCode.NO_ANSWER), (k.no_carrier, ResultCode.NO_CARRIER)):
            if n <= count:
                self._result(Result(code))
                return
            n -= count
        self.state = "online"
        self.carrier = True
        self.connects += 1
        self.bytes_online = 0
        self._pluses = 0
        self._connected_at = now
        if k.drop_after_seconds is not None:
            self._timers["drop"] = now + k.drop_after_seconds
        self._result(self._connect_result())
        self._notify(True, f"connected at {k.rate} bps")

    def _connect_result(self) -> Result:
        return Result(ResultCode.CONNECT, rate=self.knobs.rate, protocol=self.knobs.protocol)

    # -- online state ----------------------------------------------------------------

    def _receive_online(self, byte: int, now: float) -> None:
        guard = self.guard_time
        plus = byte == ord("+")
        if plus and self._pluses == 0 and now - self._last_rx >= guard:
            self._pluses = 1
        elif plus and 0 < self._pluses < 3 and now - self._last_rx < guard:
            self._pluses += 1
        else:
            self._pluses = 0
            self._timers.pop("escape", None)
        if self._pluses == 3:
            self._timers["escape"] = now + guard
        self._count(1, now)

    def _fire_escape(self, now: float) -> None:
        if self._pluses == 3 and self.state == "online":
            self._pluses = 0
            self.state = "command"
            self._line.clear()
            self._result(Result(ResultCode.OK))

    def _fire_drop(self, now: float) -> None:
        self.drop_carrier(now, f"the line dropped after {now - self._connected_at:.1f} s "
                               f"(simulated drop_after_seconds={self.knobs.drop_after_seconds:g})")

    def _count(self, nbytes: int, now: float) -> None:
        self.bytes_online += nbytes
        limit = self.knobs.drop_after_bytes
        if limit is not None and self.bytes_online >= limit:
            self.drop_carrier(now, f"the line dropped after {self.bytes_online} bytes "
                                   f"(simulated drop_after_bytes={limit})")

    def _hang_up(self, now: float | None, reason: str, announce: bool) -> None:
        had_carrier = self.carrier
        self._timers.clear()
        self._pluses = 0
        self.carrier = False
        self.state = "command"
        self._line.clear()
        if announce:
            self._result(Result(ResultCode.NO_CARRIER))
        if had_carrier:
            self._notify(False, reason)

    # -- output ----------------------------------------------------------------------

    def _result(self, result: Result) -> None:
        if not self.settings.quiet:
            self._out += format_result(result, self.settings.verbose)

    def _info(self, text: str) -> None:
        if self.settings.verbose:
            self._out += b"\r\n" + text.encode("ascii") + b"\r\n"
        else:
            self._out += text.encode("ascii") + b"\r\n"

    def _notify(self, carrier: bool, reason: str) -> None:
        for listener in list(self._listeners):
            listener(carrier, reason)


class SimLine:
    """A simulated modem on its own thread, shared by a serial port object and the shaper.

    The thread fires the engine's timers; readers block on a condition until output
    arrives.  Carrier listeners run on that thread (or the writer's): keep them short
    and hand work to an event loop with ``call_soon_threadsafe``.
    """

    def __init__(self, knobs: SimKnobs | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.modem = SimulatedModem(knobs)
        self._clock = clock
        self._cond = threading.Condition()
        self._output = bytearray()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="sim-modem", daemon=True)
        self._thread.start()

    @property
    def knobs(self) -> SimKnobs:
        return self.modem.knobs

    @property
    def carrier(self) -> bool:
        return self.modem.carrier

    def add_carrier_listener(self, listener: CarrierListener) -> None:
        with self._cond:
            self.modem.add_carrier_listener(listener)

    def remove_carrier_listener(self, listener: CarrierListener) -> None:
        with self._cond:
            self.modem.remove_carrier_listener(listener)

    def write(self, data: bytes) -> None:
        self._apply(lambda now: self.modem.receive(data, now))

    def set_dtr(self, level: bool) -> None:
        self._apply(lambda now: self.modem.set_dtr(level, now))

    def count_data(self, nbytes: int) -> None:
        self._apply(lambda now: self.modem.count_data(nbytes, now))

    def drop_carrier(self, reason: str = "the remote end hung up") -> None:
        self._apply(lambda now: self.modem.drop_carrier(now, reason))

    def set_knobs(self, **changes: object) -> None:
        with self._cond:
            self.modem.knobs = replace(self.modem.knobs, **changes)  # type: ignore[arg-type]

    def read(self, size: int, timeout: float | None) -> bytes:
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while not self._output and not self._closed:
                remaining = None if deadline is None else deadline - self._clock()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(remaining)
            data = bytes(self._output[:size])
            del self._output[:size]
            return data

    @property
    def in_waiting(self) -> int:
        with self._cond:
            return len(self._output)

    def discard_output(self) -> None:
        with self._cond:
            self._output.clear()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _apply(self, change: Callable[[float], None]) -> None:
        with self._cond:
            now = self._clock()
            change(now)
            self._collect()
            self._cond.notify_all()

    def _collect(self) -> None:
        out = self.modem.take_output()
        if out:
            self._output += out

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                deadline = self.modem.next_deadline()
                now = self._clock()
                if deadline is not None and deadline <= now:
                    self.modem.tick(now)
                    self._collect()
                    self._cond.notify_all()
                    continue
                self._cond.wait(None if deadline is None else deadline - now)


# Named lines let a ``sim://NAME`` URL attach to a line that the shaper also watches.
_lines: dict[str, SimLine] = {}
_lines_lock = threading.Lock()


def register_line(name: str, line: SimLine) -> None:
    with _lines_lock:
        _lines[name] = line


def unregister_line(name: str) -> None:
    with _lines_lock:
        _lines.pop(name, None)


def find_line(name: str) -> SimLine | None:
    with _lines_lock:
        return _lines.get(name)
