"""The configuration file: one TOML file parsed and validated once into typed objects.

Every problem is a ``ConfigError`` that names the file, the key and, where it can be
found, the line.
"""
from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import socket
import stat
import tomllib
from pathlib import Path
from typing import Any

from gateway.config import oauth as oauth_table
from gateway.config.dialtimes import ScheduleError
from gateway.config.dialtimes import parse as parse_dial_rules
from gateway.config.model import (
    DEFAULT_PATH,
    ENV_VAR,
    IMAP_OFF,
    Config,
    DeliveryConfig,
    DemandConfig,
    FetchConfig,
    IMAPConfig,
    LinkConfig,
    Listen,
    POP3Config,
    QueueConfig,
    ScheduleConfig,
    ServerConfig,
    SessionConfig,
    SmarthostConfig,
    SMTPConfig,
    SubmissionConfig,
    WebConfig,
    parse_duration,
    parse_listen,
    parse_lmtp,
    parse_size,
    parse_window,
)
from gateway.config.policy import parse as parse_policy
from gateway.config.sections import (
    _Loader,
    _Section,
)
from gateway.mail.errors import ConfigError
from modem.errors import LinkConfigError
from modem.settings import LinkSettings


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
                                                "virus", "users", "imap", "submission", "delivery", "web"})
    server = _server(_Section(loader, "server", raw.get("server"),
                              {"hostname", "domains", "spool_dir", "mynetworks", "postmaster",
                               "token_key_file"}))
    smtp = _smtp(_Section(loader, "smtp", raw.get("smtp"), {"listen", "max_message_size", "tls_cert", "tls_key",
                                                            "max_connections", "min_free_space",
                                                            "max_auth_failures", "auth_lockout", "data_timeout",
                                                            "max_connections_per_client"}))
    pop3 = _pop3(_Section(loader, "pop3", raw.get("pop3"), {"listen", "tls_cert", "tls_key", "allow_plaintext_lan",
                                                            "max_failures", "lockout", "max_connections",
                                                            "max_connections_per_client"}))
    imap = _imap(_Section(loader, "imap", raw.get("imap"), {"dovecot", "listen", "tls_cert", "tls_key",
                                                            "allow_plaintext_lan", "mail_user", "dovecot_config"}),
                 "imap" in raw, smtp, pop3)
    submission = None
    if "submission" in raw:
        submission = _submission(_Section(loader, "submission", raw.get("submission"),
                                          {"listen", "tls_cert", "tls_key"}), smtp)
    delivery = _delivery(_Section(loader, "delivery", raw.get("delivery"), {"lmtp", "lmtp_timeout", "doveadm"}))
    smarthost = _smarthost(_Section(loader, "smarthost", raw.get("smarthost"),
                                    {"host", "port", "starttls", "username", "password_file", "ca_file",
                                     "timeout", "route", "rewrite", "connections", "auth", "oauth"}))
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
                                 "etrn_domains", "etrn_wait", "cost_per_call", "cost_per_minute",
                                 "currency"}))
    alias_sec = _Section(loader, "aliases", raw.get("aliases"))
    aliases: dict[str, tuple[str, ...]] = {}
    for name in alias_sec.data:
        targets = alias_sec.str_list(name)
        if not targets:
            alias_sec.fail(name, "an alias needs at least one target address")
        aliases[name.lower()] = targets
    del top
    web = _web(_Section(loader, "web", raw.get("web"), {"listen", "tls_cert", "tls_key", "admins",
                                                        "users_may_connect"}), "web" in raw, smtp, pop3)
    policy = parse_policy(loader, raw, server, smtp)  # the policy's own sections, read there
    return Config(path=path, server=server, smtp=smtp, pop3=pop3, smarthost=smarthost, queue=queue,
                  fetch=fetch, link=link, schedule=schedule, demand=demand, session=session,
                  aliases=aliases, raw=raw, policy=policy, imap=imap, source=text,
                  submission=submission, delivery=delivery, web=web)


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
                        postmaster=postmaster, token_key_file=s.path("token_key_file"))


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
                      auth_lockout=s.convert("auth_lockout", parse_duration, 900),
                      data_timeout=s.convert("data_timeout", parse_duration, 300),
                      max_connections_per_client=s.positive("max_connections_per_client", 10))


def _submission(s: _Section, smtp: SMTPConfig) -> SubmissionConfig:
    cert, key = _tls_pair(s)
    if cert is None:
        cert, key = smtp.tls_cert, smtp.tls_key
    if cert is None:
        s.fail("tls_cert", "submission needs TLS: clients send their password only after STARTTLS; "
               "set tls_cert and tls_key here or in [smtp]")
    return SubmissionConfig(listen=_listen_list(s, "listen", ("0.0.0.0:587",)), tls_cert=cert, tls_key=key)


def _delivery(s: _Section) -> DeliveryConfig:
    lmtp = s.convert("lmtp", parse_lmtp, None)
    doveadm = s.get("doveadm", str, "")
    try:
        argv = tuple(shlex.split(doveadm))
    except ValueError as exc:
        s.fail("doveadm", f"cannot split {doveadm!r} into a command: {exc}")
    if argv and lmtp is None:
        s.fail("doveadm", "only used with lmtp: set lmtp too, or remove doveadm")
    if argv and not shutil.which(argv[0]):
        s.fail("doveadm", f"{argv[0]!r} is not an executable program here (Debian: apt-get install dovecot-core)")
    return DeliveryConfig(lmtp=lmtp, lmtp_timeout=s.convert("lmtp_timeout", parse_duration, 120), doveadm=argv)


