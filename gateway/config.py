"""The configuration file: one TOML file parsed and validated once into typed objects.

Everything below this module receives these dataclasses; nothing else reads raw
dicts or environment variables.  Every problem is a ``ConfigError`` that names the
file, the key and, where it can be found, the line.
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError

DEFAULT_PATH = Path("/etc/dialmail/dialmail.toml")
ENV_VAR = "DIALMAIL_CONFIG"

_SIZE_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1024, "M": 1000**2, "MB": 1000**2,
               "MIB": 1024**2, "G": 1000**3, "GB": 1000**3, "GIB": 1024**3}
_DURATION_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def client_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer's address as the policy sees it: zone dropped, IPv4-mapped IPv6 as IPv4."""
    try:
        addr = ipaddress.ip_address(str(ip).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


def is_loopback(ip: str) -> bool:
    addr = client_address(ip)
    return addr is not None and addr.is_loopback


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ServerConfig:
    hostname: str
    domains: tuple[str, ...]
    spool_dir: Path
    mynetworks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    postmaster: str

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self.domains

    def in_mynetworks(self, ip: str) -> bool:
        addr = client_address(ip)
        return addr is not None and any(addr in net for net in self.mynetworks)


@dataclass(frozen=True)
class SMTPConfig:
    listen: tuple[Listen, ...]
    max_message_size: int
    tls_cert: Path | None
    tls_key: Path | None
    max_connections: int
    min_free_space: int
    max_auth_failures: int = 5
    auth_lockout: int = 900


@dataclass(frozen=True)
class POP3Config:
    listen: tuple[Listen, ...]
    tls_cert: Path | None
    tls_key: Path | None
    allow_plaintext_lan: bool
    max_failures: int
    lockout: int


@dataclass(frozen=True)
class SmarthostConfig:
    host: str | None
    port: int
    starttls: str  # required | opportunistic | off
    username: str | None
    password_file: Path | None
    ca_file: Path | None
    timeout: float
    route: str  # smarthost | mx
    rewrite: tuple[tuple[str, str], ...]  # local address or @domain -> outside address
    connections: int = 1  # SMTP connections a flush uses at once

    def password(self) -> str | None:
        return read_secret(self.password_file, "smarthost.password_file") if self.password_file else None


@dataclass(frozen=True)
class QueueConfig:
    queue_lifetime: int
    delay_warning: int
    retry_min: int
    retry_max: int


@dataclass(frozen=True)
class FetchConfig:
    name: str
    host: str
    port: int
    tls: str  # imaps | starttls | off
    username: str
    password_file: Path | None
    folders: tuple[str, ...]
    mode: str  # single | multidrop
    deliver_to: str | None
    keep: bool
    keep_days: int | None
    envelope_header: str | None
    envelope_skip: int
    guess_from_headers: bool
    ca_file: Path | None
    max_message_size: int | None
    oversize: str  # leave | defer | delete
    max_messages: int | None
    max_bytes: int | None
    batch_size: int
    chunk_size: int
    offpeak: tuple[int, int] | None = None  # (start, end) minutes after local midnight, for oversize="defer"
    domains: tuple[str, ...] = ()  # ISP-side domains whose local parts are local users (multidrop)

    def password(self) -> str | None:
        return read_secret(self.password_file, f"fetch[{self.name}].password_file") if self.password_file else None


@dataclass(frozen=True)
class LinkConfig:
    type: str  # modem | command | always-on | sim
    options: dict[str, Any]  # the raw keys, kept for display
    settings: Any = None  # modem.settings.LinkSettings, validated by the modem package


@dataclass(frozen=True)
class ScheduleConfig:
    dial: tuple[str, ...]
    rules: tuple[Any, ...] = ()  # gateway.dialtimes.DialRule, one per dial string


@dataclass(frozen=True)
class DemandConfig:
    min_messages: int | None
    min_bytes: int | None
    urgent_after: int | None  # seconds an urgent message may wait
    urgent_senders: tuple[str, ...]
    collect_every: int | None  # seconds between collections even with nothing to send
    min_gap: int
    max_sessions_per_day: int | None
    max_minutes_per_day: float | None


@dataclass(frozen=True)
class SessionConfig:
    max_time: int
    idle_timeout: int
    retry_delay: int
    retry_count: int
    before: str | None
    after: str | None
    etrn_domains: tuple[str, ...]
    cost_per_call: float
    cost_per_minute: float
    currency: str


@dataclass(frozen=True)
class Config:
    path: Path | None
    server: ServerConfig
    smtp: SMTPConfig
    pop3: POP3Config
    smarthost: SmarthostConfig
    queue: QueueConfig
    fetch: tuple[FetchConfig, ...]
    link: LinkConfig
    schedule: ScheduleConfig
    demand: DemandConfig
    session: SessionConfig
    aliases: dict[str, tuple[str, ...]]
    raw: dict[str, Any] = field(repr=False, compare=False)
    policy: Any = None  # gateway.policy.settings.PolicySettings: block lists, virus scan, groups, replies
    source: str = field(default="", repr=False, compare=False)  # the file's text, for line numbers

    @property
    def spool_dir(self) -> Path:
        return self.server.spool_dir

    def where(self, section: str, key: str | None = None, index: int = 0) -> str:
        """``file:LINE: section.key`` for a problem found after loading (see gateway.preflight)."""
        return _Loader(self.path, self.source).where(section, key, index)


# ---------------------------------------------------------------- value parsers


def parse_size(value: Any) -> int:
    """``1048576``, ``"50MB"``, ``"10 MiB"`` -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 10485760 or \"50MB\"")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size (use bytes or a number with KB, MB, GB, KiB, MiB, GiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def parse_duration(value: Any) -> int:
    """``3600``, ``"4h"``, ``"4 days"``, ``"30m"`` -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 3600 or \"4h\"")
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", str(value).lower())
    unit = m.group(2) if m else None
    if unit is not None:
        unit = {"": "s", "second": "s", "seconds": "s", "secs": "s", "minute": "m", "minutes": "m",
                "mins": "m", "hour": "h", "hours": "h", "hr": "h", "day": "d", "days": "d",
                "week": "w", "weeks": "w"}.get(unit, unit)
    if not m or unit not in _DURATION_UNITS:
        raise ValueError(f"{value!r} is not a duration (use seconds or e.g. \"30m\", \"4h\", \"4d\")")
    return int(float(m.group(1)) * _DURATION_UNITS[unit])


