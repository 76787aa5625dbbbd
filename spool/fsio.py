"""Durable file writes: the order of operations that lets a kill -9 lose nothing."""
from __future__ import annotations

import errno
import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

CHUNK = 256 * 1024


def fsync_dir(path: Path) -> None:
    """Make a rename or link inside ``path`` itself durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes | Iterable[bytes] | BinaryIO, mode: int = 0o600, sync: bool = True) -> int:
    """Create ``path`` exclusively, write ``data``, fsync it (unless ``sync`` is False: the
    caller does, before anything refers to the file); return the size.

    ``data`` may be bytes, an iterable of byte chunks or a readable binary file, so
    large messages never need to be held whole in memory. On any error the partial
    file is removed before the error propagates.
    """
    def fill(fd: int) -> int:
        if isinstance(data, (bytes, bytearray, memoryview)):
            size = _write_all(fd, data)
        elif hasattr(data, "read"):
            size = 0
            while chunk := data.read(CHUNK):
                size += _write_all(fd, chunk)
        else:
            size = sum(_write_all(fd, chunk) for chunk in data)
        if sync:
            os.fsync(fd)
        return size
    fd, size = _created(path, mode, fill)
    os.close(fd)
    return size


def create_written(path: Path, data: bytes, mode: int = 0o600) -> int:
    """Create ``path`` exclusively with ``data``, not fsynced: the descriptor, left open
    for the caller's fsync (``fsync_paths``) and close.  On an error nothing is left."""
    return _created(path, mode, lambda fd: _write_all(fd, data))[0]


def _created(path: Path, mode: int, fill: Callable[[int], int]) -> tuple[int, int]:
    """``path`` created exclusively and filled by ``fill(fd)``: the open descriptor and
    what ``fill`` returned; on any error the partial file is removed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        return fd, fill(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise


def _write_all(fd: int, data) -> int:
    view = memoryview(data)
    total = len(view)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    return total


def fsync_paths(paths: Iterable[Path | int], together: int = 8) -> None:
    """fsync files (or directories) side by side: the file system serves fsyncs that wait
    at the same time with one commit of its own journal, so a batch costs a few disk
    flushes instead of one per file.  Every one is on disk when this returns.  A path
    may also be a descriptor the caller still has open (and closes itself)."""
    paths = list(paths)
    if len(paths) <= 1:
        for path in paths:
            _fsync_path(path)
        return
    # The caller's thread takes one; the others wait side by side on the pool's threads.
    pool = _pool(together)
    rest = [pool.submit(_fsync_path, path) for path in paths[1:]]
    failed: BaseException | None = None
    try:
        _fsync_path(paths[0])
    except BaseException as exc:
        failed = exc
    for done in rest:  # every one finished before the caller moves on, even after an error
        try:
            done.result()
        except BaseException as exc:
            failed = failed or exc
    if failed is not None:
        raise failed


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(size: int) -> ThreadPoolExecutor:
    """Threads kept for fsyncs (starting eight threads per batch would cost more than
    the batch saves)."""
    with _pools_lock:
        if size not in _pools:
            _pools[size] = ThreadPoolExecutor(size, thread_name_prefix="fsync")
        return _pools[size]


def _fsync_path(path: Path | int) -> None:
    if isinstance(path, int):
        os.fsync(path)
        return
    fd = os.open(path, os.O_RDONLY)  # a directory opens so too
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


SQLITE_FULL = 13  # "database or disk is full": the catalogue's way of saying ENOSPC


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL or "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
