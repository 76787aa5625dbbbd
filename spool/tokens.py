"""OAuth2 tokens of the ISP-side accounts, one file each under ``<spool>/oauth/``.

A refresh token opens the office's mailbox to whoever holds it, as a password does: each
file is written 0600 in a 0700 directory, and one that group or others could read is
refused (never used, never trusted) until the admin fixes its mode.  With a key (a
Fernet key from ``[server] token_key_file``) the file holds the record encrypted, so a
copy of the spool (a backup) does not give the token away without the key.

A record is replaced whole: written to a temporary file, fsynced, renamed over the old
one; a crash leaves the old record or the new one, never half of each.
"""
from __future__ import annotations

import json
import os
import re
import stat
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from spool.fsio import fsync_dir, write_file

DIR = "oauth"
VALID, REFUSED = "valid", "refused"


class TokenStoreError(Exception):
    """The stored token cannot be used (exposed file, wrong key, damaged record)."""


@dataclass
class TokenRecord:
    refresh_token: str | None = None
    access_token: str | None = None
    expires_at: float | None = None  # of the access token, epoch seconds
    stored_at: float = 0.0  # when the refresh token was obtained
    refreshed_at: float | None = None
    state: str = VALID  # valid | refused (the provider refused the refresh token)
    error: str | None = None  # the provider's words when it refused
    postmaster_told: bool = False  # the notice about the refusal went out

    def access_usable(self, now: float, margin: float = 60.0) -> bool:
        """The access token still works for a whole login (``margin`` seconds to spare)."""
        return bool(self.access_token) and self.expires_at is not None and self.expires_at - margin > now


class TokenStore:
    def __init__(self, spool_dir: Path, key: bytes | None = None):
        self.dir = Path(spool_dir) / DIR
        self._fernet = None
        if key is not None:
            from cryptography.fernet import Fernet
            self._fernet = Fernet(key)

    def path(self, name: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9@._+-]+", name) or name.startswith("."):
            raise TokenStoreError(f"{name!r} cannot name a token file")
        return self.dir / f"{name}.token"

    def names(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name[:-len(".token")] for p in self.dir.glob("*.token"))

    def load(self, name: str) -> TokenRecord | None:
        """The record of ``name``, or None when no token was stored for it."""
        path = self.path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TokenStoreError(f"cannot read {path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise TokenStoreError(f"{path} is readable by group or others (mode {stat.S_IMODE(mode):04o}); "
                                      f"the token in it may be known to others: run chmod 600 {path}, or "
                                      f"revoke it and run `dialmail oauth login` again")
            data = f.read()
        if data.startswith(b"{"):
            text = data  # stored before a key was configured: read it, encrypted at the next save
        elif self._fernet is None:
            raise TokenStoreError(f"{path} is encrypted: set [server] token_key_file to the key it was "
                                  f"written with")
        else:
            from cryptography.fernet import InvalidToken
            try:
                text = self._fernet.decrypt(data)
            except InvalidToken:
                raise TokenStoreError(f"{path} was encrypted with another key than [server] token_key_file") \
                    from None
        try:
            raw = json.loads(text)
            known = {f.name for f in fields(TokenRecord)}
            return TokenRecord(**{k: v for k, v in raw.items() if k in known})
        except (ValueError, TypeError):
            raise TokenStoreError(f"{path} is damaged: run `dialmail oauth login` for this account again") from None

    def save(self, name: str, record: TokenRecord) -> None:
        path = self.path(name)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        data = json.dumps(asdict(record), sort_keys=True).encode()
        if self._fernet is not None:
            data = self._fernet.encrypt(data)
        tmp = self.dir / f".{name}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        write_file(tmp, data, mode=0o600)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.dir)

    def remove(self, name: str) -> bool:
        try:
            self.path(name).unlink()
        except FileNotFoundError:
            return False
        fsync_dir(self.dir)
        return True
