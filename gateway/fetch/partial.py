"""Large messages downloaded in pieces straight to disk, resumed after a cut line.

imapclient holds each literal in memory, so a message over ``chunk_size`` is asked for
in ``BODY.PEEK[]<offset.length>`` pieces; each piece is appended to a partial file in
``<spool>/fetch-partial/`` and fsynced before the next one is asked for.  Memory stays
at one piece, and a cut line costs only the piece in flight: the next session resumes
at the partial file's end.

A partial file is named by (account, folder, UIDVALIDITY, UID).  An IMAP message never
changes under its UID, so bytes kept from an earlier session are still right; once the
UID is taken, gone from the server or renumbered, the file is dropped.

The IMAP command itself is the caller's (``read_piece``); this module owns the files.
"""
from __future__ import annotations

import hashlib
import logging
import os
from itertools import chain
from pathlib import Path
from typing import Callable

from spool.fsio import is_disk_full, write_file

log = logging.getLogger("dialmail.fetch")

COPY_BLOCK = 1024 * 1024


class Partials:
    """The partial downloads of one account, in ``<spool>/fetch-partial/``."""

    def __init__(self, spool_dir: Path, account: str):
        self.dir = Path(spool_dir) / "fetch-partial"
        self.account = account

    def _prefix(self, folder: str) -> str:
        return hashlib.sha256(f"{self.account}\0{folder}".encode()).hexdigest()[:16]

    def path(self, folder: str, uidvalidity: int, uid: int) -> Path:
        return self.dir / f"{self._prefix(folder)}.{uidvalidity}.{uid}"

    def clean(self, folder: str, uidvalidity: int, wanted: set[int]) -> None:
        """Drop partial downloads no longer wanted: taken, gone, or from an older UIDVALIDITY."""
        if not self.dir.is_dir():
            return
        prefix = self._prefix(folder) + "."
        for name in os.listdir(self.dir):
            if not name.startswith(prefix):
                continue
            _, validity, uid = name.split(".")
            if int(validity) != uidvalidity or int(uid) not in wanted:
                os.unlink(self.dir / name)

    def download(self, folder: str, uidvalidity: int, uid: int, size: int, chunk: int,
                 read_piece: Callable[[int, int], bytes | None],
                 on_piece: Callable[[int], None] | None = None) -> Path:
        """The whole message into its partial file, from where an earlier session stopped.

        ``read_piece(offset, length)`` fetches one piece (empty or None past the end);
        ``on_piece(bytes_so_far)`` is told after each piece is on disk.
        """
        self.dir.mkdir(mode=0o700, exist_ok=True)
        path = self.path(folder, uidvalidity, uid)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            offset = os.fstat(fd).st_size
            if offset:
                log.info("fetch %s/%s uid %d: resuming at byte %d of %d", self.account, folder, uid, offset, size)
            # Until a short piece, not until RFC822.SIZE: a server whose size is off must not
            # get its messages cut short.
            while True:
                piece = read_piece(offset, chunk)
                if not piece:
                    break
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
                offset += len(piece)
                if on_piece is not None:
                    on_piece(offset)
                if len(piece) < chunk:
                    break
        except OSError as exc:
            if is_disk_full(exc):
                # Kept, the pieces would keep the spool full: no mail could come in (452), none
                # be delivered, the catalogue not be written.  The next session starts afresh.
                try:
                    os.unlink(path)
                except OSError:
                    pass
            raise
        finally:
            os.close(fd)
        return path


def move_into(partial: Path, tmp: Path, prefix: bytes = b"") -> None:
    """Make a finished download the queue's tmp file, with ``prefix`` (a header) on top."""
    if prefix:
        with open(partial, "rb") as body:
            write_file(tmp, chain([prefix], iter(lambda: body.read(COPY_BLOCK), b"")))
        os.unlink(partial)
    else:
        os.rename(partial, tmp)  # same file system; its data is fsynced already