def parse_window(value: Any) -> tuple[int, int]:
    """``"22:00-06:00"`` -> (1320, 360): minutes after local midnight; may wrap past midnight."""
    m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", str(value))
    if not m or int(m.group(1)) > 23 or int(m.group(3)) > 24 or int(m.group(2)) > 59 or int(m.group(4)) > 59:
        raise ValueError(f"{value!r} is not a time window like \"22:00-06:00\"")
    start, end = int(m.group(1)) * 60 + int(m.group(2)), int(m.group(3)) * 60 + int(m.group(4))
    if start == end:
        raise ValueError(f"{value!r} is an empty window")
    return start, end


def parse_listen(value: str, default_host: str = "0.0.0.0") -> Listen:
    text = str(value).strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\s]*):(\d+)|(\d+)", text)
    if not m:
        raise ValueError(f"{value!r} is not host:port")
    if m.group(1):
        host, port = m.group(1), m.group(2)
    elif m.group(4):
        host, port = m.group(3) or default_host, m.group(4)
    else:
        host, port = default_host, m.group(5)
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port} out of range")
    return Listen(host, int(port))


def read_secret(path: Path, key: str) -> str:
    """Read a password file, refusing one that others could read."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{key}: {path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                          f"run: chmod 600 {path}")
    return path.read_text(encoding="utf-8").strip("\r\n")


# ---------------------------------------------------------------- the loader


class _Section:
    """Typed access to one table, turning every problem into a ConfigError naming the key."""

    def __init__(self, loader: "_Loader", name: str, data: Any, known: set[str] | None = None, index: int = 0):
        self.loader, self.name, self.index = loader, name, index
        if data is None:
            data = {}
        if not isinstance(data, dict):
            loader.fail(name, None, "must be a table", index)
        self.data = data
        if known is not None:
            for key in data:
                if key not in known:
                    hint = _closest(key, known)
                    what = "unknown key"
                    if not name:  # the top level holds only sections
                        what = "unknown section" if isinstance(data[key], dict) else "unknown key"
                    loader.fail(name, key, what + (f" (did you mean {hint!r}?)" if hint else ""), index)

    def fail(self, key: str | None, msg: str):
        self.loader.fail(self.name, key, msg, self.index)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        if key not in self.data:
            if required:
                self.fail(key, "is required")
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            self.fail(key, f"expected {_kind_name(kind)}, got {value!r}")
        if not isinstance(value, kinds):
            self.fail(key, f"expected {_kind_name(kind)}, got {value!r}")
        return value

    def str_list(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.get(key, (list, str), None)
        if value is None:
            return tuple(default)
        if isinstance(value, str):
            value = [value]
        for item in value:
            if not isinstance(item, str):
                self.fail(key, f"expected a list of strings, got {item!r}")
        return tuple(value)

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            self.fail(key, f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
        return value

    def convert(self, key: str, fn, default: Any = None) -> Any:
        if key not in self.data:
            return default
        try:
            return fn(self.data[key])
        except ValueError as exc:
            self.fail(key, str(exc))

    def path(self, key: str, default: Path | None = None) -> Path | None:
        value = self.get(key, str, None)
        if value is None:
            return default
        p = Path(value).expanduser()
        if not p.is_absolute() and self.loader.base is not None:
            p = self.loader.base / p
        return p

    def port(self, key: str, default: int) -> int:
        value = self.get(key, int, default)
        if not 0 < value < 65536:
            self.fail(key, f"port {value} out of range 1-65535")
        return value

    def positive(self, key: str, default: int | None) -> int | None:
        value = self.get(key, int, default)
        if value is not None and value <= 0:
            self.fail(key, "must be a positive number")
        return value


def _kind_name(kind) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _closest(key: str, known: set[str]) -> str | None:
    import difflib
    found = difflib.get_close_matches(key, sorted(known), n=1)
    return found[0] if found else None


class _Loader:
    def __init__(self, path: Path | None, text: str):
        self.path, self.text = path, text
        self.base = path.parent if path else None
        self._lines: dict[str, int] | None = None

    def where(self, section: str, key: str | None, index: int = 0) -> str:
        name = ".".join(part for part in (section, key) if part)
        if self._lines is None:
            self._lines = key_lines(self.text)
        line = find_line(self._lines, section, key, index)
        loc = str(self.path) if self.path else "<config>"
        return f"{loc}:{line}: {name}" if line else f"{loc}: {name}"

    def fail(self, section: str, key: str | None, msg: str, index: int = 0):
        raise ConfigError(f"{self.where(section, key, index)}: {msg}")


# tomllib keeps no line numbers, so the lines are found again in the text: every table
# header and every key, by its full dotted path ("groups.support.mode"; the n-th [[fetch]]
# is "fetch[n]").  Good enough for pointing an admin at a line; not a TOML parser.
_KEY_PART = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_DOTTED = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_HEADER = re.compile(rf"\s*(\[\[?)\s*({_DOTTED})\s*\]\]?\s*(?:#.*)?$")
_ASSIGN = re.compile(rf"\s*({_DOTTED})\s*=")


def _key_path(dotted: str) -> list[str]:
    return [p[1:-1] if p[:1] in "\"'" else p for p in re.findall(_KEY_PART, dotted)]


def key_lines(text: str) -> dict[str, int]:
    """Line number of every table header and key in ``text``, by full dotted path."""
    lines: dict[str, int] = {}
    table: list[str] = []
    arrays: dict[str, int] = {}
    in_string = None  # the quote of a multi-line string being skipped
    for no, line in enumerate(text.splitlines(), 1):
        if in_string:
            if line.count(in_string) % 2:
                in_string = None
            continue
        m = _HEADER.match(line)
        if m:
            path = _key_path(m.group(2))
            if m.group(1) == "[[":
                joined = ".".join(path)
                arrays[joined] = arrays.get(joined, -1) + 1
                path = path[:-1] + [f"{path[-1]}[{arrays[joined]}]"]
            table = path
            lines.setdefault(".".join(table), no)
            continue
        m = _ASSIGN.match(line)
        if m:
            lines.setdefault(".".join(table + _key_path(m.group(1))), no)
            rest = line[m.end():]
            for quote in ('"""', "'''"):
                if rest.count(quote) % 2:
                    in_string = quote
    return lines


