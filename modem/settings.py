"""The ``[link]`` table, validated once into typed settings.

The gateway's config loader hands over the table's ``type`` and the rest of its keys;
``LinkSettings.from_options`` checks every key against the chosen backend and raises
``LinkConfigError(key, message)`` for the first problem.  Code below never sees raw
dicts.

Durations are seconds as a number, or a string with a unit: ``"500ms"``, ``"30s"``,
``"2m"``, ``"1h"``.
"""
from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modem.errors import LinkConfigError
from modem.hayes import DEFAULT_GUARD_TIME, DEFAULT_INIT, DialPlan
from modem.simulator import SimKnobs

LINK_TYPES = ("modem", "command", "always-on", "sim")

DEFAULT_PPPD_OPTIONS = ("noauth", "defaultroute", "usepeerdns", "nodetach")

_DIALER_KEYS = {"device", "url", "baud", "init", "numbers", "number", "dial_method", "attempts_per_number",
                "redial_delay", "give_up_after", "connect_timeout", "command_timeout", "guard_time"}
_KEYS = {
    "modem": _DIALER_KEYS | {"pppd_path", "pppd_options", "interface", "up_timeout"},
    "command": {"up_command", "down_command", "interface", "check_command", "up_timeout", "check_interval"},
    "always-on": {"interface"},
    "sim": (_DIALER_KEYS - {"device", "url"}) | {"rate", "protocol", "busy", "no_answer", "no_dialtone",
                                                 "no_carrier", "dial_delay", "drop_after_seconds",
                                                 "drop_after_bytes", "latency_ms", "forward", "interface"},
}


@dataclass(frozen=True)
class DialerSettings:
    """How the Hayes driver talks to the modem and what it dials."""

    device: str  # a tty path (/dev/ttyS0, /dev/ttyACM0) or a pyserial URL (sim://, rfc2217://)
    numbers: tuple[str, ...]
    baud: int = 115200
    init: tuple[str, ...] = DEFAULT_INIT
    dial_method: str = "tone"
    attempts_per_number: int = 3
    redial_delay: float = 30.0
    give_up_after: float | None = 600.0
    connect_timeout: float = 60.0
    command_timeout: float = 5.0
    guard_time: float = DEFAULT_GUARD_TIME

    def plan(self) -> DialPlan:
        return DialPlan(numbers=self.numbers, init=self.init, dial_method=self.dial_method,
                        attempts_per_number=self.attempts_per_number, redial_delay=self.redial_delay,
                        give_up_after=self.give_up_after, connect_timeout=self.connect_timeout,
                        command_timeout=self.command_timeout)


@dataclass(frozen=True)
class PppdSettings:
    path: str = "/usr/sbin/pppd"
    options: tuple[str, ...] = DEFAULT_PPPD_OPTIONS
    interface: str = "ppp0"
    up_timeout: float = 60.0


@dataclass(frozen=True)
class CommandSettings:
    up_command: str | tuple[str, ...]
    down_command: str | tuple[str, ...] | None
    interface: str | None
    check_command: str | tuple[str, ...] | None
    up_timeout: float = 60.0
    check_interval: float = 2.0


@dataclass(frozen=True)
class Route:
    """Traffic to ``listen`` is carried over the simulated line to ``target`` (the ISP)."""

    listen_host: str
    listen_port: int
    target_host: str
    target_port: int

    def __str__(self) -> str:
        return f"{self.listen_host}:{self.listen_port}->{self.target_host}:{self.target_port}"

    @classmethod
    def parse(cls, text: str) -> Route:
        left, sep, right = text.partition("->")
        if not sep:
            raise ValueError(f"{text!r} is not HOST:PORT->HOST:PORT")
        lh, lp = _host_port(left)
        th, tp = _host_port(right)
        return cls(lh, lp, th, tp)


@dataclass(frozen=True)
class SimSettings:
    knobs: SimKnobs
    latency_ms: float = 0.0
    routes: tuple[Route, ...] = ()


