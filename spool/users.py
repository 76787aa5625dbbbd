"""Local users and their argon2 password hashes, in ``<spool_dir>/users`` (mode 0600).

One line per user, ``name:$argon2id$...``.  A bare name (``alice``) has a mailbox in
every local domain; ``name@domain`` is a user of that domain only (hosted accounts).
The file is replaced atomically, so a reader never sees half of it.

It is also a Dovecot passwd-file (``scheme=ARGON2ID``), read by Dovecot's auth process
as user dovecot: a new file keeps the group and mode of the one it replaces (0640, group
dovecot, once IMAP is set up), and its modification time always moves forward by at
least a second, because Dovecot re-reads the file only when the time (in whole seconds)
or the size changed.
"""
from __future__ import annotations

import asyncio
import os
import re
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from spool.fsio import fsync_dir, write_file

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._+-]*(@[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*)?")

# OWASP's argon2id profile (19 MiB, 2 passes): every login costs this much memory for
# a moment, and an office server may see many logins at once.  Hashes carry their own
# parameters, so older ones still verify.
_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
# Password checks run one at a time on one thread: a burst of logins then costs 19 MiB,
# not 19 MiB per login, and the memory is reused instead of held by many malloc arenas.
_checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="password-check")

# A hash to verify against when the user does not exist, so timing does not tell.
_DUMMY = _hasher.hash("dialmail-no-such-user")


class UserError(ValueError):
    pass


def check_name(name: str) -> str:
    name = name.strip().lower()
    if not NAME_RE.fullmatch(name) or len(name) > 254:
        raise UserError(f"{name!r} is not a valid user name (letters, digits, . _ + -, optionally @domain)")
    return name


class Users:
    def __init__(self, spool_dir: Path):
        self.path = Path(spool_dir) / "users"
        self._lock = threading.Lock()
        self._cache: tuple[float, dict[str, str]] | None = None

    def _load(self) -> dict[str, str]:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return {}
        if self._cache and self._cache[0] == mtime:
            return self._cache[1]
        users = {}
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            name, _, hashed = line.partition(":")
            users[name] = hashed
        self._cache = (mtime, users)
        return users

    def _save(self, users: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f".users.{os.getpid()}.tmp")
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        body = "".join(f"{n}:{h}\n" for n, h in sorted(users.items()))
        try:
            old = self.path.stat()
        except FileNotFoundError:
            old = None
        write_file(tmp, body.encode(), mode=0o600)
        if old is not None:
            if os.geteuid() == 0 and (old.st_uid, old.st_gid) != (0, 0):
                os.chown(tmp, old.st_uid, old.st_gid)
            elif old.st_gid != os.getegid():
                try:
                    os.chown(tmp, -1, old.st_gid)
                except PermissionError:  # not a group of ours: the file stays in our own
                    pass
            os.chmod(tmp, stat.S_IMODE(old.st_mode))
            now = os.stat(tmp).st_mtime_ns
            if now // 10**9 <= old.st_mtime_ns // 10**9:
                later = (old.st_mtime_ns // 10**9 + 1) * 10**9
                os.utime(tmp, ns=(later, later))
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        self._cache = None

    def names(self) -> list[str]:
        return sorted(self._load())

    def exists(self, name: str) -> bool:
        return name.lower() in self._load()

    def add(self, name: str, password: str) -> None:
        name = check_name(name)
        if not password:
            raise UserError("the password must not be empty")
        with self._lock:
            users = dict(self._load())
            if name in users:
                raise UserError(f"user {name} already exists (use 'dialmail users passwd')")
            users[name] = _hasher.hash(password)
            self._save(users)

    def set_password(self, name: str, password: str) -> None:
        name = check_name(name)
        if not password:
            raise UserError("the password must not be empty")
        with self._lock:
            users = dict(self._load())
            if name not in users:
                raise UserError(f"no such user: {name}")
            users[name] = _hasher.hash(password)
            self._save(users)

    def delete(self, name: str) -> None:
        name = check_name(name)
        with self._lock:
            users = dict(self._load())
            if name not in users:
                raise UserError(f"no such user: {name}")
            del users[name]
            self._save(users)

    async def check(self, name: str, password: str) -> bool:
        """``verify`` off the event loop, on the single password-check thread."""
        return await asyncio.get_running_loop().run_in_executor(_checker, self.verify, name, password)

    def verify(self, name: str, password: str) -> bool:
        """Check a password; takes the same time whether or not the user exists."""
        hashed = self._load().get(name.strip().lower())
        try:
            ok = _hasher.verify(hashed or _DUMMY, password)
        except (VerificationError, InvalidHashError):
            return False
        return ok and hashed is not None
