"""The spool made readable by Dovecot, whether dialmail runs as root or as its own user.

Dovecot's auth process runs as user ``dovecot`` and reads dialmail's users file as a
passwd-file (``scheme=ARGON2ID``); its mail processes never run as root.  So, run as root,
dialmail gives the spool directory and the users file to group ``dovecot`` (0710 and
0640: the group may pass and read that one file, nothing else), and the Maildirs to
``[imap] mail_user``.  Run as its own user, dialmail is the user Dovecot runs everything
as, and nothing changes hands.

Dovecot keeps its own files (``dovecot-uidlist``, indexes) out of the mail tree, under
``<spool>/dovecot/``, so the Maildirs hold only mail.  The postmaster's mailboxes get a
``Quarantine`` folder: a link to the quarantine Maildir.
"""
from __future__ import annotations

import grp
import hashlib
import logging
import os
import pwd
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Config, ConfigError
from gateway.office.directory import Directory
from spool.maildir import Maildir, mailbox_path
from spool.users import Users

log = logging.getLogger("dialmail.imap")

DOVECOT_GROUP = "dovecot"  # Debian's: the group of Dovecot's auth process
QUARANTINE_FOLDER = ".Quarantine"  # Maildir++ name of the folder IMAP shows as "Quarantine"
QUARANTINE_MAILBOX = "quarantine"  # gateway.delivery.stages.quarantine.MAILBOX
# Unix socket paths are limited to 108 bytes; Dovecot's longest under base_dir is ~30.
_MAX_BASE_DIR = 72


@dataclass(frozen=True)
class MailOwner:
    """Whom Dovecot's mail processes run as, and how Dovecot's own processes reach the spool."""
    user: str
    uid: int
    gid: int
    group: str
    as_root: bool  # dialmail runs as root: Dovecot drops to dovecot/dovenull/user itself

    @property
    def access_group(self) -> str | None:
        """The group that may pass through the spool directory (as root only)."""
        return DOVECOT_GROUP if self.as_root else None


def mail_owner(config: Config) -> MailOwner:
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam(config.imap.mail_user)
        except KeyError:
            raise ConfigError(f"imap.mail_user: no such user {config.imap.mail_user!r} (create it, e.g. "
                              f"adduser --system --group vmail, or name another)") from None
        if pw.pw_uid == 0:
            raise ConfigError("imap.mail_user: Dovecot's mail processes must not run as root")
        return MailOwner(pw.pw_name, pw.pw_uid, pw.pw_gid, grp.getgrgid(pw.pw_gid).gr_name, as_root=True)
    pw = pwd.getpwuid(os.geteuid())
    return MailOwner(pw.pw_name, pw.pw_uid, os.getegid(), grp.getgrgid(os.getegid()).gr_name, as_root=False)


@dataclass(frozen=True)
class DovecotPaths:
    """Where Dovecot's files live for one spool."""
    spool: Path

    @property
    def root(self) -> Path:
        return self.spool / "dovecot"

    @property
    def conf(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def base_dir(self) -> Path:
        """Dovecot's sockets and pid file: under the spool unless the path is too long for sockets."""
        inside = self.root / "run"
        if len(str(inside)) <= _MAX_BASE_DIR:
            return inside
        tag = hashlib.sha256(str(self.spool.resolve()).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"dialmail-dovecot-{tag}"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def control(self) -> Path:
        return self.root / "control"

    @property
    def mail(self) -> Path:
        return self.spool / "mail"

    @property
    def users(self) -> Path:
        return self.spool / "users"

    @property
    def master_pid(self) -> Path:
        return self.base_dir / "master.pid"


def closed_above(directory: Path) -> Path | None:
    """Run as root: the first directory above ``directory`` that others may not pass through.

    Dovecot's processes run as other users (dovecot, the mail user): they must reach the
    spool from /.  Run as any other user, Dovecot runs as that user, who got there already.
    """
    if os.geteuid() != 0:
        return None
    for parent in reversed(Path(directory).resolve().parents):
        try:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return parent
        except OSError:
            return None
    return None


def prepare(config: Config) -> MailOwner:
    """Make the spool readable by Dovecot; safe to repeat (every start does)."""
    owner = mail_owner(config)
    paths = DovecotPaths(config.spool_dir)
    spool = config.spool_dir
    spool.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths.mail.mkdir(exist_ok=True, mode=0o700)
    paths.root.mkdir(exist_ok=True, mode=0o700)
    for d in (paths.index, paths.control):
        d.mkdir(exist_ok=True, mode=0o700)
    _users_file(paths.users)
    if owner.as_root:
        group = grp.getgrnam(DOVECOT_GROUP).gr_gid
        for d in (spool, paths.root):  # the group may pass, not list
            os.chown(d, -1, group)
            os.chmod(d, (stat.S_IMODE(os.stat(d).st_mode) | 0o010) & ~0o007)
        os.chown(paths.users, -1, group)
        os.chmod(paths.users, 0o640)
        for top in (paths.mail, paths.index, paths.control):
            _give(top, owner)
    _quarantine_folders(config, paths)
    return owner


def _users_file(path: Path) -> None:
    """An empty users file, so Dovecot starts (and sees the first user added) without one."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def _give(top: Path, owner: MailOwner) -> None:
    """Everything under ``top`` to the mail owner; links are changed, never followed."""
    want = (owner.uid, owner.gid)
    for root, dirs, files in os.walk(top):
        for name in [None, *dirs, *files]:
            p = root if name is None else os.path.join(root, name)
            try:
                st = os.lstat(p)
                if (st.st_uid, st.st_gid) != want:
                    os.lchown(p, *want)
            except FileNotFoundError:
                continue  # delivered or removed meanwhile


def _quarantine_folders(config: Config, paths: DovecotPaths) -> None:
    """The postmaster's mailboxes show the quarantine Maildir as the folder Quarantine."""
    try:
        postmaster = Directory(config, Users(config.spool_dir)).resolve(config.server.postmaster)
    except OSError:
        return
    if postmaster is None or not postmaster.mailboxes:
        return
    Maildir(mailbox_path(config.spool_dir, QUARANTINE_MAILBOX)).create()
    for user in postmaster.mailboxes:
        if user == QUARANTINE_MAILBOX:
            continue
        box = Maildir(mailbox_path(config.spool_dir, user)).create()
        link = box.path / QUARANTINE_FOLDER
        if link.is_symlink() or link.exists():
            continue
        os.symlink(f"../{QUARANTINE_MAILBOX}", link)  # relative: the spool may move
        if os.geteuid() == 0:
            st = os.stat(box.path)
            os.lchown(link, st.st_uid, st.st_gid)
        log.info("IMAP: %s sees the quarantine as the folder Quarantine", user)