def find_line(lines: dict[str, int], section: str, key: str | None, index: int = 0) -> int | None:
    """The line of ``key`` in ``section``; else of the nearest enclosing table or inline table;
    else of the first line inside it.  ``index`` picks the n-th ``[[section]]``."""
    section = re.sub(r"^([^.\[]+)\[[^\]]*\]", rf"\g<1>[{index}]", section)
    target = ".".join(part for part in (section, key) if part)
    if target in lines:
        return lines[target]
    enclosing = [p for p in lines if target.startswith(p + ".")]
    if enclosing:
        return lines[max(enclosing, key=len)]
    inside = [no for p, no in lines.items() if p.startswith((target + ".", target + "["))]
    return min(inside) if inside else None


def find_config_path(explicit: str | os.PathLike | None, environ: dict[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    if explicit:
        return Path(explicit)
    if environ.get(ENV_VAR):
        return Path(environ[ENV_VAR])
    return DEFAULT_PATH


def load(path: str | os.PathLike | None = None, environ: dict[str, str] | None = None) -> Config:
    p = find_config_path(path, environ)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: configuration file not found (give --config PATH or set ${ENV_VAR})") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read configuration: {exc.strerror}") from None
    return loads(text, p.resolve())


def _syntax_error(path: Path | None, text: str, exc: tomllib.TOMLDecodeError) -> str:
    """tomllib's message ends in "(at line L, column C)": put the line where every other error has it."""
    loc = str(path) if path else "<config>"
    msg = str(exc)
    m = re.fullmatch(r"(.*?)\s*\(at line (\d+), column (\d+)\)", msg, re.DOTALL)
    if m:
        return f"{loc}:{m.group(2)}: TOML syntax error: {m.group(1)} (column {m.group(3)})"
    m = re.fullmatch(r"(.*?)\s*\(at end of document\)", msg, re.DOTALL)
    if m:
        return f"{loc}:{max(1, len(text.splitlines()))}: TOML syntax error: {m.group(1)} (at the end of the file)"
    return f"{loc}: TOML syntax error: {msg}"


def loads(text: str, path: Path | None = None) -> Config:
    loader = _Loader(path, text)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_syntax_error(path, text, exc)) from None
    top = _Section(loader, "", raw, {"server", "smtp", "pop3", "smarthost", "queue", "fetch", "link",
                                                "schedule", "demand", "session", "aliases", "policy",
                                                "groups", "forward", "autoreply", "vacation", "blocklist",
                                                "virus", "users"})
    server = _server(_Section(loader, "server", raw.get("server"),
                              {"hostname", "domains", "spool_dir", "mynetworks", "postmaster"}))
    smtp = _smtp(_Section(loader, "smtp", raw.get("smtp"), {"listen", "max_message_size", "tls_cert", "tls_key",
                                                            "max_connections", "min_free_space",
                                                            "max_auth_failures", "auth_lockout"}))
    pop3 = _pop3(_Section(loader, "pop3", raw.get("pop3"), {"listen", "tls_cert", "tls_key", "allow_plaintext_lan",
                                                            "max_failures", "lockout"}))
    smarthost = _smarthost(_Section(loader, "smarthost", raw.get("smarthost"),
                                    {"host", "port", "starttls", "username", "password_file", "ca_file",
                                     "timeout", "route", "rewrite", "connections"}))
    queue = _queue(_Section(loader, "queue", raw.get("queue"),
                            {"queue_lifetime", "delay_warning", "retry_min", "retry_max"}))
    fetch_raw = raw.get("fetch", [])
    if not isinstance(fetch_raw, list):
        loader.fail("fetch", None, "must be an array of tables: write [[fetch]]")
    fetch = tuple(_fetch(loader, i, item, server) for i, item in enumerate(fetch_raw))
    names = [f.name for f in fetch]
    for i, n in enumerate(names):
        if n in names[:i]:
            loader.fail(f"fetch[{n}]", "name", f"two [[fetch]] accounts are called {n!r}", i)
    link_sec = _Section(loader, "link", raw.get("link"))
    link = _link(link_sec)
    sched = _Section(loader, "schedule", raw.get("schedule"), {"dial"})
    schedule = _schedule(sched)
    demand = _demand(_Section(loader, "demand", raw.get("demand"),
                              {"min_messages", "min_bytes", "urgent_after", "urgent_senders", "collect_every",
                               "min_gap", "max_sessions_per_day", "max_minutes_per_day"}))
    session = _session(_Section(loader, "session", raw.get("session"),
                                {"max_time", "idle_timeout", "retry_delay", "retry_count", "before", "after",
                                 "etrn_domains", "cost_per_call", "cost_per_minute", "currency"}))
    alias_sec = _Section(loader, "aliases", raw.get("aliases"))
    aliases: dict[str, tuple[str, ...]] = {}
    for name in alias_sec.data:
        targets = alias_sec.str_list(name)
        if not targets:
            alias_sec.fail(name, "an alias needs at least one target address")
        aliases[name.lower()] = targets
    del top
    from gateway.policy.settings import parse as _policy  # parsed there: the policy's own sections
    policy = _policy(loader, raw, server, smtp)
    return Config(path=path, server=server, smtp=smtp, pop3=pop3, smarthost=smarthost, queue=queue,
                  fetch=fetch, link=link, schedule=schedule, demand=demand, session=session,
                  aliases=aliases, raw=raw, policy=policy, source=text)