def _pop3(s: _Section) -> POP3Config:
    cert, key = _tls_pair(s)
    return POP3Config(listen=_listen_list(s, "listen", ("0.0.0.0:110",)), tls_cert=cert, tls_key=key,
                      allow_plaintext_lan=s.get("allow_plaintext_lan", bool, False),
                      max_failures=s.positive("max_failures", 5),
                      lockout=s.convert("lockout", parse_duration, 900),
                      max_connections=s.positive("max_connections", 50),
                      max_connections_per_client=s.positive("max_connections_per_client", 10))


def _oauth(s: _Section, account: str, kind: str) -> tuple[str, oauth_table.OAuthConfig | None]:
    """``auth`` and the ``oauth`` table of an account that logs in to the ISP."""
    auth = s.choice("auth", oauth_table.AUTH_METHODS, "password")
    if auth == "password":
        if "oauth" in s.data:
            s.fail("oauth", "is read only with auth = \"xoauth2\" or \"oauthbearer\"")
        return auth, None
    if "oauth" not in s.data:
        s.fail("auth", f"auth = {auth!r} needs an oauth table naming the provider and client_id "
                       f"(see the README, \"OAuth2\")")
    if "password_file" in s.data:
        s.fail("password_file", f"is not used with auth = {auth!r}: the login is by token")
    table = _Section(s.loader, f"{s.name}.oauth", s.data["oauth"], index=s.index,
                     known={"provider", "client_id", "tenant", "client_secret_file", "token_url",
                            "authorization_url", "device_url", "scopes"})
    return auth, oauth_table.parse(table, account, kind)


def _imap(s: _Section, present: bool, smtp: SMTPConfig, pop3: POP3Config) -> IMAPConfig:
    # An [imap] section means IMAP is wanted: Dovecot managed by dialmail unless it says otherwise.
    dovecot = s.choice("dovecot", ("managed", "external", "off"), "managed" if present else "off")
    if dovecot == "off":
        return IMAP_OFF
    cert, key = _tls_pair(s)
    if cert is None:  # one certificate for the office's mail server, whichever protocol
        cert, key = (pop3.tls_cert, pop3.tls_key) if pop3.tls_cert else (smtp.tls_cert, smtp.tls_key)
    listen = _listen_list(s, "listen", ("0.0.0.0:143",))
    taken = {(lst.host, lst.port): section for section, lsts in (("smtp", smtp.listen), ("pop3", pop3.listen))
             for lst in lsts}
    for lst in listen:
        if (lst.host, lst.port) in taken:
            s.fail("listen", f"{lst} is already [{taken[(lst.host, lst.port)]}] listen")
    mail_user = s.get("mail_user", str, "mail")
    if not mail_user.strip() or mail_user == "root":
        s.fail("mail_user", "name the unprivileged user that owns the Maildirs for Dovecot (never root)")
    return IMAPConfig(dovecot=dovecot, listen=listen, tls_cert=cert, tls_key=key,
                      allow_plaintext_lan=s.get("allow_plaintext_lan", bool, pop3.allow_plaintext_lan),
                      mail_user=mail_user,
                      dovecot_config=s.path("dovecot_config", Path("/etc/dovecot/dovecot.conf")))


def _web(s: _Section, present: bool, smtp: SMTPConfig, pop3: POP3Config) -> WebConfig:
    """No ``[web]`` section, no console; with one, the console listens on loopback unless
    told otherwise (it is an administration page), with the certificate SMTP or POP3 use."""
    if not present:
        return WebConfig()
    cert, key = _tls_pair(s)
    if cert is None:
        cert, key = (smtp.tls_cert, smtp.tls_key) if smtp.tls_cert else (pop3.tls_cert, pop3.tls_key)
    listen = _listen_list(s, "listen", ("127.0.0.1:8025",))
    if not listen:
        s.fail("listen", "give at least one address, or remove the [web] section to have no console")
    return WebConfig(listen=listen, tls_cert=cert, tls_key=key,
                     admins=tuple(a.strip().lower() for a in s.str_list("admins")),
                     users_may_connect=s.get("users_may_connect", bool, True))


def _smarthost(s: _Section) -> SmarthostConfig:
    pw = s.path("password_file")
    user = s.get("username", str, None)
    auth, oauth = _oauth(s, "smarthost", "smarthost")
    if oauth is not None and not user:
        s.fail("username", f"auth = {auth!r} logs in as a user: set username (the mailbox address)")
    if user and not pw and oauth is None:
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
                           connections=s.positive("connections", 2), auth=auth, oauth=oauth)


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
                  "offpeak", "domains", "auth", "oauth", "compress"})
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
    auth, oauth = _oauth(s, name, "fetch")
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
                       chunk_size=s.convert("chunk_size", parse_size, 1024 * 1024),
                       auth=auth, oauth=oauth, compress=s.choice("compress", ("auto", "off"), "auto"))


def _link(s: _Section) -> LinkConfig:
    kind = s.choice("type", ("modem", "command", "always-on", "sim"), "always-on")
    options = {k: v for k, v in s.data.items() if k != "type"}
    try:
        settings = LinkSettings.from_options(kind, options)
    except LinkConfigError as exc:
        s.fail(exc.key, exc.message)
    return LinkConfig(type=kind, options=options, settings=settings)


def _schedule(s: _Section) -> ScheduleConfig:
    texts = s.str_list("dial")
    rules = []
    for text in texts:
        try:
            rules.append(parse_dial_rules(text))
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
                         etrn_wait=s.convert("etrn_wait", parse_duration, 10),
                         cost_per_call=s.get("cost_per_call", float, 0.0),
                         cost_per_minute=s.get("cost_per_minute", float, 0.0),
                         currency=s.get("currency", str, ""))
