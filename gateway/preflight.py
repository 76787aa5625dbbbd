"""Preflight: the configuration checked against the machine it runs on, before a call is paid for.

``gateway.config`` checks what the file says (types, choices, syntax); this module checks
what it means here: that every address mail is sent to can receive it (postmaster, alias
targets, group members, forwarding targets, a fetch account's ``deliver_to``), that the
users file holds only users of local domains, that the host name is one a smarthost will
take in EHLO, that password files, TLS certificates and keys can be read, that the
smarthost's and the ISP's host names are host names, and whether clamd answers.

Every problem is a ``Finding``; ``dialmail check`` prints them all (errors refuse, warnings
only tell), and ``dialmail run`` logs them at start and refuses to start on the ones that
would lose mail.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Config
from gateway.mail import address
from gateway.mail.errors import ConfigError
from gateway.office.directory import Directory

log = logging.getLogger("dialmail.preflight")

ERROR, WARNING = "error", "warning"

# Names a resolver gives a machine that has no real one: no smarthost takes them in EHLO.
_LOCAL_NAMES = ("localhost", "localhost.localdomain", "localdomain")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


@dataclass(frozen=True)
class Finding:
    level: str  # error | warning
    where: str  # "file:LINE: section.key", or the users file
    message: str
    refuse_start: bool = False  # mail would be lost: the daemon does not start

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def check(config: Config, users=None, probe_clamd: bool = True) -> list[Finding]:
    """Every problem found, errors and warnings, grouped by what they are about."""
    if users is None:
        from spool.users import Users
        users = Users(config.spool_dir)
    directory = Directory(config, users)
    out: list[Finding] = []
    out += _hostname(config)
    try:
        users.names()
    except OSError as exc:  # e.g. run as another user than the spool's owner
        out.append(Finding(ERROR, str(users.path), f"cannot read the users file: {exc.strerror or exc}"))
    else:
        out += _recipients(config, directory)
        out += _users(config, users)
    out += _tls(config)
    out += _smarthost(config)
    out += _fetch(config, directory)
    if probe_clamd:
        out += _clamd(config)
        out += _lmtp(config)
    out += _imap(config)
    return out


def at_start(config: Config) -> list[Finding]:
    """For the daemon: log every finding once, and refuse to start when mail would be lost."""
    findings = check(config)
    fatal = [f for f in findings if f.refuse_start]
    for f in findings:
        if not f.refuse_start:  # those are the ConfigError below, said once
            (log.error if f.level == ERROR else log.warning)("%s", f)
    if fatal:
        raise ConfigError(f"{fatal[0]} (not starting: mail would be lost)")
    return findings


def before_dial(config: Config) -> None:
    """For a session run without the daemon: no paid call with a configuration that
    ``dialmail check`` refuses (the daemon checked at its start)."""
    errors = [f for f in check(config, probe_clamd=False) if f.level == ERROR]
    if errors:
        more = f" (and {len(errors) - 1} more problem(s): run `dialmail check`)" if len(errors) > 1 else ""
        raise ConfigError(f"{errors[0]}{more}; not dialling")


# ---------------------------------------------------------------- host names


def is_host_name(text: str) -> bool:
    """A DNS host name (letters, digits, hyphens in dot-separated labels) or an IP address."""
    try:
        ipaddress.ip_address(text.strip("[]"))
        return True
    except ValueError:
        pass
    name = text.removesuffix(".")
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def _not_a_host(value: str) -> str:
    hint = ""
    if "://" in value:
        hint = " (give the bare name, without a URL scheme)"
    elif re.fullmatch(r"[^:]+:\d+", value):
        hint = " (give the port in port = ..., not in the name)"
    return f"{value!r} is not a host name or IP address{hint}"


def _hostname(config: Config) -> list[Finding]:
    name = config.server.hostname
    given = "hostname" in (config.raw.get("server") or {})
    source = "" if given else " (not set, so this machine's own name was used)"
    where = config.where("server", "hostname")
    fix = "set [server] hostname to this host's full name in DNS, e.g. hostname = \"mail.office.example\""
    bare = name.rstrip(".").lower()
    try:
        ipaddress.ip_address(bare.strip("[]"))
        is_ip = True
    except ValueError:
        is_ip = False
    if is_ip:
        why = "is an IP address, not a host name; smarthosts refuse it in EHLO"
    elif not is_host_name(bare):
        why = "is not a valid host name"
    elif bare in _LOCAL_NAMES or bare.endswith((".localdomain", ".localhost")):
        why = "is a local-only name; smarthosts refuse or bounce mail greeted with it"
    elif "." not in bare:
        why = "is not a fully qualified name (it has no domain); smarthosts refuse or bounce mail greeted with it"
    else:
        return []
    return [Finding(ERROR, where, f"{name!r}{source} {why}: {fix}")]


# ---------------------------------------------------------------- where mail goes


def _nobody(directory: Directory, target: str, domains: tuple[str, ...], answering: bool) -> list[str]:
    """The local domains in which ``target`` (a bare name or a local address) reaches nobody.

    Mirrors Directory._target: a bare user name is that user in every domain; anything
    else must resolve to a mailbox, an outside address or a round-robin group, or with
    ``answering`` to an autoresponder (which answers mail and keeps none)."""
    if "@" not in target:
        if directory.users.exists(target.lower()):
            return []
        return [d for d in domains if not _reaches(directory, f"{target}@{d}", answering)]
    return [] if _reaches(directory, target, answering) else [address.split(target)[1]]


def _reaches(directory: Directory, addr: str, answering: bool) -> bool:
    res = directory.resolve(addr)
    if res is None:
        return False
    if res.mailboxes or res.remote or res.rotations:
        return True
    autoresponders = getattr(directory.config.policy, "autoresponders", {})
    return answering and address.normalise(addr).lower() in autoresponders


def _target_problem(config: Config, directory: Directory, target: str, domains: tuple[str, ...],
                    then: str, answering: bool = True) -> str | None:
    """Why mail sent to ``target`` cannot be delivered, or None."""
    target = target.strip()
    if "@" in target:
        norm = address.normalise(target)
        if not address.is_plain(norm):
            return f"{target!r} is not a valid mail address"
        if not config.server.is_local_domain(address.split(norm)[1]):
            return None  # leaves through the queue; the outside decides
        target = norm
    elif not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", target):
        return f"{target!r} is neither a user name nor a mail address"
    missing = _nobody(directory, target, domains, answering)
    if not missing:
        return None
    local = address.split(target)[0] if "@" in target else target
    return (f"{target!r} is nobody here: no user, alias or group {local!r} in {', '.join(missing)} "
            f"({then}; add the user with: dialmail users add {local.lower()})")


def _scope(name: str, config: Config) -> tuple[str, ...]:
    """The domains a rule named ``name`` or ``name@domain`` applies in."""
    return (address.split(name)[1],) if "@" in name else config.server.domains


def _raw_keys(config: Config, section: str) -> dict[str, str]:
    """Typed names (lower case) back to the keys as written, for line numbers."""
    data = config.raw.get(section)
    return {k.lower(): k for k in data} if isinstance(data, dict) else {}


def _recipients(config: Config, directory: Directory) -> list[Finding]:
    out = []
    pm = config.server.postmaster.strip()
    pm_addr = pm if "@" in pm else f"{pm}@{config.server.domains[0]}"
    why = _target_problem(config, directory, pm_addr, config.server.domains,
                          "bounces, notices and fetched mail nobody claims would be lost", answering=False)
    if why:
        out.append(Finding(ERROR, config.where("server", "postmaster"), f"the postmaster {why}", refuse_start=True))

    keys = _raw_keys(config, "aliases")
    for name, targets in config.aliases.items():
        scope = (name[1:],) if name.startswith("@") else _scope(name, config)
        for t in targets:
            why = _target_problem(config, directory, t, scope, f"mail to {name} goes to the postmaster instead")
            if why:
                out.append(Finding(ERROR, config.where("aliases", keys.get(name, name)), why))

    policy = config.policy
    if policy is None:
        return out
    keys = _raw_keys(config, "groups")
    for name, group in policy.groups.items():
        for m in group.members:
            why = _target_problem(config, directory, m, _scope(name, config),
                                  f"its share of mail to group {name} goes to the postmaster instead")
            if why:
                out.append(Finding(ERROR, config.where(f"groups.{keys.get(name, name)}", "members"), why))

    keys = _raw_keys(config, "forward")
    for user, fwd in policy.forwards.items():
        where = config.where(f"forward.{keys.get(user, user)}", "to")
        if not directory.users.exists(user):
            out.append(Finding(ERROR, config.where("forward", keys.get(user, user)),
                               f"there is no user {user!r}, so this forwarding never applies "
                               f"(add the user with: dialmail users add {user})"))
        for t in fwd.to:
            why = _target_problem(config, directory, t, _scope(user, config),
                                  f"mail forwarded from {user} goes to the postmaster instead")
            if why:
                out.append(Finding(ERROR, where, why))
    return out


def _users(config: Config, users) -> list[Finding]:
    out = []
    for name in users.names():
        domain = address.split(name)[1] if "@" in name else None
        if domain is not None and not config.server.is_local_domain(domain):
            out.append(Finding(ERROR, f"{users.path}: user {name}",
                               f"{domain} is not a local domain ([server] domains: {', '.join(config.server.domains)})"
                               f", so mail to {name} is sent out instead of to this mailbox: add the domain to "
                               f"[server] domains or run: dialmail users del {name}"))
    known = set(users.names())
    for admin in config.web.admins:
        if admin not in known:
            out.append(Finding(WARNING, config.where("web", "admins"),
                               f"{admin!r} is not a local user, so nobody logs in to the console as that admin: "
                               f"run: dialmail users add {admin}"))
    if config.web.listen and not config.web.admins:
        out.append(Finding(WARNING, config.where("web", "admins"),
                           "no admins: the console shows only the dashboard and each user's own settings"))
    return out


# ---------------------------------------------------------------- files


def _secret_file(where: str, path: Path) -> list[Finding]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return [Finding(ERROR, where, f"{path} does not exist: write the password into it, then chmod 600 {path}")]
    except OSError as exc:
        return [Finding(ERROR, where, f"cannot read {path}: {exc.strerror}")]
    if not stat.S_ISREG(st.st_mode):
        return [Finding(ERROR, where, f"{path} is not a file")]
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return [Finding(ERROR, where, f"{path} is readable by group or others "
                                      f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}")]
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        return [Finding(ERROR, where, f"cannot read {path}: {exc.strerror}")]
    except UnicodeDecodeError:
        return [Finding(ERROR, where, f"{path} is not UTF-8 text")]
    if not text.strip("\r\n"):
        return [Finding(ERROR, where, f"{path} is empty: write the password into it")]
    return []


def _tls(config: Config) -> list[Finding]:
    out = []
    pairs = [("smtp", config.smtp.tls_cert, config.smtp.tls_key), ("pop3", config.pop3.tls_cert, config.pop3.tls_key)]
    if config.submission is not None and "tls_cert" in config.raw.get("submission", {}):
        pairs.append(("submission", config.submission.tls_cert, config.submission.tls_key))
    for section, cert, key in pairs:
        if cert is None or key is None:
            continue
        why = _cert_problem(cert, key)
        if why:
            out.append(Finding(ERROR, config.where(section, "tls_cert"), why))
    return out


def _imap(config: Config) -> list[Finding]:
    """Dovecot managed or external: what gateway.imap.probe finds (a probe of the running one)."""
    from gateway.imap import probe
    if not config.imap.enabled:
        return []
    out = []
    imap = config.imap
    if imap.tls_cert and imap.tls_key and "tls_cert" in _raw_keys(config, "imap"):
        why = _cert_problem(imap.tls_cert, imap.tls_key)
        if why:
            out.append(Finding(ERROR, config.where("imap", "tls_cert"), why))
    for p in probe.check(config):
        out.append(Finding(ERROR if p.level == probe.ERROR else WARNING, config.where("imap", p.key), p.message))
    return out


def _cert_problem(cert: Path, key: Path) -> str | None:
    for p in (cert, key):
        if not os.access(p, os.R_OK):
            return f"cannot read {p}"
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        # A key with a passphrase cannot be loaded by the daemon either: never prompt for one.
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in str(exc):
            return f"the key {key} does not belong to the certificate {cert}"
        if reason in ("PEM_LIB", "NO_START_LINE") or "PEM" in reason:
            return f"{cert} or {key} is not a PEM certificate and key ({reason})"
        return f"cannot use {cert} with {key}: {reason}"
    except _Passphrase:
        return f"{key} is protected by a passphrase; the daemon cannot unlock it (store the key without one)"
    except OSError as exc:
        return f"cannot read {cert} or {key}: {exc.strerror or exc}"
    return None


class _Passphrase(Exception):
    pass


def _no_passphrase():
    raise _Passphrase()


# ---------------------------------------------------------------- the ISP side


def _smarthost(config: Config) -> list[Finding]:
    sh = config.smarthost
    out = []
    if sh.route == "smarthost":
        if not sh.host:
            out.append(Finding(WARNING, config.where("smarthost", "host"),
                               "no smarthost is set: mail to outside addresses waits in the queue"))
        elif not is_host_name(sh.host):
            out.append(Finding(ERROR, config.where("smarthost", "host"), _not_a_host(sh.host)))
    if sh.oauth is not None:
        out += _oauth(config, sh.oauth, "smarthost.oauth")
    elif sh.username and sh.password_file:
        out += _secret_file(config.where("smarthost", "password_file"), sh.password_file)
    if sh.ca_file:
        out += _ca_file(config.where("smarthost", "ca_file"), sh.ca_file)
    return out


def _oauth(config: Config, oauth, section: str, index: int = 0) -> list[Finding]:
    """The client secret and the stored token of an OAuth2 login (the token is never shown)."""
    from gateway.oauth import tokens
    from spool.tokens import REFUSED, TokenStoreError
    out = []
    if oauth.client_secret_file is not None:
        out += _secret_file(config.where(section, "client_secret_file", index), oauth.client_secret_file)
    where = config.where(section, None, index)
    try:
        rec = tokens.store_for(config).load(oauth.key)
    except ConfigError as exc:
        return out + [Finding(ERROR, config.where("server", "token_key_file"), str(exc).split(": ", 1)[-1])]
    except (TokenStoreError, OSError) as exc:
        return out + [Finding(ERROR, where, str(exc))]
    if rec is None:
        out.append(Finding(WARNING, where, f"no token stored yet: run `dialmail oauth login {oauth.account}` "
                                           f"(until then this login fails)"))
    elif rec.state == REFUSED:
        out.append(Finding(WARNING, where, tokens.refused_text(oauth.account, rec.error)))
    return out


def _ca_file(where: str, path: Path) -> list[Finding]:
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:  # before OSError, of which it is a kind
        return [Finding(ERROR, where, f"{path} holds no PEM certificates ({exc.reason or exc})")]
    except FileNotFoundError:
        return [Finding(ERROR, where, f"{path} does not exist")]
    except OSError as exc:
        return [Finding(ERROR, where, f"cannot read {path}: {exc.strerror or exc}")]
    return []


def _fetch(config: Config, directory: Directory) -> list[Finding]:
    out = []
    for i, f in enumerate(config.fetch):
        section = f"fetch[{f.name}]"
        if not is_host_name(f.host):
            out.append(Finding(ERROR, config.where(section, "host", i), _not_a_host(f.host)))
        if f.oauth is not None:
            out += _oauth(config, f.oauth, f"{section}.oauth", i)
        elif f.password_file is None:
            out.append(Finding(ERROR, config.where(section, "password_file", i),
                               f"is required: the file holding the password of {f.username} at {f.host}"))
        else:
            out += _secret_file(config.where(section, "password_file", i), f.password_file)
        if f.ca_file:
            out += _ca_file(config.where(section, "ca_file", i), f.ca_file)
        if f.mode == "single" and f.deliver_to:
            target = f.deliver_to if "@" in f.deliver_to else f"{f.deliver_to}@{config.server.domains[0]}"
            why = _target_problem(config, directory, target, config.server.domains,
                                  "fetched mail goes to the postmaster instead")
            if why:
                out.append(Finding(ERROR, config.where(section, "deliver_to", i), why))
    return out


def _clamd(config: Config) -> list[Finding]:
    virus = getattr(config.policy, "virus", None)
    if virus is None or virus.clamd is None:
        return []
    from gateway.policy.virus import ping
    why = ping(virus)
    if why is None:
        return []
    then = "mail is delivered unscanned" if virus.on_error == "accept" else \
        "mail waits unscanned (LAN senders get 451) until it answers"
    return [Finding(WARNING, config.where("virus", "clamd"),
                    f"{why}: {then} (virus on_error = {virus.on_error})")]


def _lmtp(config: Config) -> list[Finding]:
    target = config.delivery.lmtp
    if target is None:
        return []
    from gateway.delivery.stages.lmtp import probe
    why = probe(target)
    if why is None:
        return []
    return [Finding(WARNING, config.where("delivery", "lmtp"),
                    f"{why}: mail for local mailboxes waits in the queue until it answers")]
