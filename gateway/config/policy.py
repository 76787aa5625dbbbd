"""The delivery policy's configuration: typed, validated once, every error naming its key.

Sections (all optional; see etc/dialmail.toml for an annotated example):

``[policy]``      ``max_message_size`` for local delivery (default: ``[smtp] max_message_size``),
                  ``autoreply_every`` (default interval between two replies to one sender).
``[blocklist]``   ``senders`` (addresses, domains, ``*.domain`` for subdomains) and ``allow``.
``[virus]``       ``clamd = "unix:/path" | "tcp:host:port"``, ``on_error = "accept" | "reject"``,
                  ``timeout``, ``max_scan_size``, ``notify_postmaster``.
``[groups.NAME]`` ``members``, ``mode = "all" | "round-robin"``, ``members_only``.
``[forward]``     ``USER = { to = [...], keep = true }``.
``[autoreply."ADDRESS"]`` ``file`` (a whole MIME message sent as the reply), ``every``.
``[vacation.USER]`` ``start``, ``end`` (dates), ``subject``, ``body`` or ``body_file``, ``every``.

Group names, like aliases, are ``name`` (every local domain) or ``name@domain`` (that
domain only); catch-alls are ``"@domain" = [targets]`` in ``[aliases]``.
"""
from __future__ import annotations

import datetime as dt
import email.parser
import email.policy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config.model import parse_duration, parse_size
from gateway.config.sections import _Section
from gateway.mail import address

GROUP_MODES = ("all", "round-robin")
ON_ERROR = ("accept", "reject")
DEFAULT_EVERY = 7 * 86400


@dataclass(frozen=True)
class Group:
    name: str  # "sales" (every local domain) or "sales@branch.example"
    members: tuple[str, ...]
    mode: str  # all | round-robin
    members_only: bool


@dataclass(frozen=True)
class Forward:
    user: str
    to: tuple[str, ...]
    keep: bool


@dataclass(frozen=True)
class Autoresponder:
    address: str
    file: Path
    every: int


@dataclass(frozen=True)
class Vacation:
    user: str
    start: dt.datetime | None
    end: dt.datetime | None  # exclusive
    subject: str | None  # None: "Auto: " and the subject answered (RFC 3834 §3.1.5)
    body: str
    every: int

    def active(self, now: dt.datetime) -> bool:
        return (self.start is None or now >= self.start) and (self.end is None or now < self.end)


@dataclass(frozen=True)
class BlockList:
    senders: tuple[str, ...]
    allow: tuple[str, ...]


@dataclass(frozen=True)
class Clamd:
    kind: str  # unix | tcp
    path: str | None
    host: str | None
    port: int | None

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


@dataclass(frozen=True)
class VirusScan:
    clamd: Clamd | None  # None: no scanning
    on_error: str  # accept (fail-open) | reject (fail-closed)
    timeout: float
    max_scan_size: int
    notify_postmaster: bool


@dataclass(frozen=True)
class PolicySettings:
    max_message_size: int
    autoreply_every: int
    autoreply_to: str  # "trusted": fetched, local, mynetworks or AUTH mail only; "all"
    blocklist: BlockList
    virus: VirusScan
    groups: dict[str, Group] = field(default_factory=dict)
    forwards: dict[str, Forward] = field(default_factory=dict)
    autoresponders: dict[str, Autoresponder] = field(default_factory=dict)
    vacations: dict[str, Vacation] = field(default_factory=dict)


_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


def check_pattern(entry: str) -> str:
    """A block/allow list entry: ``user@domain``, ``domain``, ``@domain`` or ``*.domain``."""
    e = entry.strip().lower()
    if e.startswith("@"):
        e = e[1:]
    if "@" in e:
        if not address.is_plain(e):
            raise ValueError(f"{entry!r} is not an address")
        return e
    bare = e[2:] if e.startswith("*.") else e
    if not _DOMAIN.fullmatch(bare):
        raise ValueError(f"{entry!r} is neither an address, a domain nor *.domain")
    return e


def parse_clamd(value: str) -> Clamd:
    kind, _, rest = str(value).partition(":")
    if kind == "unix" and rest.startswith("/"):
        return Clamd("unix", rest, None, None)
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return Clamd("tcp", None, host.strip("[]"), int(port))
    raise ValueError(f"{value!r}: write \"unix:/run/clamav/clamd.ctl\" or \"tcp:127.0.0.1:3310\"")


