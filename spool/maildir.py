"""Maildir delivery, qmail order: write into tmp/, fsync, link into new/, fsync new/.

Names are chosen by the caller from (queue id, recipient), so a delivery repeated after a
crash finds the first copy and does not make a second one.

A Maildir belongs to the owner of the directory that holds it (``<spool>/mail``): run as
root, dialmail gives what it creates there to that owner, so a reader that must not run
as root (Dovecot's mail processes) can read, flag and delete it.  Run as any other user,
everything is that user's already.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import BinaryIO, Iterable

from spool.fsio import fsync_dir, fsync_paths, write_file

SUBDIRS = ("tmp", "new", "cur")


def _hostname() -> str:
    # '/' and ':' are reserved in Maildir names; qmail encodes them the same way.
    return socket.gethostname().replace("/", "\\057").replace(":", "\\072")


def mailbox_path(spool_dir: Path, user: str) -> Path:
    """Where ``user``'s Maildir lives in the spool."""
    return Path(spool_dir) / "mail" / user


def owner_of(directory: Path) -> tuple[int, int] | None:
    """(uid, gid) that files made in ``directory`` must get, or None when they are ours anyway."""
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return None
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


class Maildir:
    def __init__(self, path: Path):
        self.path = Path(path)

    def create(self) -> "Maildir":
        if self.exists():
            return self
        owner = owner_of(self.path.parent)
        made = not self.path.exists()
        for sub in SUBDIRS:
            (self.path / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        if owner is not None:
            for d in ([self.path] if made else []) + [self.path / sub for sub in SUBDIRS]:
                os.chown(d, *owner)
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
                batch: "Batch | None" = None) -> Path:
        """Deliver ``data`` as new/<unique>; returns its path.

        With ``check_existing`` (a redelivery after a crash) an earlier copy under the
        same name is found and kept instead of delivering a second copy.  With a
        ``batch`` the file is only written into tmp/: ``batch.commit()`` fsyncs it, links
        it to the returned path and fsyncs new/, together with the rest of the batch.
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
        size = write_file(tmp, data, sync=batch is None)
        owner = owner_of(self.path.parent)
        if owner is not None:  # before the link: a reader never sees it owned by root
            os.chown(tmp, *owner)
        final = self.path / "new" / f"{unique},S={size}"
        if batch is not None:
            batch.written.append((tmp, final))
            return final
        _link(tmp, final)
        fsync_dir(self.path / "new")
        return final

    def messages(self) -> list[Path]:
        out = []
        for sub in ("new", "cur"):
            d = self.path / sub
            if d.is_dir():
                out.extend(d / n for n in os.listdir(d) if not n.startswith("."))
        return sorted(out, key=lambda p: p.name)


def _link(tmp: Path, final: Path) -> None:
    # link, not rename: if new/ already has the name we must not overwrite it.
    try:
        os.link(tmp, final)
    except FileExistsError:
        pass
    os.unlink(tmp)


class Batch:
    """Deliveries into Maildirs made durable together, in the qmail order for each file
    (tmp/ written and fsynced, then linked into new/, then new/ fsynced) but with the
    fsyncs of many files running side by side and each new/ fsynced once.  Nothing
    delivered this way may count as delivered before ``commit`` returns; a batch cut
    short leaves files in tmp/, which readers ignore and a redelivery replaces, and links
    that a redelivery with ``check_existing`` finds."""

    def __init__(self):
        self.written: list[tuple[Path, Path]] = []  # (tmp/ file, its name in new/)

    def commit(self) -> None:
        """fsync every file written, link each into new/, fsync each new/ once.  Raises
        if any step fails; the batch is empty afterwards either way."""
        written, self.written = self.written, []
        fsync_paths(tmp for tmp, _ in written)
        for tmp, final in written:
            _link(tmp, final)
        fsync_paths(sorted({final.parent for _, final in written}))
