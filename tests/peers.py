"""Real mail peers for tests: Dovecot, smtp-sink, Postfix, clamd, and client runners.

Every peer listens on 127.0.0.1 only, on a free high port, with its whole
configuration in a private temporary directory.  It runs in its own session
(setsid) with a parent-death signal, and is stopped by PID at teardown:
SIGTERM, wait up to 10 s, SIGKILL; then any process left in its session is
reaped/killed by PID (the test process acts as child subreaper meanwhile, so
no zombies are left behind).  ``restart()`` stops and starts a peer on the
same ports with the same data.

Fixtures (re-exported by tests/conftest.py via ``from tests.peers import *``):

``dovecot``              Dovecot IMAP+POP3, STARTTLS offered but optional (``ssl = yes``),
                         plus implicit-TLS ports.  The server is started once per
                         session (``dovecot_server``); the function fixture wipes all
                         users and mail before and after each test, so every test
                         starts with no users: ``dovecot.add_user("alice", "secret")``.
                         Do not stop() it (restart() is fine).
``dovecot_notls``        same, ``ssl = no`` (no STARTTLS capability at all).
``smtp_sink``            a fresh Postfix ``smtp-sink`` per test, storing every
                         message with its envelope (``messages()``).
``smtp_sink_factory``    callable: ``smtp_sink_factory(hard_reject=["rcpt"])`` etc.
                         for fault injection; all sinks it made stop at teardown.
``postfix_smarthost``    real Postfix (root only, skipped otherwise) delivering to a
                         catch-all Maildir, per-recipient 4xx/5xx rules; session
                         server, reset per test.
``clamd``                clamd with a one-line EICAR body signature (session scope).
``peer_tmp``             a per-test temp dir that the peers' unprivileged users can
                         reach (pytest's ``tmp_path`` lives below a 0700 directory
                         owned by root, which Dovecot/smtp-sink/Postfix children,
                         running as dovecot/nobody, cannot traverse).

Client helpers: ``run_fetchmail``/``fetchmail_rc``, ``run_swaks``,
``run_getmail``/``getmail_rc``; plumbing: ``have``, ``need`` (pytest.skip naming
the Debian package), ``free_port``, ``wait_port``, ``listening_ports``,
``make_self_signed_cert``, ``peer_tmpdir``.  Packages: tests/peers-debian.txt.

Behaviour worth knowing (all checked on Debian 12, as root and as a user):
- Dovecot treats 127.0.0.1 -> 127.0.0.1 as a secured connection: plaintext
  LOGIN always works, even with ``ssl = required`` (so no such fixture).
- Dovecot's auth-failure penalty (anvil; 2-15 s delay for every later login
  from the same IP) is switched off, and passwords are checked by a
  checkpassword script because passwd-file notices changes only once a second.
- smtp-sink answers AUTH with 250 instead of 235 (smtplib login() fails), so
  AUTH is not announced by default; its faults hit every instance of a
  command: per-recipient replies need ``postfix_smarthost``.
- fetchmail as root locks /var/run/fetchmail.pid (run_fetchmail passes its
  own --pidfile) and checks certificate names against DNS names only
  (fetchmail_rc sets ``sslcommonname localhost``).
- getmail6 refuses to deliver to a Maildir as root: getmail_rc adds
  ``user = nobody`` and run_getmail chowns the Maildir.

Set ``DIALMAIL_KEEP_PEER_DIRS=1`` to keep the peers' directories (configs,
logs, mail) after the run for debugging.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import email
import email.message
import email.policy
import grp
import imaplib
import os
import poplib
import pwd
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import psutil
import pytest

__all__ = [
    # helpers
    "HOST",
    "IS_ROOT",
    "EICAR",
    "PeerStartError",
    "have",
    "need",
    "free_port",
    "wait_port",
    "listening_ports",
    "peer_tmpdir",
    "make_self_signed_cert",
    "run_fetchmail",
    "fetchmail_rc",
    "run_swaks",
    "run_getmail",
    "getmail_rc",
    # peers
    "MailUser",
    "Dovecot",
    "SinkMessage",
    "SmtpSink",
    "Delivered",
    "PostfixSmarthost",
    "Clamd",
    # fixtures
    "peer_tmp",
    "dovecot_server",
    "dovecot",
    "dovecot_notls_server",
    "dovecot_notls",
    "dovecot_zlib_server",
    "dovecot_zlib",
    "smtp_sink",
    "smtp_sink_factory",
    "postfix_smarthost_server",
    "postfix_smarthost",
    "clamd",
]

HOST = "127.0.0.1"
IS_ROOT = os.geteuid() == 0
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"

_KEEP_DIRS = bool(os.environ.get("DIALMAIL_KEEP_PEER_DIRS"))
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")

# program -> Debian package (must stay in sync with tests/peers-debian.txt)
_PACKAGE_OF = {
    "dovecot": "dovecot-imapd",
    "doveadm": "dovecot-core",
    "doveconf": "dovecot-core",
    "postfix": "postfix",
    "postconf": "postfix",
    "postsuper": "postfix",
    "postqueue": "postfix",
    "smtp-sink": "postfix",
    "smtp-source": "postfix",
    "fetchmail": "fetchmail",
    "swaks": "swaks",
    "socat": "socat",
    "clamd": "clamav-daemon",
    "clamscan": "clamav",
    "openssl": "openssl",
    "getmail": "getmail6",
    "mutt": "mutt",
    "wvdial": "wvdial",
    "curl": "curl",
    "chromium": "chromium",
    "chromedriver": "chromium-driver",
    "pppd": "ppp",
    "setpriv": "util-linux",
    "script": "bsdutils",
    "php": "php-cli",
}


class PeerStartError(RuntimeError):
    """A peer did not come up; the message carries the tail of its log.
    ``port_conflict``: a chosen port was taken meanwhile (start() then retries)."""

    def __init__(self, message: str, port_conflict: bool = False):
        super().__init__(message)
        self.port_conflict = port_conflict


# --------------------------------------------------------------------------
# programs, ports, processes


def _which(program: str) -> str | None:
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(_SBIN_DIRS)
    return shutil.which(program, path=path)


def have(*programs: str) -> bool:
    """True when every program is installed (``/usr/sbin`` is searched too)."""
    return all(_which(p) for p in programs)


def need(*programs: str) -> None:
    """pytest.skip() unless every program is installed, naming the Debian package."""
    missing = [p for p in programs if not _which(p)]
    if missing:
        pkgs = sorted({_PACKAGE_OF.get(p, p) for p in missing})
        pytest.skip(
            f"needs {', '.join(missing)} (Debian: apt-get install {' '.join(pkgs)}; "
            "see tests/peers-debian.txt)"
        )


def _prog(program: str) -> str:
    found = _which(program)
    if not found:
        raise FileNotFoundError(f"{program} not installed (Debian package {_PACKAGE_OF.get(program, program)})")
    return found


def free_port(host: str = HOST) -> int:
    """A currently free TCP port on host (bind port 0, read it, close).

    Racy by nature; the peers below retry startup with a new port when the
    chosen one got taken in between.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until host:port accepts a TCP connection.

    With ``proc``, fail early (PeerStartError) when that process has exited.
    Raises TimeoutError after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise PeerStartError(f"process {proc.args!r} exited with {proc.returncode} before {host}:{port} was open")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} not accepting connections after {timeout} s")
        time.sleep(0.02)