def _server(s: _Section) -> ServerConfig:
    domains = tuple(d.lower().strip() for d in s.str_list("domains"))
    if not domains:
        s.fail("domains", "list at least one local mail domain, e.g. domains = [\"office.example\"]")
    for d in domains:
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", d):
            s.fail("domains", f"{d!r} is not a domain name")
    nets = []
    for text in s.str_list("mynetworks", ("127.0.0.0/8", "::1/128")):
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            s.fail("mynetworks", f"{text!r} is not a network in CIDR form such as 192.0.2.0/24")
    hostname = s.get("hostname", str, None) or socket.getfqdn()
    spool = s.path("spool_dir", Path("/var/spool/dialmail"))
    postmaster = s.get("postmaster", str, f"postmaster@{domains[0]}")
    return ServerConfig(hostname=hostname, domains=domains, spool_dir=spool, mynetworks=tuple(nets),
                        postmaster=postmaster)


def _listen_list(s: _Section, key: str, default: tuple[str, ...]) -> tuple[Listen, ...]:
    out = []
    for item in s.str_list(key, default):
        try:
            out.append(parse_listen(item))
        except ValueError as exc:
            s.fail(key, str(exc))
    return tuple(out)


def _tls_pair(s: _Section) -> tuple[Path | None, Path | None]:
    cert, key = s.path("tls_cert"), s.path("tls_key")
    if bool(cert) != bool(key):
        s.fail("tls_key" if cert else "tls_cert", "tls_cert and tls_key must be given together")
    for name, p in (("tls_cert", cert), ("tls_key", key)):
        if p is not None and not p.exists():
            s.fail(name, f"{p} does not exist")
    if key is not None:
        mode = stat.S_IMODE(key.stat().st_mode)
        if mode & stat.S_IROTH:
            s.fail("tls_key", f"{key} is world-readable (mode {mode:04o}); run: chmod 600 {key}")
    return cert, key