def _when(value: Any, end: bool) -> dt.datetime:
    """A TOML date/datetime or a string; a bare date ends at the end of that day."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = dt.datetime.fromisoformat(text) if len(text) > 10 else dt.date.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{value!r} is not a date like 2026-07-01 or 2026-07-01T08:00") from None
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=None)
    if isinstance(value, dt.date):
        day = dt.datetime.combine(value, dt.time())
        return day + dt.timedelta(days=1) if end else day
    raise ValueError(f"{value!r} is not a date like 2026-07-01")


def parse_when(value: Any, end: bool = False) -> dt.datetime:
    return _when(value, end)


def _local_address(s: _Section, key: str, domains: tuple[str, ...]) -> str:
    addr = address.normalise(key).lower()
    if not address.is_plain(addr):
        s.fail(key, f"{key!r} is not an address like name@{domains[0]}")
    if address.split(addr)[1] not in domains:
        s.fail(key, f"{address.split(addr)[1]!r} is not one of the local domains ({', '.join(domains)})")
    return addr


def _name(s: _Section, key: str, domains: tuple[str, ...]) -> str:
    """A group or user key: ``name`` or ``name@local-domain``."""
    if "@" in key:
        return _local_address(s, key, domains)
    if not re.fullmatch(r"[a-z0-9][a-z0-9._+-]*", key.lower()):
        s.fail(key, f"{key!r} is not a name (letters, digits, . _ + -) or name@domain")
    return key.lower()


def _targets(s: _Section, key: str, values: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for v in values:
        v = v.strip()
        if "@" in v and not address.is_plain(address.normalise(v)):
            s.fail(key, f"{v!r} is not an address")
        if "@" not in v and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", v):
            s.fail(key, f"{v!r} is neither a user name nor an address")
        out.append(address.normalise(v) if "@" in v else v.lower())
    return tuple(out)


def parse(loader, raw: dict, server, smtp) -> PolicySettings:
    domains = server.domains
    pol = _Section(loader, "policy", raw.get("policy"), {"max_message_size", "autoreply_every", "autoreply_to"})
    every = pol.convert("autoreply_every", parse_duration, DEFAULT_EVERY)
    autoreply_to = pol.choice("autoreply_to", ("trusted", "all"), "trusted")

    bl = _Section(loader, "blocklist", raw.get("blocklist"), {"senders", "allow"})
    lists = {}
    for key in ("senders", "allow"):
        entries = []
        for e in bl.str_list(key):
            try:
                entries.append(check_pattern(e))
            except ValueError as exc:
                bl.fail(key, str(exc))
        lists[key] = tuple(entries)

    vs = _Section(loader, "virus", raw.get("virus"),
                  {"clamd", "on_error", "timeout", "max_scan_size", "notify_postmaster"})
    virus = VirusScan(clamd=vs.convert("clamd", parse_clamd, None),
                      on_error=vs.choice("on_error", ON_ERROR, "accept"),
                      timeout=vs.get("timeout", float, 60.0),
                      max_scan_size=vs.convert("max_scan_size", parse_size, 25 * 1024**2),
                      notify_postmaster=vs.get("notify_postmaster", bool, True))
    if virus.timeout <= 0:
        vs.fail("timeout", "must be positive")

    groups: dict[str, Group] = {}
    gsec = _Section(loader, "groups", raw.get("groups"))
    for key, data in gsec.data.items():
        name = _name(gsec, key, domains)
        g = _Section(loader, f"groups.{key}", data, {"members", "mode", "members_only"})
        members = _targets(g, "members", g.str_list("members"))
        if not members:
            g.fail("members", "a group needs at least one member")
        groups[name] = Group(name, members, g.choice("mode", GROUP_MODES, "all"),
                             g.get("members_only", bool, False))
    aliases = raw.get("aliases") or {}
    alias_sec = _Section(loader, "aliases", aliases)
    for key in aliases:
        if key.startswith("@") and key[1:].lower() not in domains:
            alias_sec.fail(key, f"a catch-all needs a local domain ({', '.join(domains)}), got {key[1:]!r}")
    for name in groups:
        if name in {k.lower() for k in aliases}:
            gsec.fail(name, "is both an alias and a group; keep one")

    forwards: dict[str, Forward] = {}
    fsec = _Section(loader, "forward", raw.get("forward"))
    for key, data in fsec.data.items():
        user = _name(fsec, key, domains)
        f = _Section(loader, f"forward.{key}", data, {"to", "keep"})
        to = _targets(f, "to", f.str_list("to"))
        if not to:
            f.fail("to", "list at least one address to forward to")
        forwards[user] = Forward(user, to, f.get("keep", bool, False))

    autos: dict[str, Autoresponder] = {}
    asec = _Section(loader, "autoreply", raw.get("autoreply"))
    for key, data in asec.data.items():
        addr = _local_address(asec, key, domains)
        a = _Section(loader, f"autoreply.{key}", data, {"file", "every"})
        path = a.path("file")
        if path is None:
            a.fail("file", "is required: the message (a whole MIME document) sent as the reply")
        try:
            doc = path.read_bytes()
        except OSError as exc:
            a.fail("file", f"cannot read {path}: {exc.strerror}")
        msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(doc)
        if msg.defects or not (msg.get("Subject") or msg.get("Content-Type")):
            a.fail("file", f"{path} is not a MIME message (it needs headers such as Subject: and Content-Type:, "
                           "a blank line, then the body)")
        autos[addr] = Autoresponder(addr, path, a.convert("every", parse_duration, every))

    vacations: dict[str, Vacation] = {}
    vsec = _Section(loader, "vacation", raw.get("vacation"))
    for key, data in vsec.data.items():
        user = _name(vsec, key, domains)
        v = _Section(loader, f"vacation.{key}", data, {"start", "end", "subject", "body", "body_file", "every"})
        start = v.convert("start", lambda x: _when(x, False), None)
        end = v.convert("end", lambda x: _when(x, True), None)
        if start and end and end <= start:
            v.fail("end", "must not be before start")
        body = v.get("body", str, None)
        body_file = v.path("body_file")
        if body and body_file:
            v.fail("body_file", "give body or body_file, not both")
        if body_file is not None:
            try:
                body = body_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                v.fail("body_file", f"cannot read {body_file}: {exc}")
        if not body:
            v.fail("body", "is required: the text of the out-of-office reply")
        vacations[user] = Vacation(user, start, end, v.get("subject", str, None), body,
                                   v.convert("every", parse_duration, every))

    size = pol.convert("max_message_size", parse_size, smtp.max_message_size)
    return PolicySettings(max_message_size=size, autoreply_every=every, autoreply_to=autoreply_to,
                          blocklist=BlockList(lists["senders"], lists["allow"]), virus=virus,
                          groups=groups, forwards=forwards, autoresponders=autos, vacations=vacations)
