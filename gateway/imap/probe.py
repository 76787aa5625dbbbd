"""What ``dialmail check`` finds wrong with IMAP before anyone relies on it.

Managed: Dovecot is installed, the mail user exists, Dovecot's processes can reach the
spool, and ``doveconf`` accepts the configuration dialmail would write.  External: the
admin's Dovecot runs, listens, uses dialmail's mail location and UIDL format, and finds
in a user's INBOX the messages dialmail's Maildir holds.
"""
from __future__ import annotations

import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Config, ConfigError
from gateway.imap import dovecotconf, store
from gateway.imap.supervisor import find_program, master_pid
from spool.maildir import Maildir, mailbox_path
from spool.users import Users

ERROR, WARNING = "error", "warning"
TIMEOUT = 10.0


@dataclass(frozen=True)
class Problem:
    level: str
    key: str | None  # the [imap] key it is about, for the line number
    message: str


def check(config: Config) -> list[Problem]:
    imap = config.imap
    if not imap.enabled:
        return []
    try:
        owner = store.mail_owner(config)
    except ConfigError as exc:
        return [Problem(ERROR, "mail_user", str(exc).split(": ", 1)[-1])]
    out = _reach(config, owner)
    if imap.dovecot == "managed":
        out += _managed(config, owner)
    else:
        out += _external(config, owner)
    return out


def _reach(config: Config, owner: store.MailOwner) -> list[Problem]:
    """Dovecot's users (dovecot, the mail user) must pass through every directory above the spool."""
    shut = store.closed_above(config.spool_dir) if owner.as_root else None
    if shut is None:
        return []
    return [Problem(ERROR, None, f"Dovecot's processes (users dovecot and {owner.user}) cannot pass through "
                                 f"{shut} on the way to the spool: run chmod o+x {shut}")]


def _managed(config: Config, owner: store.MailOwner) -> list[Problem]:
    out = []
    for program in ("dovecot", "doveconf"):
        if find_program(program) is None:
            return [Problem(ERROR, "dovecot", f"{program} is not installed: apt-get install dovecot-imapd, "
                                              f"or set dovecot = \"off\"")]
    if not owner.as_root and any(lst.port < 1024 for lst in config.imap.listen):
        out.append(Problem(WARNING, "listen", "dialmail does not run as root, so Dovecot cannot listen on a port "
                                              "below 1024 (use 1143, or run dialmail as root)"))
    paths = store.DovecotPaths(config.spool_dir)
    if master_pid(paths) is None:  # ours is not running, so whatever answers would stop it starting
        for lst, _greeting in _answering(config, greet=False):
            out.append(Problem(ERROR, "listen", f"something else already listens on {lst} (Debian's own Dovecot? "
                                                f"systemctl disable --now dovecot), so dialmail's Dovecot cannot"))
    text = dovecotconf.managed(config, owner, paths)
    with tempfile.NamedTemporaryFile("w", suffix=".conf", prefix="dialmail-dovecot-") as conf:
        conf.write(text)
        conf.flush()
        r = _run([find_program("doveconf"), "-c", conf.name, "-n"])
    if r.returncode:
        said = r.stderr.strip().replace(conf.name, str(paths.conf))
        out.append(Problem(ERROR, "dovecot", f"Dovecot refuses the configuration dialmail writes: {said}"))
    return out


