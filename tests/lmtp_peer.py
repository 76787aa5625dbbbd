"""A real Dovecot LMTP server with Sieve (Pigeonhole), for final delivery tests.

Started per test in its own temporary directory: LMTP on a unix socket there and on a
free 127.0.0.1 port, the users in ``USERS`` (others get 550), Maildirs under ``mail/<user>``,
each user's own Sieve script at ``mail/<user>/.dovecot.sieve``, and dialmail's
``etc/dialmail-dedupe.sieve`` as ``sieve_before``, compiled with sievec as an admin
would.  Packages: dovecot-lmtpd, dovecot-sieve (tests/peers-debian.txt).
"""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.peers import IS_ROOT, PeerStartError, _chown, _Peer, _prog, free_port

ROOT = Path(__file__).resolve().parent.parent
DEDUPE = ROOT / "etc" / "dialmail-dedupe.sieve"
LMTP_BINARY = Path("/usr/lib/dovecot/lmtp")
USERS = ("alice", "bob", "carol", "postmaster")
SIEVE_PLUGIN = Path("/usr/lib/dovecot/modules/lib90_sieve_plugin.so")

CONF = """\
protocols = lmtp
listen = 127.0.0.1
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
ssl = no
mail_location = maildir:~/Maildir
default_internal_user = {internal_user}
default_internal_group = {internal_group}
default_login_user = {login_user}
first_valid_uid = 1
userdb {{
  driver = static
  args = uid={mail_user} gid={mail_group} home={d}/mail/%n
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%n {d}/users
}}
service lmtp {{
  unix_listener {d}/lmtp {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
service anvil {{
{chroot}}}
service ipc {{
{chroot}}}
protocol lmtp {{
  mail_plugins = sieve
}}
plugin {{
  sieve = file:~/sieve;active=~/.dovecot.sieve
{sieve_before}}}
"""


def need_lmtp() -> None:
    missing = [str(p) for p in (LMTP_BINARY, SIEVE_PLUGIN) if not p.exists()]
    if missing or not shutil.which("sievec"):
        pytest.skip(f"needs {', '.join(missing) or 'sievec'} (Debian: apt-get install dovecot-lmtpd "
                    "dovecot-sieve; see tests/peers-debian.txt)")


class DovecotLMTP(_Peer):
    name = "dovecot-lmtp"

    def __init__(self, basedir: Path | str | None = None, dedupe: bool = True):
        super().__init__(basedir)
        self.dedupe = dedupe  # run etc/dialmail-dedupe.sieve before each user's script
        self.port = 0
        self.conf = self.dir / "dovecot.conf"
        self.socket = self.dir / "lmtp"
        self.mail_root = self.dir / "mail"
        self.mail_owner = "dovecot" if IS_ROOT else None

    @property
    def log_path(self) -> Path:
        return self.dir / "dovecot.log"

    def _prepare(self) -> None:
        d = self.dir
        for sub in ("run", "state", "mail"):
            (d / sub).mkdir(exist_ok=True)
        if IS_ROOT:
            _chown(self.mail_root, "dovecot")
            users = {"internal_user": "dovecot", "internal_group": "dovecot", "login_user": "dovenull",
                     "mail_user": "dovecot", "mail_group": "dovecot", "chroot": ""}
        else:
            import grp
            import pwd
            me = pwd.getpwuid(os.geteuid()).pw_name
            group = grp.getgrgid(os.getegid()).gr_name
            users = {"internal_user": me, "internal_group": group, "login_user": me,
                     "mail_user": me, "mail_group": group, "chroot": "  chroot =\n"}
        shutil.copy(DEDUPE, d / "dedupe.sieve")
        (d / "users").write_text("".join(f"{u}:{{PLAIN}}unused-{u}-pw\n" for u in USERS))
        (d / "users").chmod(0o644)
        self.port = free_port()
        before = f"  sieve_before = {d}/dedupe.sieve\n" if self.dedupe else ""
        self.conf.write_text(CONF.format(d=d, port=self.port, sieve_before=before, **users))
        import subprocess
        check = subprocess.run([_prog("doveconf"), "-c", str(self.conf), "-n"], capture_output=True, text=True)
        if check.returncode:
            raise RuntimeError(f"dovecot config rejected: {check.stderr}")
        # A global script is compiled by the admin: Dovecot's mail processes may not write there.
        if not self.dedupe:
            return
        compiled = subprocess.run([shutil.which("sievec"), "-c", str(self.conf), str(d / "dedupe.sieve")],
                                  capture_output=True, text=True)
        if compiled.returncode:
            raise RuntimeError(f"sievec failed: {compiled.stdout}{compiled.stderr}")

    def _launch(self) -> None:
        self._spawn([_prog("dovecot"), "-F", "-c", str(self.conf)])
        self._wait_listening([self.port])

    def kill_9(self) -> None:
        """Every process of this Dovecot killed at once with SIGKILL (a crash, not a stop)."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session and group (see _peer_preexec)
            except ProcessLookupError:
                pass
            self._stop_process()

    def start_again(self) -> None:
        """Start on the same port and socket with the same mail (after kill_9 or a stop)."""
        try:
            self.restart()
        except PeerStartError:
            self.stop()
            raise

    # -- mailboxes, read as the files Dovecot wrote
    def home(self, user: str) -> Path:
        return self.mail_root / user

    def messages(self, user: str, folder: str = "INBOX") -> list[bytes]:
        box = self.home(user) / "Maildir"
        if folder != "INBOX":
            box = box / f".{folder}"
        out = []
        for sub in ("new", "cur"):
            if (box / sub).is_dir():
                out += [p.read_bytes() for p in sorted((box / sub).iterdir())]
        return out

    def set_sieve(self, user: str, script: str) -> None:
        """Install ``script`` as the user's active Sieve script."""
        home = self.home(user)
        home.mkdir(parents=True, exist_ok=True)
        path = home / ".dovecot.sieve"
        path.write_text(script)
        if IS_ROOT:
            _chown(home, "dovecot")
            _chown(path, "dovecot")


    def doveadm(self) -> str:
        """The ``[delivery] doveadm`` setting for this Dovecot."""
        return f"doveadm -c {self.conf}"


@pytest.fixture
def dovecot_lmtp(request):
    """Dovecot LMTP with the duplicate guard; ``@pytest.mark.parametrize("dovecot_lmtp",
    [False], indirect=True)`` starts it without."""
    need_lmtp()
    peer = DovecotLMTP(dedupe=getattr(request, "param", True))
    peer.start()
    yield peer
    peer.stop()
