"""Maildir delivery, qmail order: write into tmp/, fsync, link into new/, fsync new/.

Names are chosen by the caller from (queue id, recipient), so a delivery repeated after a
crash finds the first copy and does not make a second one.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import BinaryIO, Iterable

from spool.fsio import fsync_dir, write_file

SUBDIRS = ("tmp", "new", "cur")


def _hostname() -> str:
    # '/' and ':' are reserved in Maildir names; qmail encodes them the same way.
    return socket.gethostname().replace("/", "\\057").replace(":", "\\072")


def mailbox_path(spool_dir: Path, user: str) -> Path:
    """Where ``user``'s Maildir lives in the spool."""
    return Path(spool_dir) / "mail" / user


class Maildir:
    def __init__(self, path: Path):
        self.path = Path(path)

    def create(self) -> "Maildir":
        for sub in SUBDIRS:
            (self.path / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        return self

    def exists(self) -> bool:
        return all((self.path / sub).is_dir() for sub in SUBDIRS)

    def unique_name(self, when: float, key: str) -> str:
        return f"{int(when)}.{key}.{_hostname()}"

    def find(self, unique: str) -> Path | None:
        """Return the file delivered under ``unique`` if a reader has it in new/ or cur/."""
        for sub in ("new", "cur"):
            d = self.path / sub
            for name in os.listdir(d):
                if name == unique or name.startswith((unique + ",", unique + ":")):
                    return d / name
        return None

    def deliver(self, data: bytes | Iterable[bytes] | BinaryIO, unique: str, check_existing: bool = False,
                sync: bool = True) -> Path:
        """Deliver ``data`` as new/<unique>; returns its path.

        With ``check_existing`` (a redelivery after a crash) an earlier copy under the
        same name is found and kept instead of delivering a second copy.  With
        ``sync=False`` the link into new/ is not yet durable: the caller fsyncs new/
        (``fsync_dir``) before it counts the message as delivered, once for a batch of
        deliveries into this Maildir.
        """
        self.create()
        if check_existing:
            found = self.find(unique)
            if found is not None:
                return found
        tmp = self.path / "tmp" / unique
        try:
            os.unlink(tmp)  # left over by a crash before the link: it was never visible
        except FileNotFoundError:
            pass
        size = write_file(tmp, data)
        final = self.path / "new" / f"{unique},S={size}"
        # link, not rename: if new/ already has the name we must not overwrite it.
        try:
            os.link(tmp, final)
        except FileExistsError:
            pass
        os.unlink(tmp)
        if sync:
            fsync_dir(self.path / "new")
        return final

    def messages(self) -> list[Path]:
        out = []
        for sub in ("new", "cur"):
            d = self.path / sub
            if d.is_dir():
                out.extend(d / n for n in os.listdir(d) if not n.startswith("."))
        return sorted(out, key=lambda p: p.name)