@dataclass(frozen=True)
class LinkSettings:
    type: str
    interface: str | None = None
    dialer: DialerSettings | None = None  # modem, sim
    pppd: PppdSettings | None = None  # modem
    command: CommandSettings | None = None  # command
    sim: SimSettings | None = None  # sim

    @classmethod
    def from_options(cls, type: str, options: dict[str, Any]) -> LinkSettings:
        if type not in LINK_TYPES:
            raise LinkConfigError("type", f"must be one of {', '.join(LINK_TYPES)}, not {type!r}")
        allowed = _KEYS[type]
        for key in options:
            if key not in allowed:
                raise LinkConfigError(key, f"unknown key for type = {type!r} "
                                           f"(known: {', '.join(sorted(allowed))})")
        read = _Reader(options)
        if type == "always-on":
            return cls(type, interface=read.text("interface", None))
        if type == "command":
            up = read.command("up_command")
            if up is None:
                raise LinkConfigError("up_command", "is required for type = 'command' (e.g. \"pon isp\")")
            interface = read.text("interface", None)
            check = read.command("check_command")
            if interface is None and check is None:
                raise LinkConfigError("interface", "give an interface to wait for, or a check_command")
            command = CommandSettings(up, read.command("down_command"), interface, check,
                                      up_timeout=read.duration("up_timeout", 60.0),
                                      check_interval=read.duration("check_interval", 2.0))
            return cls(type, interface=interface, command=command)
        if type == "modem":
            device = read.text("device", None) or read.text("url", None)
            if device is None:
                raise LinkConfigError("device", "is required for type = 'modem' (e.g. \"/dev/ttyS0\")")
            if "://" in device:
                raise LinkConfigError("device", f"pppd needs a tty path such as /dev/ttyS0, not {device!r}")
            dialer = _dialer(read, device, default_numbers=None)
            interface = read.text("interface", "ppp0") or "ppp0"
            pppd = PppdSettings(path=read.text("pppd_path", "/usr/sbin/pppd") or "/usr/sbin/pppd",
                                options=read.words("pppd_options", DEFAULT_PPPD_OPTIONS),
                                interface=interface, up_timeout=read.duration("up_timeout", 60.0))
            return cls(type, interface=interface, dialer=dialer, pppd=pppd)
        # sim
        knob_values = {k: options[k] for k in ("rate", "busy", "no_answer", "no_dialtone", "no_carrier",
                                                 "dial_delay", "drop_after_seconds", "drop_after_bytes",
                                                 "guard_time") if k in options}
        for key in ("dial_delay", "drop_after_seconds", "guard_time"):
            if key in knob_values:
                knob_values[key] = read.duration(key, None)
        for key in ("rate", "busy", "no_answer", "no_dialtone", "no_carrier", "drop_after_bytes"):
            if key in knob_values:
                read.integer(key, 0, minimum=1 if key in ("rate", "drop_after_bytes") else 0)
        if "protocol" in options:
            knob_values["protocol"] = read.text("protocol", "")
        try:
            knobs = SimKnobs.from_mapping(knob_values)
        except ValueError as exc:
            raise LinkConfigError("rate", str(exc)) from None
        routes = []
        for item in read.text_list("forward", ()):
            try:
                routes.append(Route.parse(item))
            except ValueError as exc:
                raise LinkConfigError("forward", str(exc)) from None
        latency = read.number("latency_ms", 0.0, minimum=0.0)
        dialer = _dialer(read, "sim://", default_numbers=("5550100",))
        sim = SimSettings(knobs=knobs, latency_ms=latency, routes=tuple(routes))
        return cls(type, interface=read.text("interface", None), dialer=dialer, sim=sim)


