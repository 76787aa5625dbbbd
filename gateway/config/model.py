"""The typed configuration: what every part of dialmail receives, and the value parsers.

Everything below the reader gets these dataclasses; nothing else reads raw dicts or
environment variables.
"""
from __future__ import annotations

import functools
import ipaddress
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.config.sections import _Loader
from gateway.mail.errors import ConfigError

if TYPE_CHECKING:  # only for the annotations: those modules read their own sections
    from gateway.config.dialtimes import DialRule
    from gateway.config.oauth import OAuthConfig
    from gateway.config.policy import PolicySettings
    from modem.settings import LinkSettings

DEFAULT_PATH = Path("/etc/dialmail/dialmail.toml")
ENV_VAR = "DIALMAIL_CONFIG"

_SIZE_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1024, "M": 1000**2, "MB": 1000**2,
               "MIB": 1024**2, "G": 1000**3, "GB": 1000**3, "GIB": 1024**3}
_DURATION_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


@functools.lru_cache(maxsize=4096)  # asked several times per SMTP transaction, of few addresses
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
    token_key_file: Path | None = None  # Fernet key that encrypts the stored OAuth2 tokens

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
    # Longest silence allowed between two reads of DATA (Postfix's smtpd_timeout): a slow
    # but steady upload is never cut, however long the whole message takes.
    data_timeout: int = 300
    max_connections_per_client: int = 10


@dataclass(frozen=True)
class SubmissionConfig:
    """Port 587 for mail clients (RFC 6409): STARTTLS, then AUTH, then mail to anywhere.

    The users, the login lockouts and the connection limits are port 25's (``[smtp]``)."""
    listen: tuple[Listen, ...]
    tls_cert: Path
    tls_key: Path


@dataclass(frozen=True)
class LMTPTarget:
    """Where final delivery goes instead of the spool's Maildirs: an LMTP server (Dovecot)."""
    socket: Path | None  # a unix socket, or
    host: str | None  # a TCP host and port
    port: int | None

    def __str__(self) -> str:
        return f"unix:{self.socket}" if self.socket else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class DeliveryConfig:
    lmtp: LMTPTarget | None = None
    lmtp_timeout: int = 120  # seconds for each LMTP reply (the final one comes after the mail is stored)
    # The doveadm command (argv) that tells whether a copy whose LMTP reply never came was
    # stored after all; without it, the Sieve duplicate guard is the only protection.
    doveadm: tuple[str, ...] = ()


@dataclass(frozen=True)
class POP3Config:
    listen: tuple[Listen, ...]
    tls_cert: Path | None
    tls_key: Path | None
    allow_plaintext_lan: bool
    max_failures: int
    lockout: int
    max_connections: int = 50
    max_connections_per_client: int = 10


@dataclass(frozen=True)
class IMAPConfig:
    """IMAP for the LAN is Dovecot on dialmail's Maildirs, run by dialmail or by the admin."""
    dovecot: str  # managed | external | off
    listen: tuple[Listen, ...]
    tls_cert: Path | None
    tls_key: Path | None
    allow_plaintext_lan: bool
    # Dovecot's mail processes never run as root: when dialmail does, the Maildirs belong
    # to this user and Dovecot reads them as it.  Running as its own user, dialmail's uid.
    mail_user: str = "mail"
    dovecot_config: Path = Path("/etc/dovecot/dovecot.conf")  # external: the admin's, for doveadm

    @property
    def enabled(self) -> bool:
        return self.dovecot != "off"


IMAP_OFF = IMAPConfig(dovecot="off", listen=(), tls_cert=None, tls_key=None, allow_plaintext_lan=False)


@dataclass(frozen=True)
class WebConfig:
    """The web console in the daemon; ``listen`` empty when there is no ``[web]`` section."""
    listen: tuple[Listen, ...] = ()
    tls_cert: Path | None = None  # shared with SMTP/POP3 unless given here
    tls_key: Path | None = None
    admins: tuple[str, ...] = ()
    users_may_connect: bool = True


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
    connections: int = 2  # SMTP connections a flush uses at once (measured best: README Benchmarks)
    auth: str = "password"  # password | xoauth2 | oauthbearer
    oauth: OAuthConfig | None = None  # who issues the tokens, with auth = xoauth2 | oauthbearer

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
    compress: str = "auto"  # auto: COMPRESS=DEFLATE whenever the server offers it | off
    offpeak: tuple[int, int] | None = None  # (start, end) minutes after local midnight, for oversize="defer"
    domains: tuple[str, ...] = ()  # ISP-side domains whose local parts are local users (multidrop)
    auth: str = "password"  # password | xoauth2 | oauthbearer
    oauth: OAuthConfig | None = None  # who issues the tokens, with auth = xoauth2 | oauthbearer

    def password(self) -> str | None:
        return read_secret(self.password_file, f"fetch[{self.name}].password_file") if self.password_file else None


@dataclass(frozen=True)
class LinkConfig:
    type: str  # modem | command | always-on | sim
    options: dict[str, Any]  # the raw keys, kept for display
    settings: LinkSettings | None = None  # validated by the modem package


@dataclass(frozen=True)
class ScheduleConfig:
    dial: tuple[str, ...]
    rules: tuple[DialRule, ...] = ()  # one per dial string


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
    etrn_wait: float = 10.0  # seconds after ETRN the line waits for the ISP's first delivery


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
    policy: PolicySettings | None = None  # block lists, virus scan, groups, replies
    imap: IMAPConfig = IMAP_OFF
    source: str = field(default="", repr=False, compare=False)  # the file's text, for line numbers
    submission: SubmissionConfig | None = None  # port 587, when [submission] is there
    delivery: DeliveryConfig = DeliveryConfig()
    web: WebConfig = field(default_factory=WebConfig)

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


def parse_lmtp(value: Any) -> LMTPTarget:
    """``"unix:/run/dovecot/lmtp"`` or ``"host:port"`` -> LMTPTarget."""
    text = str(value).strip()
    if text.startswith("unix:"):
        path = Path(text[len("unix:"):])
        if not path.is_absolute():
            raise ValueError(f"{value!r}: the socket must be an absolute path, e.g. \"unix:/run/dovecot/lmtp\"")
        return LMTPTarget(socket=path, host=None, port=None)
    if text.startswith("/"):
        raise ValueError(f"{value!r}: write a socket as \"unix:{text}\"")
    try:
        listen = parse_listen(text, default_host="")
    except ValueError:
        raise ValueError(f"{value!r} is neither \"unix:/path/to/socket\" nor \"host:port\"") from None
    if not listen.host or listen.port == 0:
        raise ValueError(f"{value!r}: give both host and port, e.g. \"127.0.0.1:24\"")
    return LMTPTarget(socket=None, host=listen.host, port=listen.port)


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