def _external(config: Config, owner: store.MailOwner) -> list[Problem]:
    conf = config.imap.dovecot_config
    if find_program("doveadm") is None or find_program("doveconf") is None:
        return [Problem(ERROR, "dovecot", "doveadm is not installed: is Dovecot installed here? "
                                          "(apt-get install dovecot-imapd)")]
    if not conf.is_file():
        return [Problem(ERROR, "dovecot_config", f"{conf} does not exist: name your Dovecot's dovecot.conf")]
    settings = _doveconf(conf, "base_dir", "mail_location", "pop3_uidl_format")
    if isinstance(settings, Problem):
        return [settings]
    paths = store.DovecotPaths(config.spool_dir)
    ours = dovecotconf.mailbox_settings(config, owner, paths)
    out = []
    for key in ("mail_location", "pop3_uidl_format"):
        want = next(line.split(" = ", 1)[1] for line in ours.splitlines() if line.startswith(f"{key} = "))
        if settings[key] != want:
            out.append(Problem(ERROR, "dovecot_config", f"Dovecot's {key} is {settings[key]!r}, not dialmail's "
                                                        f"{want!r}: add the output of 'dialmail dovecot config' "
                                                        f"to {conf} and reload Dovecot"))
    if out:
        return out
    if not _running(Path(settings["base_dir"]) / "master.pid"):
        return [Problem(ERROR, "dovecot_config", f"Dovecot ({conf}) is not running: systemctl start dovecot")]
    out += _listening(config)
    out += _inbox_seen(config, conf)
    return out


def _doveconf(conf: Path, *keys: str) -> dict[str, str] | Problem:
    r = _run([find_program("doveconf"), "-c", str(conf), "-h", *keys])
    if r.returncode:
        return Problem(ERROR, "dovecot_config", f"doveconf cannot read {conf}: {r.stderr.strip()}")
    values = r.stdout.splitlines()
    return dict(zip(keys, values + [""] * (len(keys) - len(values))))


def _running(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    return Path(f"/proc/{pid}").exists()


def _answering(config: Config, greet: bool = True) -> list[tuple]:
    """(listen, greeting) for each [imap] listen address something accepts connections on (the
    OSError in place of a greeting that did not come; ``greet=False``: b"" without waiting)."""
    out = []
    for lst in config.imap.listen:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(lst.host, lst.host)
        try:
            with socket.create_connection((host, lst.port), timeout=TIMEOUT) as s:
                s.settimeout(TIMEOUT)
                out.append((lst, s.recv(512) if greet else b""))
        except ConnectionRefusedError:
            continue
        except OSError as exc:
            out.append((lst, exc))
    return out


def _listening(config: Config) -> list[Problem]:
    out = []
    answered = dict(_answering(config))
    for lst in config.imap.listen:
        greeting = answered.get(lst)
        if greeting is None or isinstance(greeting, OSError):
            why = f": {greeting.strerror or greeting}" if isinstance(greeting, OSError) else ""
            out.append(Problem(ERROR, "listen", f"nothing answers IMAP on {lst}{why}"))
        elif not greeting.startswith(b"* OK"):
            out.append(Problem(ERROR, "listen", f"{lst} does not greet like an IMAP server: {greeting[:60]!r}"))
    return out


def _inbox_seen(config: Config, conf: Path) -> list[Problem]:
    """Dovecot finds in one user's INBOX what dialmail's Maildir holds: the same mailbox."""
    names = Users(config.spool_dir).names()
    if not names:
        return []
    user = next((n for n in names if Maildir(mailbox_path(config.spool_dir, n)).exists()), names[0])
    box = Maildir(mailbox_path(config.spool_dir, user))
    r = _run([find_program("doveadm"), "-c", str(conf), "-f", "flow", "mailbox", "status", "-u", user,
              "messages", "INBOX"])
    if r.returncode:
        return [Problem(ERROR, "dovecot_config", f"Dovecot cannot open {user}'s mailbox: {r.stderr.strip()}")]
    theirs = r.stdout.strip().partition("messages=")[2]
    mine = len(box.messages()) if box.exists() else 0
    if theirs != str(mine):
        return [Problem(WARNING, "dovecot_config", f"Dovecot sees {theirs or '?'} messages in {user}'s INBOX, dialmail's "
                                                   f"Maildir holds {mine} (mail arriving meanwhile, or another mailbox?)")]
    return []


def _run(argv: list) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(argv, 1, "", str(exc))