def _dialer(read: _Reader, device: str, default_numbers: tuple[str, ...] | None) -> DialerSettings:
    numbers = read.text_list("numbers", ())
    single = read.text("number", None)
    if single:
        numbers = (single, *numbers)
    if not numbers:
        if default_numbers is None:
            raise LinkConfigError("numbers", "give at least one phone number to dial, e.g. numbers = [\"0845 555 0100\"]")
        numbers = default_numbers
    for number in numbers:
        if not re.fullmatch(r"[0-9*#,WwPp!@ ()\-+]+", number):
            raise LinkConfigError("numbers", f"{number!r} has characters a modem cannot dial")
    method = read.text("dial_method", "tone")
    if method not in ("tone", "pulse"):
        raise LinkConfigError("dial_method", f"must be 'tone' or 'pulse', not {method!r}")
    init = read.text_list("init", DEFAULT_INIT)
    for text in init:
        if not text.upper().startswith("AT"):
            raise LinkConfigError("init", f"{text!r} does not start with AT")
    give_up = read.raw.get("give_up_after", 600.0)
    return DialerSettings(
        device=device,
        numbers=tuple(n.replace(" ", "").replace("-", "").replace("(", "").replace(")", "") for n in numbers),
        baud=read.integer("baud", 115200, minimum=300),
        init=init,
        dial_method=method,  # type: ignore[arg-type]
        attempts_per_number=read.integer("attempts_per_number", 3, minimum=1),
        redial_delay=read.duration("redial_delay", 30.0),
        give_up_after=None if give_up in ("never", 0, False) else read.duration("give_up_after", 600.0),
        connect_timeout=read.duration("connect_timeout", 60.0, positive=True),
        command_timeout=read.duration("command_timeout", 5.0, positive=True),
        guard_time=read.duration("guard_time", DEFAULT_GUARD_TIME, positive=True),
    )


_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError("a duration, not true/false")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", value.lower())
        if m and (m.group(2) or "s") in _UNITS:
            return float(m.group(1)) * _UNITS[m.group(2) or "s"]
    raise ValueError(f"{value!r} is not a duration (use seconds, or e.g. \"30s\", \"2m\")")


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text.strip()!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass
class _Reader:
    raw: dict[str, Any]
    _seen: set[str] = field(default_factory=set)

    def _get(self, key: str, default: Any, check: Callable[[Any], Any]) -> Any:
        if key not in self.raw:
            return default
        try:
            return check(self.raw[key])
        except (ValueError, TypeError) as exc:
            raise LinkConfigError(key, str(exc)) from None

    def text(self, key: str, default: str | None) -> str | None:
        def check(v: Any) -> str:
            if not isinstance(v, str):
                raise TypeError(f"must be a string, not {v!r}")
            return v.strip()
        return self._get(key, default, check)

    def text_list(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        def check(v: Any) -> tuple[str, ...]:
            if isinstance(v, str):
                v = [v]
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise ValueError("must be a list of strings")
            return tuple(x.strip() for x in v if x.strip())
        return self._get(key, default, check)

    def words(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        def check(v: Any) -> tuple[str, ...]:
            if isinstance(v, str):
                return tuple(shlex.split(v))
            if isinstance(v, list) and all(isinstance(x, str) for x in v):
                return tuple(v)
            raise ValueError("must be a list of strings or one string of options")
        return self._get(key, default, check)

    def command(self, key: str) -> str | tuple[str, ...] | None:
        def check(v: Any) -> str | tuple[str, ...]:
            if isinstance(v, str) and v.strip():
                return v.strip()
            if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
                return tuple(v)
            raise ValueError("must be a shell command string or a list of arguments")
        return self._get(key, None, check)

    def integer(self, key: str, default: int, minimum: int = 0) -> int:
        def check(v: Any) -> int:
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"must be a whole number of at least {minimum}, not {v!r}")
            return v
        return self._get(key, default, check)

    def number(self, key: str, default: float, minimum: float = 0.0) -> float:
        def check(v: Any) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < minimum:
                raise ValueError(f"must be a number of at least {minimum:g}, not {v!r}")
            return float(v)
        return self._get(key, default, check)

    def duration(self, key: str, default: float | None, positive: bool = False) -> float:
        def check(v: Any) -> float:
            seconds = parse_duration(v)
            if seconds < 0 or (positive and seconds == 0):
                raise ValueError(f"must be {'more than' if positive else 'at least'} 0 seconds")
            return seconds
        return self._get(key, default, check)
