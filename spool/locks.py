"""One-holder locks that also say who holds them: an flock plus the holder's pid in the file.

flock is released by the kernel when the holder dies, so a kill -9 never leaves a stale
lock behind; the pid in the file only serves the message for the one who is refused.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import signal
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> bool:
    """Have the kernel kill this process when ``parent`` (the daemon that started it) dies;
    False if it is gone already.  For the daemon's helper processes: whatever one holds
    was never acknowledged, and finishing it after the daemon is gone would only make a
    second copy of what the client sends again."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    return os.getppid() == parent  # checked after: it may have died before the prctl


def ignore_stop_signals() -> None:
    """Stopping a helper is its daemon's decision (it closes the helper's stdin once its
    clients are answered): a SIGTERM to the whole service must not cut its work short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class LockBusy(Exception):
    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


class PidLock:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise LockBusy with the holder's pid (as text, "?" if unknown)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockBusy(self.path.read_text().strip() or "?") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            # A full disk refuses the pid: the lock must not stay taken by an fd nobody
            # holds, or this process would refuse itself until it restarts.
            os.close(fd)
            raise
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)  # closing is what frees the lock

    def holder(self) -> int | None:
        """The pid holding the lock now, or None when nobody does."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = self.path.read_text().strip()
            return int(text) if text.isdigit() else -1
        finally:
            os.close(fd)
        return None