def _smtp(s: _Section) -> SMTPConfig:
    cert, key = _tls_pair(s)
    return SMTPConfig(listen=_listen_list(s, "listen", ("0.0.0.0:25",)),
                      max_message_size=s.convert("max_message_size", parse_size, 50 * 1000**2),
                      tls_cert=cert, tls_key=key,
                      max_connections=s.positive("max_connections", 50),
                      min_free_space=s.convert("min_free_space", parse_size, 20 * 1000**2),
                      max_auth_failures=s.positive("max_auth_failures", 5),
                      auth_lockout=s.convert("auth_lockout", parse_duration, 900))


def _pop3(s: _Section) -> POP3Config:
    cert, key = _tls_pair(s)
    return POP3Config(listen=_listen_list(s, "listen", ("0.0.0.0:110",)), tls_cert=cert, tls_key=key,
                      allow_plaintext_lan=s.get("allow_plaintext_lan", bool, False),
                      max_failures=s.positive("max_failures", 5),
                      lockout=s.convert("lockout", parse_duration, 900))


def _smarthost(s: _Section) -> SmarthostConfig:
    pw = s.path("password_file")
    user = s.get("username", str, None)
    if user and not pw:
        s.fail("password_file", "username is set, so password_file is required")
    rewrite = []
    rw = _Section(s.loader, "smarthost.rewrite", s.data.get("rewrite"))
    for local, outside in rw.data.items():
        if not isinstance(outside, str) or "@" not in outside:
            rw.fail(local, f"must map to an outside address like \"office@isp.example\", got {outside!r}")
        rewrite.append((local.lower(), outside))
    route = s.choice("route", ("smarthost", "mx"), "smarthost")
    host = s.get("host", str, None)
    if route == "smarthost" and "host" in s.data and not host:
        s.fail("host", "must not be empty")
    return SmarthostConfig(host=host, port=s.port("port", 25),
                           starttls=s.choice("starttls", ("required", "opportunistic", "off"), "opportunistic"),
                           username=user, password_file=pw, ca_file=s.path("ca_file"),
                           timeout=s.get("timeout", float, 120.0), route=route, rewrite=tuple(rewrite),
                           connections=s.positive("connections", 1))