def _descendants(pid: int) -> list[psutil.Process]:
    """All live descendants of pid."""
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if not _is_zombie(p)]
    except psutil.NoSuchProcess:
        return []


def _is_zombie(process: psutil.Process) -> bool:
    try:
        return process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


def _session_members(sid: int) -> list[psutil.Process]:
    """Every process of session sid (zombies included) but this one."""
    members = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and os.getsid(process.pid) == sid:
                members.append(process)
        except OSError:  # gone since the listing
            pass
    return members


def _peer_preexec() -> None:  # runs in the child between fork and exec
    os.setsid()  # own session: every process of the peer is found (and reaped) by session id
    try:  # and die with the test run even if it is SIGKILLed
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _listening(pid: int, with_children: bool = True) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that pid (or its children) holds."""
    try:
        processes = [psutil.Process(pid)] + (_descendants(pid) if with_children else [])
    except psutil.NoSuchProcess:
        return set()
    out = set()
    for process in processes:
        try:
            connections = process.net_connections(kind="tcp")
        except psutil.Error:  # gone, or not ours to look at
            continue
        out.update((c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN)
    return out


def listening_ports(pid: int, with_children: bool = True) -> set[int]:
    """TCP ports (IPv4/IPv6) in LISTEN state whose sockets pid (or its children) holds."""
    return {port for _address, port in _listening(pid, with_children)}


_LIVE: set[_Peer] = set()


@atexit.register
def _stop_leftovers() -> None:  # last resort when a fixture teardown never ran
    for peer in list(_LIVE):
        try:
            peer.stop()
        except Exception:
            pass


_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER, _PR_GET_CHILD_SUBREAPER = 1, 36, 37


@contextlib.contextmanager
def _subreaper():
    """Temporarily make this process the child subreaper (Linux prctl)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        was = ctypes.c_int(0)
        libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0)
        changed = not was.value and libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        changed = False
    try:
        yield
    finally:
        if changed:
            libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def peer_tmpdir(prefix: str = "peer") -> Path:
    """A fresh temp dir that unprivileged peer users (dovecot, nobody, postfix) can traverse."""
    d = Path(tempfile.mkdtemp(prefix=f"dialmail-{prefix}-"))
    d.chmod(0o711)
    return d