def _queue(s: _Section) -> QueueConfig:
    q = QueueConfig(queue_lifetime=s.convert("queue_lifetime", parse_duration, 4 * 86400),
                    delay_warning=s.convert("delay_warning", parse_duration, 4 * 3600),
                    retry_min=s.convert("retry_min", parse_duration, 300),
                    retry_max=s.convert("retry_max", parse_duration, 4 * 3600))
    if q.retry_min > q.retry_max:
        s.fail("retry_min", "must not be larger than retry_max")
    return q


def _fetch(loader: _Loader, index: int, data: Any, server: ServerConfig) -> FetchConfig:
    s = _Section(loader, f"fetch[{index}]", data, index=index,
                 known={"name", "host", "port", "tls", "username", "password_file", "folders", "mode", "deliver_to",
                  "keep", "keep_days", "envelope_header", "envelope_skip", "guess_from_headers", "ca_file",
                  "max_message_size", "oversize", "max_messages", "max_bytes", "batch_size", "chunk_size",
                  "offpeak", "domains"})
    tls = s.choice("tls", ("imaps", "starttls", "off"), "imaps")
    mode = s.choice("mode", ("single", "multidrop"), "single")
    name = s.get("name", str, None) or s.get("username", str, f"account{index}")
    s.name = f"fetch[{name}]"
    deliver_to = s.get("deliver_to", str, None)
    envelope_header = s.get("envelope_header", str, None)
    guess = s.get("guess_from_headers", bool, False)
    if mode == "single" and not deliver_to:
        s.fail("deliver_to", "single-drop accounts need deliver_to (the local user or address that gets the mail)")
    if mode == "multidrop" and not envelope_header and not guess:
        s.fail("envelope_header", "a multidrop account needs envelope_header (e.g. \"Delivered-To\", "
               "\"X-Original-To\", \"Envelope-To\" or \"Received\"); guessing from To/Cc misroutes Bcc and "
               "list mail, enable it only explicitly with guess_from_headers = true")
    keep_days = s.positive("keep_days", None)
    keep = s.get("keep", bool, False)
    if keep_days is not None and not keep:
        s.fail("keep_days", "only makes sense with keep = true")
    offpeak = s.convert("offpeak", parse_window, None)
    oversize = s.choice("oversize", ("leave", "defer", "delete"), "leave")
    if oversize == "defer" and offpeak is None:
        s.fail("offpeak", "oversize = \"defer\" needs the off-peak window to fetch big mail in, "
               "e.g. offpeak = \"22:00-06:00\"")
    return FetchConfig(name=name, host=s.get("host", str, required=True),
                       port=s.port("port", {"imaps": 993}.get(tls, 143)), tls=tls,
                       username=s.get("username", str, required=True), password_file=s.path("password_file"),
                       folders=s.str_list("folders", ("INBOX",)), mode=mode, deliver_to=deliver_to, keep=keep,
                       keep_days=keep_days, envelope_header=envelope_header,
                       envelope_skip=s.get("envelope_skip", int, 0), guess_from_headers=guess,
                       ca_file=s.path("ca_file"),
                       max_message_size=s.convert("max_message_size", parse_size, None),
                       oversize=oversize, offpeak=offpeak,
                       domains=tuple(d.lower().strip() for d in s.str_list("domains")),
                       max_messages=s.positive("max_messages", None),
                       max_bytes=s.convert("max_bytes", parse_size, None),
                       batch_size=s.positive("batch_size", 50),
                       chunk_size=s.convert("chunk_size", parse_size, 1024 * 1024))


def _link(s: _Section) -> LinkConfig:
    kind = s.choice("type", ("modem", "command", "always-on", "sim"), "always-on")
    options = {k: v for k, v in s.data.items() if k != "type"}
    try:
        from modem.errors import LinkConfigError
        from modem.settings import LinkSettings
    except ImportError:  # the modem package is optional for a LAN-only install
        return LinkConfig(type=kind, options=options)
    try:
        settings = LinkSettings.from_options(kind, options)
    except LinkConfigError as exc:
        s.fail(exc.key, exc.message)
    return LinkConfig(type=kind, options=options, settings=settings)


def _schedule(s: _Section) -> ScheduleConfig:
    from gateway.dialtimes import ScheduleError, parse
    texts = s.str_list("dial")
    rules = []
    for text in texts:
        try:
            rules.append(parse(text))
        except ScheduleError as exc:
            s.fail("dial", str(exc))
    return ScheduleConfig(dial=texts, rules=tuple(rules))


def _demand(s: _Section) -> DemandConfig:
    return DemandConfig(min_messages=s.positive("min_messages", None),
                        min_bytes=s.convert("min_bytes", parse_size, None),
                        urgent_after=s.convert("urgent_after", parse_duration, None),
                        urgent_senders=tuple(a.lower() for a in s.str_list("urgent_senders")),
                        collect_every=s.convert("collect_every", parse_duration, None),
                        min_gap=s.convert("min_gap", parse_duration, 300),
                        max_sessions_per_day=s.positive("max_sessions_per_day", None),
                        max_minutes_per_day=s.get("max_minutes_per_day", float, None))


def _session(s: _Section) -> SessionConfig:
    return SessionConfig(max_time=s.convert("max_time", parse_duration, 1800),
                         idle_timeout=s.convert("idle_timeout", parse_duration, 30),
                         retry_delay=s.convert("retry_delay", parse_duration, 120),
                         retry_count=s.get("retry_count", int, 2),
                         before=s.get("before", str, None), after=s.get("after", str, None),
                         etrn_domains=s.str_list("etrn_domains"),
                         cost_per_call=s.get("cost_per_call", float, 0.0),
                         cost_per_minute=s.get("cost_per_minute", float, 0.0),
                         currency=s.get("currency", str, ""))