def _chown(path: Path, user: str) -> None:
    if IS_ROOT:
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def make_self_signed_cert(directory: Path | str, cn: str = "localhost") -> tuple[Path, Path]:
    """Write cert.pem/key.pem (EC P-256, SAN IP:127.0.0.1 + DNS:localhost); return their paths."""
    directory = Path(directory)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [_prog("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "3650", "-subj", f"/CN={cn}",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=30,
    )
    key.chmod(0o600)
    return cert, key


class _Peer:
    """Common process handling: spawn, readiness, stop by PID."""

    name = "peer"
    start_attempts = 3

    def __init__(self, basedir: Path | str | None = None):
        self._own_dir = basedir is None
        self.dir = Path(basedir) if basedir else peer_tmpdir(self.name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.output_path = self.dir / "output.log"  # the daemon's stdout/stderr

    # -- to override
    def _prepare(self) -> None:
        """Pick ports and write configuration."""

    def _launch(self) -> None:
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        return self.output_path

    # --
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def log(self) -> str:
        """The peer's log text (for assertions and failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _spawn(self, argv: Sequence[str], env: dict | None = None) -> None:
        with open(self.output_path, "ab") as out:
            self.proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.dir, env=env, preexec_fn=_peer_preexec,  # noqa: PLW1509 (no threads here)
            )
        _LIVE.add(self)

    def _wait_listening(self, ports: Iterable[int], timeout: float = 15.0) -> None:
        ports = set(ports)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                logs = f"--- {self.log_path}:\n{_tail(self.log_path)}"
                if self.output_path != self.log_path:
                    logs += f"\n--- {self.output_path}:\n{_tail(self.output_path)}"
                raise PeerStartError(f"{self.name} exited with {self.proc.returncode}\n{logs}",
                                     port_conflict="in use" in logs)
            # every listener first, then ours: one opened in between is not taken as another's
            listeners = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="tcp")
                         if c.status == psutil.CONN_LISTEN}
            ours = _listening(self.proc.pid)
            if ports <= {port for _address, port in ours}:
                # a socket in LISTEN state held by our process: connections are
                # queued from now on (no probe connection needed)
                return
            taken = {port for address, port in listeners - ours if port in ports}
            if taken:  # some daemons (clamd) keep running without their TCP port
                raise PeerStartError(f"{self.name}: port(s) {sorted(taken)} taken by another process",
                                     port_conflict=True)
            if time.monotonic() >= deadline:
                raise PeerStartError(
                    f"{self.name} not listening on {sorted(ports)} after {timeout} s\n--- log:\n{_tail(self.log_path)}"
                )
            time.sleep(0.02)

    def start(self):
        """Start (retrying with new ports); on failure everything is cleaned up."""
        try:
            for attempt in range(self.start_attempts):
                self._prepare()
                try:
                    self._launch()
                    return self
                except PeerStartError as e:  # a port taken since free_port(): retry
                    self._stop_process()
                    if not e.port_conflict or attempt == self.start_attempts - 1:
                        raise
        except BaseException:
            self.stop()
            raise

    def _stop_process(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        sid = proc.pid  # the peer runs in its own session (see _peer_preexec)
        # Children that outlive their master would be re-parented to PID 1
        # (which may be slow to reap them); as a subreaper we adopt and reap them.
        with _subreaper():
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
            # the rest of the session normally exits with the master; reap the
            # zombies we adopted, SIGKILL stragglers after 3 s, give up after 6 s
            start = time.monotonic()
            killed = False
            while True:
                for member in _session_members(sid):
                    if _is_zombie(member):
                        try:
                            os.waitpid(member.pid, os.WNOHANG)
                        except ChildProcessError:
                            pass
                members = _session_members(sid)
                if not members:
                    break
                waited = time.monotonic() - start
                if waited > 3 and not killed:
                    for member in members:
                        if not _is_zombie(member):
                            try:
                                member.kill()
                            except psutil.NoSuchProcess:
                                pass
                    killed = True
                if waited > 6:
                    break
                time.sleep(0.02)

    def restart(self, timeout: float = 10.0):
        """Stop the daemon and start it again on the same ports with the same
        data (e.g. to test reconnecting after a server outage)."""
        self._stop_process()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._launch()
                return self
            except PeerStartError as e:
                self._stop_process()
                if not e.port_conflict or time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        """Stop the daemon (and all its processes) and delete its directory."""
        try:
            self._stop_process()
        finally:
            _LIVE.discard(self)
            if self._own_dir and not _KEEP_DIRS:
                shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


# --------------------------------------------------------------------------
# Dovecot


@dataclasses.dataclass(frozen=True)
class MailUser:
    name: str
    password: str


_DOVECOT_CONF = """\
# generated by tests/peers.py
protocols = imap pop3
listen = {host}
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
auth_failure_delay = 0
mail_location = maildir:{d}/mail/%u/Maildir
pop3_uidl_format = %08Xu%08Xv
mail_max_userip_connections = 100
default_internal_user = {internal_user}
default_internal_group = {internal_group}
default_login_user = {login_user}
first_valid_uid = 1
# checkpassword instead of passwd-file: passwd-file re-reads its file at most
# once per second, so a user added right after another login would be unknown
passdb {{
  driver = checkpassword
  args = {d}/checkpassword
}}
userdb {{
  driver = static
  # doveadm (save, search, ...) must not ask the passdb whether the user exists
  args = uid={mail_user} gid={mail_group} home={d}/mail/%u allow_all_users=yes
}}
service imap-login {{
{chroot}  inet_listener imap {{
    address = {host}
    port = {imap_port}
  }}
  inet_listener imaps {{
    address = {host}
    port = {imaps_port}
  }}
}}
service pop3-login {{
{chroot}  inet_listener pop3 {{
    address = {host}
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    address = {host}
    port = {pop3s_port}
  }}
}}
service anvil {{
{chroot}  # auth cannot open this socket => no auth-failure penalty (delays of 2-15 s
  # for every login from 127.0.0.1 after a failed one would slow down later tests)
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service ipc {{
{chroot}}}
{compress}"""

# RFC 4978 COMPRESS=DEFLATE, as an ISP running Dovecot 2.3 offers it
_DOVECOT_COMPRESS = """\
mail_plugins = $mail_plugins zlib
protocol imap {
  mail_plugins = $mail_plugins imap_zlib
}
"""


# checkpassword(8) protocol: fd 3 carries "user\0password\0..."; exit 1 = mismatch.
# USERS is replaced by the users file path.
_CHECKPASSWORD = r"""#!/bin/sh
{ IFS= read -r user; IFS= read -r pass; } <<EOF
$(tr '\000' '\n' <&3)
EOF
grep -qxF -e "$user:{PLAIN}$pass" 'USERS' || exit 1
USER=$user
export USER
exec "$@"
"""


# passdb oauth2 (Dovecot 2.3): every XOAUTH2/OAUTHBEARER token is asked about at the
# introspection endpoint (RFC 7662, POST token=...); "active": true with a username logs in.
_DOVECOT_OAUTH2 = """\
introspection_mode = post
introspection_url = {url}
username_attribute = username
active_attribute = active
active_value = true
force_introspection = yes
"""


class Dovecot(_Peer):
    """Dovecot IMAP + POP3 on 127.0.0.1; users and plain passwords in ``users_file``,
    checked by a checkpassword script at every login (changes apply at once).

    tls: ``"starttls"`` (default; ``ssl = yes``: STARTTLS/STLS offered, plaintext
    login still allowed, implicit TLS on ``imaps_port``/``pop3s_port``) or
    ``"none"`` (``ssl = no``: no STARTTLS capability; imaps/pop3s ports None).
    There is no "TLS required" mode: Dovecot treats a connection whose remote
    and local IP are equal (127.0.0.1 -> 127.0.0.1) as secured, so
    ``ssl = required`` would still accept plaintext logins here.
    ``cert`` is the self-signed certificate (CN localhost, SAN IP:127.0.0.1) to
    trust; ``ssl_context()`` builds a client context that verifies it.

    As root the mail processes run as the Debian ``dovecot`` user (login
    processes as ``dovenull``); otherwise everything runs as the calling user.
    """

    name = "dovecot"

    def __init__(self, basedir: Path | str | None = None, *, tls: str = "starttls",
                 introspection_url: str | None = None, compress: bool = False):
        if tls not in ("starttls", "none"):
            raise ValueError(f"tls must be 'starttls' or 'none', not {tls!r}")
        super().__init__(basedir)
        self.tls = tls
        # With an RFC 7662 introspection endpoint, Dovecot also takes SASL XOAUTH2 and
        # OAUTHBEARER, asking that endpoint about every bearer token (passdb oauth2).
        self.introspection_url = introspection_url
        self.compress = compress  # offer COMPRESS=DEFLATE (the imap_zlib plugin)
        self.host = HOST
        self.imap_port = self.pop3_port = 0
        self.imaps_port: int | None = None
        self.pop3s_port: int | None = None
        self.cert: Path | None = None
        self.key: Path | None = None
        self.conf = self.dir / "dovecot.conf"
        self.users_file = self.dir / "users"
        self.mail_root = self.dir / "mail"
        self.users: dict[str, str] = {}
        if IS_ROOT:
            self.mail_owner = "dovecot"
        else:
            self.mail_owner = pwd.getpwuid(os.geteuid()).pw_name

    @property
    def log_path(self) -> Path:
        return self.dir / "dovecot.log"

    def _prepare(self) -> None:
        d = self.dir
        for sub in ("run", "state", "mail"):
            (d / sub).mkdir(exist_ok=True)
        _chown(self.mail_root, self.mail_owner)
        self._write_users()
        checkpw = d / "checkpassword"
        checkpw.write_text(_CHECKPASSWORD.replace("USERS", str(self.users_file)))
        checkpw.chmod(0o755)
        if self.tls != "none" and self.cert is None:
            self.cert, self.key = make_self_signed_cert(d)
        self.imap_port, self.pop3_port = free_port(), free_port()
        if self.tls == "none":
            ssl_conf = "ssl = no"
            self.imaps_port = self.pop3s_port = None
        else:
            ssl_conf = (f"ssl = yes\n"
                        f"ssl_cert = <{self.cert}\nssl_key = <{self.key}")
            self.imaps_port, self.pop3s_port = free_port(), free_port()
        if IS_ROOT:
            users = {"internal_user": "dovecot", "internal_group": "dovecot", "login_user": "dovenull",
                     "mail_user": "dovecot", "mail_group": "dovecot", "chroot": ""}
        else:
            me = self.mail_owner
            group = grp.getgrgid(os.getegid()).gr_name
            users = {"internal_user": me, "internal_group": group, "login_user": me,
                     "mail_user": me, "mail_group": group, "chroot": "  chroot =\n"}
        conf = _DOVECOT_CONF.format(
            d=d, host=HOST, ssl=ssl_conf, imap_port=self.imap_port, pop3_port=self.pop3_port,
            imaps_port=self.imaps_port or 0, pop3s_port=self.pop3s_port or 0,
            compress=_DOVECOT_COMPRESS if self.compress else "", **users)
        if self.introspection_url:
            (d / "oauth2.conf.ext").write_text(_DOVECOT_OAUTH2.format(url=self.introspection_url))
            conf = conf.replace("auth_mechanisms = plain login\n",
                                "auth_mechanisms = plain login xoauth2 oauthbearer\n")
            conf = conf.replace("passdb {\n  driver = checkpassword",
                                "passdb {\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n"
                                f"  args = {d}/oauth2.conf.ext\n}}\n"
                                "passdb {\n  driver = checkpassword\n  mechanisms = plain login")
        self.conf.write_text(conf)
        check = subprocess.run([_prog("doveconf"), "-c", str(self.conf), "-n"], capture_output=True, text=True)
        if check.returncode:
            raise RuntimeError(f"dovecot config rejected: {check.stderr}")

    def _launch(self) -> None:
        self._spawn([_prog("dovecot"), "-F", "-c", str(self.conf)])
        ports = [self.imap_port, self.pop3_port]
        if self.imaps_port:
            ports += [self.imaps_port, self.pop3s_port]
        self._wait_listening(ports)

    # -- users
    def _write_users(self) -> None:
        tmp = self.users_file.with_suffix(".tmp")
        tmp.write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in self.users.items()))
        tmp.chmod(0o644)
        tmp.replace(self.users_file)  # atomic; read by the checkpassword script per login

    def add_user(self, name: str, password: str) -> MailUser:
        """Add (or re-password) a login; the mailbox is created on first use."""
        if not re.fullmatch(r"[A-Za-z0-9._@+-]+", name) or "\n" in password or "\0" in password:
            raise ValueError("user name must be [A-Za-z0-9._@+-]+, password without newline/NUL")
        self.users[name] = password
        self._write_users()
        return MailUser(name, password)

    def remove_user(self, name: str) -> None:
        """Forget the login, disconnect its sessions and delete its mail."""
        self.users.pop(name, None)
        self._write_users()
        self.kick(name)
        shutil.rmtree(self.mail_root / name, ignore_errors=True)

    def reset(self) -> None:
        """Remove every user and all mail (used between tests)."""
        for name in list(self.users):
            self.remove_user(name)
        for leftover in self.mail_root.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)

    def kick(self, name: str) -> None:
        """Disconnect the user's IMAP/POP3 sessions."""
        if self.proc is not None and self.proc.poll() is None:
            self.doveadm("kick", name, check=False)

    # -- doveadm
    def doveadm(self, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``doveadm -c <conf> args...`` (output as text)."""
        r = subprocess.run([_prog("doveadm"), "-c", str(self.conf), *args], input=input,
                           capture_output=True, timeout=30)
        r.stdout, r.stderr = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
        if check and r.returncode:
            raise RuntimeError(f"doveadm {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def _need_user(self, user: str) -> None:
        if user not in self.users:
            raise KeyError(f"unknown dovecot user {user!r}; call add_user() first")

    def create_folder(self, user: str, folder: str) -> None:
        self._need_user(user)
        if folder.upper() != "INBOX" and folder not in self.folders(user):
            self.doveadm("mailbox", "create", "-u", user, folder)

    def folders(self, user: str) -> list[str]:
        self._need_user(user)
        return self.doveadm("mailbox", "list", "-u", user).stdout.split()

    def save(self, user: str, message: bytes | str, folder: str = "INBOX", flags: Sequence[str] = ()) -> int:
        """Store one message (doveadm save); returns its UID. Creates the folder if needed.
        flags: e.g. ``[r"\\Seen"]``."""
        self._need_user(user)
        if isinstance(message, str):
            message = message.encode()
        self.create_folder(user, folder)
        self.doveadm("save", "-u", user, "-m", folder, input=message)
        uid = max(self.list_uids(user, folder))
        if flags:
            self.set_flags(user, [uid], flags, folder)
        return uid

    def save_many(self, user: str, messages: Iterable[bytes | str], folder: str = "INBOX") -> list[int]:
        """Store many messages over one IMAP connection (APPEND; much faster than
        save() for hundreds of messages); returns their UIDs."""
        self._need_user(user)
        self.create_folder(user, folder)
        before = set(self.list_uids(user, folder))
        m = self.imap(user)
        try:
            for message in messages:
                typ, data = m.append(folder, None, None, message.encode() if isinstance(message, str) else message)
                if typ != "OK":
                    raise RuntimeError(f"APPEND failed: {data}")
        finally:
            m.logout()
        return [u for u in self.list_uids(user, folder) if u not in before]

    def set_flags(self, user: str, uids: Iterable[int], flags: Sequence[str], folder: str = "INBOX") -> None:
        """Add IMAP flags (e.g. ``\\Seen``, ``\\Deleted``) to the given UIDs."""
        self._need_user(user)
        uid_set = ",".join(str(u) for u in uids)
        if uid_set:
            self.doveadm("flags", "add", "-u", user, " ".join(flags), "mailbox", folder, "uid", uid_set)

    def list_uids(self, user: str, folder: str = "INBOX") -> list[int]:
        """UIDs of the messages in folder, ascending."""
        self._need_user(user)
        out = self.doveadm("search", "-u", user, "mailbox", folder, "ALL").stdout
        return sorted(int(line.split()[1]) for line in out.splitlines() if line.strip())

    def _status(self, user: str, field: str, folder: str) -> int:
        self._need_user(user)
        out = self.doveadm("-f", "flow", "mailbox", "status", "-u", user, field, folder).stdout
        m = re.search(rf"\b{field}=(\d+)", out)
        if not m:
            raise RuntimeError(f"unexpected doveadm output: {out!r}")
        return int(m.group(1))

    def message_count(self, user: str, folder: str = "INBOX") -> int:
        return self._status(user, "messages", folder)

    def uidvalidity(self, user: str, folder: str = "INBOX") -> int:
        return self._status(user, "uidvalidity", folder)

    def maildir(self, user: str, folder: str = "INBOX") -> Path:
        base = self.mail_root / user / "Maildir"
        return base if folder.upper() == "INBOX" else base / f".{folder}"

    def reset_uidvalidity(self, user: str, folder: str = "INBOX", renumber: bool = True) -> int:
        """Force a UIDVALIDITY change of folder (as after a server-side mailbox rebuild).

        renumber=True also throws away the UID map (dovecot-uidlist and indexes),
        so the same messages come back with UIDs assigned afresh from 1;
        renumber=False keeps the UIDs and only bumps UIDVALIDITY.
        Returns the new UIDVALIDITY (always different from the old one).
        """
        self._need_user(user)
        old = self.uidvalidity(user, folder)
        self.kick(user)
        if renumber:
            md = self.maildir(user, folder)
            for f in md.iterdir():
                if f.name.startswith("dovecot-uidlist") or f.name.startswith("dovecot.index"):
                    f.unlink()
            # the mailbox list index remembers the old UIDVALIDITY; drop it too
            for f in (self.mail_root / user / "Maildir").glob("dovecot.list.index*"):
                f.unlink()
            self.doveadm("force-resync", "-u", user, folder)
        new = self.uidvalidity(user, folder)
        if new == old:
            new = old + 1
            self.doveadm("mailbox", "update", "-u", user, "--uid-validity", str(new), folder)
        return self.uidvalidity(user, folder)

    # -- clients (stdlib)
    def ssl_context(self) -> ssl.SSLContext:
        """Client context that verifies the server against ``cert``."""
        if self.cert is None:
            raise RuntimeError("this Dovecot has no TLS (tls='none')")
        return ssl.create_default_context(cafile=str(self.cert))

    def imap(self, user: str | None = None, *, starttls: bool = False, implicit_tls: bool = False,
             timeout: float = 10) -> imaplib.IMAP4:
        """An imaplib connection, logged in as user when given."""
        if implicit_tls:
            m = imaplib.IMAP4_SSL(HOST, self.imaps_port, ssl_context=self.ssl_context(), timeout=timeout)
        else:
            m = imaplib.IMAP4(HOST, self.imap_port, timeout=timeout)
            if starttls:
                m.starttls(ssl_context=self.ssl_context())
        if user is not None:
            m.login(user, self.users[user])
        return m

    def pop3(self, user: str | None = None, *, starttls: bool = False, implicit_tls: bool = False,
             timeout: float = 10) -> poplib.POP3:
        """A poplib connection, logged in as user when given."""
        if implicit_tls:
            p = poplib.POP3_SSL(HOST, self.pop3s_port, context=self.ssl_context(), timeout=timeout)
        else:
            p = poplib.POP3(HOST, self.pop3_port, timeout=timeout)
            if starttls:
                p.stls(context=self.ssl_context())
        if user is not None:
            p.user(user)
            p.pass_(self.users[user])
        return p


# --------------------------------------------------------------------------
# smtp-sink


@dataclasses.dataclass
class SinkMessage:
    """One mail transaction captured by smtp-sink.

    ``data`` is the message exactly as the client sent it after DATA (dot
    unstuffed, LF line ends), without smtp-sink's pseudo headers and
    Received line; ``raw`` is the whole capture file.
    """

    path: Path
    client_addr: str
    proto: str
    helo: str | None
    mail_args: str
    rcpt_args: list[str]
    received: str
    data: bytes
    raw: bytes

    @property
    def body(self) -> bytes:
        """Alias of ``data``: the original message as sent after DATA."""
        return self.data

    @property
    def mail_from(self) -> str:
        """Envelope sender without <> ('' for the null sender)."""
        return _addr(self.mail_args)

    @property
    def rcpts(self) -> list[str]:
        """Envelope recipients without <>, in RCPT order."""
        return [_addr(a) for a in self.rcpt_args]

    @property
    def message(self) -> email.message.EmailMessage:
        return email.message_from_bytes(self.data, policy=email.policy.default)


def _addr(args: str) -> str:
    m = re.match(r"\s*<([^>]*)>", args)
    return m.group(1) if m else args.split()[0] if args.split() else ""


def _parse_sink_file(path: Path) -> SinkMessage:
    raw = path.read_bytes()
    fields: dict[str, list[str]] = {}
    pos = 0
    received = ""
    while pos < len(raw):
        end = raw.find(b"\n", pos)
        end = len(raw) if end < 0 else end
        line = raw[pos:end].decode("utf-8", "replace")
        pos = end + 1
        name, _, value = line.partition(":")
        if name == "Received":
            # three-line header: continuation lines start with white space
            received = value.strip()
            while pos < len(raw) and raw[pos:pos + 1] in (b"\t", b" "):
                end = raw.find(b"\n", pos)
                end = len(raw) if end < 0 else end
                received += " " + raw[pos:end].decode("utf-8", "replace").strip()
                pos = end + 1
            break
        fields.setdefault(name, []).append(value.strip())
    data = raw[pos:]
    if data.endswith(b"\n\n"):  # smtp-sink appends one empty line per message
        data = data[:-1]
    return SinkMessage(
        path=path,
        client_addr=fields.get("X-Client-Addr", [""])[0],
        proto=fields.get("X-Client-Proto", [""])[0],
        helo=fields.get("X-Helo-Args", [None])[0],
        mail_args=fields.get("X-Mail-Args", [""])[0],
        rcpt_args=fields.get("X-Rcpt-Args", []),
        received=received,
        data=data,
        raw=raw,
    )


def _cmds(cmds: str | Iterable[str]) -> str:
    return cmds if isinstance(cmds, str) else ",".join(cmds)


class SmtpSink(_Peer):
    """Postfix ``smtp-sink`` on 127.0.0.1 (port chosen by the kernel, read back).

    Every DATA transaction is stored as one file with the envelope
    (``messages()``, ``wait_messages(n)``).  Fault injection, per SMTP command
    name (CONNECT, HELO, EHLO, MAIL, RCPT, DATA, ".", RSET, QUIT, ...):

    hard_reject   -f  5xx reply (text: hard_reply, default "500 5.3.0 Error: command failed")
    soft_reject   -r  4xx reply (text: soft_reply, default "450 4.3.0 Error: command failed")
    disconnect    -q  drop the connection without a reply
    disconnect_421 -Q reply 421 and disconnect
    delays        -W  {"rcpt": 2.0} wait before replying to a command
    abort_data_after -A  550 and stop reading N seconds after DATA
    no_esmtp -e, no_pipelining -p, no_8bitmime -8, no_dsn -N, no_enhanced -E, lmtp -L,
    announce_auth: smtp-sink answers AUTH with 250 (not 235), so it is off by default
    (-a); smtplib's login() cannot succeed against it.

    smtp-sink applies a fault to EVERY instance of the command: it cannot
    reject some recipients and accept others -- use PostfixSmarthost for that.
    As root it drops privileges to ``nobody`` (-u) after binding.
    """

    name = "smtp-sink"

    def __init__(self, basedir: Path | str | None = None, *,
                 hard_reject: str | Iterable[str] = (), soft_reject: str | Iterable[str] = (),
                 disconnect: str | Iterable[str] = (), disconnect_421: str | Iterable[str] = (),
                 hard_reply: str | None = None, soft_reply: str | None = None,
                 delays: dict[str, float] | None = None, abort_data_after: float | None = None,
                 no_esmtp: bool = False, no_pipelining: bool = False, no_8bitmime: bool = False,
                 no_dsn: bool = False, no_enhanced: bool = False, lmtp: bool = False,
                 announce_auth: bool = False, hostname: str = "sink.test",
                 extra_args: Sequence[str] = ()):
        super().__init__(basedir)
        self.host = HOST
        self.port = 0
        self.spool = self.dir / "msgs"
        a: list[str] = ["-h", hostname, "-t", "30"]
        for flag, cmds in (("-f", hard_reject), ("-r", soft_reject), ("-q", disconnect), ("-Q", disconnect_421)):
            if cmds:
                a += [flag, _cmds(cmds)]
        if hard_reply:
            a += ["-B", hard_reply]
        if soft_reply:
            a += ["-b", soft_reply]
        for cmd, secs in (delays or {}).items():
            a += ["-W", f"{cmd}:{secs:g}"]
        if abort_data_after is not None:
            a += ["-A", f"{abort_data_after:g}"]
        for on, flag in ((no_esmtp, "-e"), (no_pipelining, "-p"), (no_8bitmime, "-8"), (no_dsn, "-N"),
                         (no_enhanced, "-E"), (lmtp, "-L"), (not announce_auth, "-a")):
            if on:
                a.append(flag)
        self.args = a + list(extra_args)

    def _prepare(self) -> None:
        self.spool.mkdir(exist_ok=True)
        _chown(self.spool, "nobody")

    def _launch(self) -> None:
        argv = [_prog("smtp-sink")] + (["-u", "nobody"] if IS_ROOT else [])
        # port 0: the kernel picks a free port, read back below (restart() reuses it)
        argv += self.args + ["-d", f"{self.spool}/%Y%m%d%H%M%S.", f"{HOST}:{self.port}", "100"]
        self._spawn(argv)
        if self.port:
            self._wait_listening([self.port], timeout=10)
            return
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise PeerStartError(f"smtp-sink exited with {self.proc.returncode}: {_tail(self.output_path)}")
            ports = listening_ports(self.proc.pid, with_children=False)
            if ports:
                self.port = ports.pop()
                return
            if time.monotonic() >= deadline:
                raise PeerStartError("smtp-sink did not open its port")
            time.sleep(0.01)

    def messages(self) -> list[SinkMessage]:
        """Captured transactions, oldest first by file modification time.

        Transactions finished within the same filesystem clock tick (a few ms)
        may come back in either order: match by content (Subject, rcpts) when
        several messages arrive quickly.  A file is complete once the client
        has the reply to the final '.'; a transaction in progress may show up
        partially."""
        files = [p for p in self.spool.iterdir() if p.is_file()] if self.spool.exists() else []
        files.sort(key=lambda p: (p.stat().st_mtime_ns, p.stat().st_ino, p.name))
        return [_parse_sink_file(p) for p in files]

    def wait_messages(self, count: int, timeout: float = 10.0) -> list[SinkMessage]:
        """Wait until at least count messages were captured; return them all."""
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.messages()
            if len(msgs) >= count:
                return msgs
            if time.monotonic() >= deadline:
                raise TimeoutError(f"smtp-sink has {len(msgs)} messages, expected {count}")
            time.sleep(0.05)

    def clear(self) -> None:
        for p in self.spool.iterdir():
            p.unlink()


# --------------------------------------------------------------------------
# Postfix smarthost

_POSTFIX_MAIN = """\
# generated by tests/peers.py
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = smarthost.test
mydomain = test
myorigin = $myhostname
inet_interfaces = {host}
inet_protocols = ipv4
mydestination =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = check_recipient_access regexp:{d}/etc/recipient_access, permit_mynetworks, reject
smtpd_peername_lookup = no
maillog_file = {d}/maillog
maillog_file_prefixes = {d}, /dev/stdout
virtual_mailbox_domains = regexp:{d}/etc/vdomains
virtual_mailbox_maps = static:catchall/
virtual_mailbox_base = {d}/vmail
virtual_minimum_uid = 1
virtual_uid_maps = static:{vuid}
virtual_gid_maps = static:{vgid}
alias_maps =
alias_database =
default_transport = error:outbound mail disabled in tests
relay_transport = error:outbound mail disabled in tests
biff = no
smtputf8_enable = no
append_dot_mydomain = no
# every daemon re-reads main.cf and the access table for each client
max_use = 1
"""

DEFAULT_RECIPIENT_RULES = (
    "/^temp/ 450 4.2.0 try later\n"
    "/^bad/ 550 5.1.1 no such user\n"
)


@dataclasses.dataclass
class Delivered:
    """One message Postfix delivered into the catch-all Maildir (one file per recipient)."""

    path: Path
    raw: bytes

    @property
    def message(self) -> email.message.EmailMessage:
        return email.message_from_bytes(self.raw, policy=email.policy.default)

    def _hdr(self, name: str) -> str | None:
        v = email.message_from_bytes(self.raw.split(b"\n\n", 1)[0] + b"\n\n").get(name)
        return None if v is None else str(v).strip()

    @property
    def original_to(self) -> str | None:
        return self._hdr("X-Original-To")

    @property
    def delivered_to(self) -> str | None:
        return self._hdr("Delivered-To")

    @property
    def return_path(self) -> str | None:
        """Envelope sender without <>."""
        v = self._hdr("Return-Path")
        return None if v is None else v.strip("<>")


class PostfixSmarthost(_Peer):
    """A real Postfix (``postfix start-fg``) accepting mail from 127.0.0.1 for any
    domain and delivering every recipient into one catch-all Maildir
    (``delivered()``).  Root only: Postfix refuses to start otherwise.

    Recipients are checked against a regexp ``check_recipient_access`` table
    (``set_recipient_rules``); the default rules make ``temp*`` recipients 450
    and ``bad*`` recipients 550.  ``set_params(message_size_limit=1000)`` edits
    main.cf.  Log: ``log()`` (maillog in the peer dir).
    """

    name = "postfix"

    def __init__(self, basedir: Path | str | None = None, *, recipient_rules: str = DEFAULT_RECIPIENT_RULES,
                 params: dict[str, str | int] | None = None):
        super().__init__(basedir)
        self.host = HOST
        self.port = 0
        self.etc = self.dir / "etc"
        self.vmail = self.dir / "vmail"
        self.catchall = self.vmail / "catchall"
        self.access_table = self.etc / "recipient_access"
        self._initial_rules = recipient_rules
        self._initial_params = dict(params or {})
        self._params: dict[str, str] = {}

    @property
    def log_path(self) -> Path:
        return self.dir / "maillog"

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([_prog("postfix"), "-c", str(self.etc), *args], capture_output=True, text=True, timeout=60)
        if check and r.returncode:
            raise RuntimeError(f"postfix {' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}"
                               " (early errors go to syslog only; try: script -qc 'postfix -c DIR check' /dev/null)")
        return r

    def postconf(self, *args: str) -> str:
        return subprocess.run([_prog("postconf"), "-c", str(self.etc), *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout

    def _prepare(self) -> None:
        if not IS_ROOT:
            raise RuntimeError("PostfixSmarthost needs root (postfix refuses to start otherwise)")
        d = self.dir
        for sub in ("etc", "queue", "data", "vmail"):
            (d / sub).mkdir(exist_ok=True)
        _chown(d / "data", "postfix")
        _chown(self.vmail, "nobody")
        nobody = pwd.getpwnam("nobody")
        self.port = free_port()
        master = Path("/usr/share/postfix/master.cf.dist").read_text()
        master, n = re.subn(r"(?m)^smtp\s+inet\s.*$",
                            f"{HOST}:{self.port} inet n - n - - smtpd", master)
        if n != 1:
            raise RuntimeError("unexpected master.cf.dist layout")
        (self.etc / "master.cf").write_text(master)
        self._main_cf = _POSTFIX_MAIN.format(d=d, host=HOST, vuid=nobody.pw_uid, vgid=nobody.pw_gid)
        (self.etc / "main.cf").write_text(self._main_cf)
        (self.etc / "vdomains").write_text("/./ OK\n")
        self.access_table.write_text(self._initial_rules)
        if self._initial_params:
            self.postconf("-e", *[f"{k}={v}" for k, v in self._initial_params.items()])
        self._postfix("check")

    def _launch(self) -> None:
        # master(8) itself in the foreground (what "postfix start-fg" runs, but
        # without the wrapper shell, so the PID we signal is the master's)
        daemon_dir = self.postconf("-h", "daemon_directory").strip()
        self._spawn([f"{daemon_dir}/master", "-c", str(self.etc), "-s"])
        self._wait_listening([self.port], timeout=20)

    def _stop_process(self, timeout: float = 10.0) -> None:
        super()._stop_process(timeout)
        # a stale master.pid would make the next start in this dir fail
        for pidfile in (self.dir / "queue" / "pid").glob("*.pid") if (self.dir / "queue" / "pid").exists() else []:
            pidfile.unlink(missing_ok=True)

    # -- test controls
    def set_recipient_rules(self, rules: str) -> None:
        """Replace the check_recipient_access regexp table, e.g.
        ``"/^temp/ 450 4.2.0 try later\\n/^bad/ 550 5.1.1 no such user\\n"``.
        Takes effect for the next SMTP connection."""
        tmp = self.access_table.with_suffix(".tmp")
        tmp.write_text(rules if rules.endswith("\n") or not rules else rules + "\n")
        tmp.replace(self.access_table)

    def set_params(self, **params: str | int) -> None:
        """Set main.cf parameters (e.g. message_size_limit=2000) and reload."""
        self.postconf("-e", *[f"{k}={v}" for k, v in params.items()])
        self._params.update({k: str(v) for k, v in params.items()})
        self._reload()

    def _reload(self) -> None:
        # what "postfix reload" does, minus its ~1 s of checks; every smtpd and
        # cleanup process re-reads main.cf anyway (max_use = 1)
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGHUP)

    def reset(self) -> None:
        """Default rules and parameters, empty maildir and queue (between tests)."""
        self.set_recipient_rules(DEFAULT_RECIPIENT_RULES)
        if self._params:
            # back to the generated main.cf: "postconf -X" would also delete a parameter the
            # template sets (a test that changed smtpd_recipient_restrictions left none)
            (self.etc / "main.cf").write_text(self._main_cf)
            self._params.clear()
            if self._initial_params:
                self.postconf("-e", *[f"{k}={v}" for k, v in self._initial_params.items()])
            self._reload()
        if self._queued_files():  # (postsuper is slow right after a reload; skip when empty)
            subprocess.run([_prog("postsuper"), "-c", str(self.etc), "-d", "ALL"], capture_output=True,
                           timeout=30, check=False)
        for sub in ("new", "cur", "tmp"):
            for p in (self.catchall / sub).glob("*") if (self.catchall / sub).exists() else []:
                p.unlink(missing_ok=True)

    def _queued_files(self) -> list[Path]:
        queue = self.dir / "queue"
        return [f for sub in ("maildrop", "incoming", "active", "deferred", "hold")
                for f in (queue / sub).rglob("*") if f.is_file()]

    def delivered(self) -> list[Delivered]:
        """Messages delivered so far, oldest first (one per recipient)."""
        files = []
        for sub in ("new", "cur"):
            if (self.catchall / sub).exists():
                files += [p for p in (self.catchall / sub).iterdir() if p.is_file()]
        files.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [Delivered(p, p.read_bytes()) for p in files]

    def wait_delivered(self, count: int, timeout: float = 10.0) -> list[Delivered]:
        """Delivery is asynchronous (queue manager); wait for count messages."""
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.delivered()
            if len(msgs) >= count:
                return msgs
            if time.monotonic() >= deadline:
                raise TimeoutError(f"postfix delivered {len(msgs)} messages, expected {count}\n{_tail(self.log_path)}")
            time.sleep(0.05)

    def queue(self) -> str:
        """``postqueue -p`` output (deferred/active mail)."""
        return subprocess.run([_prog("postqueue"), "-c", str(self.etc), "-p"], capture_output=True, text=True,
                              timeout=30).stdout


# --------------------------------------------------------------------------
# clamd


class Clamd(_Peer):
    """clamd with a single body signature matching the EICAR test string
    anywhere in the scanned data (no freshclam, no official databases).
    Detection name: ``signature_name`` ("Dialmail.Test.EICAR.UNOFFICIAL").
    Listens on ``socket_path`` (unix, mode 666) and 127.0.0.1:``port``."""

    name = "clamd"
    signature = "Dialmail.Test.EICAR"
    signature_name = signature + ".UNOFFICIAL"

    def __init__(self, basedir: Path | str | None = None):
        super().__init__(basedir)
        self.host = HOST
        self.port = 0
        self.db = self.dir / "db"
        self.socket_path = self.dir / "clamd.sock"
        self.conf = self.dir / "clamd.conf"

    @property
    def log_path(self) -> Path:
        return self.dir / "clamd.log"

    def _prepare(self) -> None:
        self.db.mkdir(exist_ok=True)
        (self.db / "test.ndb").write_text(
            f"{self.signature}:0:*:{b'EICAR-STANDARD-ANTIVIRUS-TEST-FILE'.hex()}\n")
        self.port = free_port()
        self.conf.write_text(
            f"DatabaseDirectory {self.db}\nLocalSocket {self.socket_path}\nLocalSocketMode 666\n"
            f"TCPSocket {self.port}\nTCPAddr {HOST}\nForeground yes\nLogFile {self.log_path}\nLogTime yes\n"
            f"PidFile {self.dir}/clamd.pid\nTemporaryDirectory {self.dir}\nStreamMaxLength 25M\n")

    def _launch(self) -> None:
        self._spawn([_prog("clamd"), f"--config-file={self.conf}"])
        self._wait_listening([self.port], timeout=30)

    def scan_bytes(self, data: bytes, timeout: float = 30) -> str:
        """INSTREAM over TCP; returns clamd's reply, e.g. 'stream: OK' or
        'stream: Dialmail.Test.EICAR.UNOFFICIAL FOUND'."""
        with socket.create_connection((HOST, self.port), timeout=timeout) as s:
            s.sendall(b"zINSTREAM\0")
            for i in range(0, len(data), 65536):
                chunk = data[i:i + 65536]
                s.sendall(struct.pack("!L", len(chunk)) + chunk)
            s.sendall(struct.pack("!L", 0))
            reply = b""
            while not reply.endswith(b"\0"):
                part = s.recv(4096)
                if not part:
                    break
                reply += part
        return reply.rstrip(b"\0").decode()


# --------------------------------------------------------------------------
# clients


def run_fetchmail(rcfile_text: str, home_dir: Path | str, timeout: float = 60,
                  args: Sequence[str] = (), verbose: bool = True) -> subprocess.CompletedProcess:
    """One fetchmail poll (``--nodetach``) with rcfile_text written to
    home_dir/fetchmailrc (mode 0600, as fetchmail demands); FETCHMAILHOME,
    HOME and --pidfile point into home_dir so .fetchids and the lock stay
    there (parallel runs do not collide).  Output is text.
    Exit codes: 0 mail delivered, 1 no new mail, 6 rcfile permissions, ...
    """
    home = Path(home_dir)
    home.mkdir(parents=True, exist_ok=True)
    rc = home / "fetchmailrc"
    rc.write_text(rcfile_text)
    rc.chmod(0o600)
    env = dict(os.environ, FETCHMAILHOME=str(home), HOME=str(home))
    # --pidfile: as root fetchmail would lock /var/run/fetchmail.pid, shared by all runs
    argv = [_prog("fetchmail"), "-f", str(rc), "--nodetach", "--nosyslog", "--pidfile", str(home / "fetchmail.pid")]
    if verbose:
        argv.append("-v")
    return subprocess.run(argv + list(args), env=env, capture_output=True, text=True, timeout=timeout)


def fetchmail_rc(user: str, password: str, *, port: int, smtp_port: int, proto: str = "IMAP",
                 deliver_to: str | None = None, keep: bool = True, fetchall: bool = True,
                 ssl_mode: str = "none", sslcertfile: Path | str | None = None,
                 sslcommonname: str = "localhost", extra: str = "") -> str:
    """A fetchmailrc polling 127.0.0.1:port and forwarding to 127.0.0.1:smtp_port.

    ssl_mode: "none" (no STARTTLS even if offered), "starttls" (sslproto TLS1.2+,
    certificate checked against sslcertfile), "implicit" (ssl on connect).
    fetchmail matches the certificate against DNS names only (an IP SAN does
    not count), hence ``sslcommonname`` (the peers' certificates say localhost).
    """
    opts = []
    if keep:
        opts.append("keep")
    if fetchall:
        opts.append("fetchall")
    if ssl_mode == "none":
        opts += ["no sslcertck", "sslproto ''"]
    elif ssl_mode in ("starttls", "implicit"):
        opts += (["ssl"] if ssl_mode == "implicit" else ["sslproto 'TLS1.2+'"])
        opts += (["sslcertck", f"sslcertfile '{sslcertfile}'", f"sslcommonname '{sslcommonname}'"]
                 if sslcertfile else ["no sslcertck"])
    else:
        raise ValueError(ssl_mode)
    opts.append(f"smtphost {HOST}/{smtp_port}")
    if deliver_to:
        opts.append(f"smtpname {deliver_to}")
    return (
        "set no syslog\n"
        f"poll {HOST} with proto {proto} port {port}\n"
        f'  user "{user}" there with password "{password}" is "{deliver_to or user}" here\n'
        f"  options {' '.join(opts)} {extra}\n"
    )


def run_swaks(args: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess:
    """``swaks *args`` (text output). Example:
    run_swaks(["--server", "127.0.0.1", "--port", str(sink.port), "--to", "a@example.com"])."""
    return subprocess.run([_prog("swaks"), *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def getmail_rc(user: str, password: str, *, port: int, maildir: Path | str, proto: str = "IMAP",
               ssl: bool = False, delete: bool = False, read_all: bool = True,
               mailboxes: Sequence[str] = ("INBOX",), extra_options: str = "") -> str:
    """A getmailrc for a 127.0.0.1 POP3/IMAP server delivering into maildir.

    As root, getmail refuses to write a Maildir as root ("refuse to deliver
    mail as root"), so the destination then gets ``user = nobody`` and
    run_getmail() makes the maildir writable by nobody.
    """
    kind = {"IMAP": "SimpleIMAPRetriever", "POP3": "SimplePOP3Retriever"}[proto.upper()]
    if ssl:
        kind = kind.replace("Retriever", "SSLRetriever")
    lines = ["[retriever]", f"type = {kind}", f"server = {HOST}", f"port = {port}",
             f"username = {user}", f"password = {password}"]
    if proto.upper() == "IMAP":
        lines.append("mailboxes = (" + ", ".join(repr(m) for m in mailboxes) + ("," if len(mailboxes) == 1 else "") + ")")
    lines += ["", "[destination]", "type = Maildir", f"path = {str(maildir).rstrip('/')}/"]
    if IS_ROOT:
        lines.append("user = nobody")
    lines += ["", "[options]", "verbose = 2", f"delete = {delete}", f"read_all = {read_all}",
              "received = false", "delivered_to = false", extra_options, ""]
    return "\n".join(lines)


def run_getmail(rcfile_text: str, getmail_dir: Path | str, timeout: float = 60, args: Sequence[str] = (),
                maildir: Path | str | None = None) -> subprocess.CompletedProcess:
    """``getmail --rcfile=getmailrc --getmaildir=getmail_dir`` (getmail6; text output).

    Writes getmail_dir/getmailrc.  When maildir is given it is created
    (cur/new/tmp) and, as root, chowned to nobody (see getmail_rc()).
    getmail keeps its "oldmail" state in getmail_dir.
    """
    gdir = Path(getmail_dir)
    gdir.mkdir(parents=True, exist_ok=True)
    (gdir / "getmailrc").write_text(rcfile_text)
    (gdir / "getmailrc").chmod(0o600)
    if maildir is not None:
        md = Path(maildir)
        for sub in ("", "cur", "new", "tmp"):
            (md / sub).mkdir(parents=True, exist_ok=True)
            _chown(md / sub, "nobody")
    env = dict(os.environ, HOME=str(gdir))
    return subprocess.run([_prog("getmail"), "--rcfile=getmailrc", f"--getmaildir={gdir}", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


# --------------------------------------------------------------------------
# Roundcube


class Roundcube(_Peer):
    """Debian's Roundcube served by PHP's built-in server on 127.0.0.1, reading the
    configuration directory ``config_dir`` (what ``dialmail webmail config`` writes)."""

    name = "roundcube"
    docroot = Path("/var/lib/roundcube/public_html")

    def __init__(self, config_dir: Path, basedir: Path | str | None = None):
        super().__init__(basedir)
        self.config_dir = Path(config_dir)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    @property
    def log_path(self) -> Path:
        errors = self.config_dir / "logs" / "errors.log"
        return errors if errors.exists() else self.output_path

    def _prepare(self) -> None:
        self.port = free_port()

    def _launch(self) -> None:
        env = dict(os.environ, ROUNDCUBE_CONFIG_DIR=str(self.config_dir))
        self._spawn([_prog("php"), "-S", f"{HOST}:{self.port}", "-t", str(self.docroot)], env=env)
        self._wait_listening([self.port])


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture
def peer_tmp():
    """Per-test temp dir reachable by the peers' unprivileged users (mode 0711)."""
    d = peer_tmpdir("tmp")
    yield d
    if not _KEEP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


def _dovecot_session(tls: str, compress: bool = False):
    need("dovecot", "doveadm", "doveconf", "openssl")
    with Dovecot(tls=tls, compress=compress) as server:
        yield server


@pytest.fixture(scope="session")
def dovecot_server():
    """Session-wide Dovecot with STARTTLS offered (use ``dovecot`` in tests)."""
    yield from _dovecot_session("starttls")


@pytest.fixture
def dovecot(dovecot_server):
    """Dovecot (tls='starttls'), emptied of users and mail for this test."""
    dovecot_server.reset()
    yield dovecot_server
    dovecot_server.reset()


@pytest.fixture(scope="session")
def dovecot_zlib_server():
    """Session-wide Dovecot offering COMPRESS=DEFLATE (imap_zlib) and STARTTLS."""
    yield from _dovecot_session("starttls", compress=True)


@pytest.fixture
def dovecot_zlib(dovecot_zlib_server):
    """Dovecot with COMPRESS=DEFLATE, emptied for this test."""
    dovecot_zlib_server.reset()
    yield dovecot_zlib_server
    dovecot_zlib_server.reset()


@pytest.fixture(scope="session")
def dovecot_notls_server():
    yield from _dovecot_session("none")


@pytest.fixture
def dovecot_notls(dovecot_notls_server):
    """Dovecot with ssl = no (no STARTTLS), emptied for this test."""
    dovecot_notls_server.reset()
    yield dovecot_notls_server
    dovecot_notls_server.reset()


@pytest.fixture
def smtp_sink_factory():
    """``make(**SmtpSink options) -> started SmtpSink``; all stopped at teardown."""
    need("smtp-sink")
    sinks: list[SmtpSink] = []

    def make(**options) -> SmtpSink:
        sink = SmtpSink(**options).start()
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.stop()


@pytest.fixture
def smtp_sink(smtp_sink_factory):
    """A fresh smtp-sink accepting everything (AUTH not announced)."""
    return smtp_sink_factory()


@pytest.fixture(scope="session")
def postfix_smarthost_server():
    need("postfix", "postconf", "postsuper")
    if not IS_ROOT:
        pytest.skip("PostfixSmarthost needs root (postfix: the postfix command is reserved for the superuser)")
    with PostfixSmarthost() as server:
        yield server


@pytest.fixture
def postfix_smarthost(postfix_smarthost_server):
    """Real Postfix smarthost, reset for this test (default rules: temp* 450, bad* 550)."""
    postfix_smarthost_server.reset()
    yield postfix_smarthost_server
    postfix_smarthost_server.reset()


@pytest.fixture(scope="session")
def clamd():
    """clamd with the EICAR body signature (session scope; it is stateless)."""
    need("clamd")
    with Clamd() as server:
        yield server
