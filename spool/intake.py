"""Messages that reach their final dot together enter the queue together (group commit).

Queueing a message durably costs the disk three flushes in a row: the body and its
envelope journal, then the two queue directories they are renamed into, then the
catalogue's WAL (see ``spool.queue``).  Each flush is a commit of the file system's
journal, and commits are served one after another, so five clients queueing at the same
moment each paying their own three made every one of them wait for fifteen.

Here one thread does the queueing: it takes every message waiting, and
``Queue.enqueue_batch`` gives the whole batch the same three flushes (the files' fsyncs
side by side, one fsync per directory, one COMMIT).  While a batch is on its way to disk
the next one gathers, so the batch grows with the load and nobody waits for a timer: a
lone message is queued at once.  Every message still has its body and journal on disk,
renamed into place and in the catalogue before its caller hears about it, so the order
that makes kill -9 harmless is unchanged; a crash loses only messages nobody was told
were queued.  SMTP's messages reach it in the queue's writer process (``spool.writer``).
"""
from __future__ import annotations

import errno
import sqlite3
import threading
from collections import deque
from concurrent.futures import Future
from typing import TYPE_CHECKING

from spool.fsio import is_disk_full

if TYPE_CHECKING:
    from spool.queue import Arrival, Queue

# Messages one batch takes at most: enough for every client a listener admits at once,
# few enough that one batch's catalogue transaction stays short.
BATCH_MAX = 64


class CatalogueFailed(OSError):
    """The catalogue refused a batch (full disk, I/O error): the callers above spool/ see
    it as the disk error it is, and nothing of the batch is left in the queue."""

    @classmethod
    def of(cls, exc: sqlite3.Error) -> "CatalogueFailed":
        failed = cls(errno.ENOSPC if is_disk_full(exc) else errno.EIO, f"the queue's catalogue: {exc}")
        failed.__cause__ = exc
        return failed


class Intake:
    """The queue's door for messages that arrive concurrently (SMTP DATA)."""

    def __init__(self, queue: "Queue"):
        self.queue = queue
        self._waiting: deque[tuple["Arrival", Future]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.batches = 0  # how many batches have been queued (for the logs and the tests)

    def submit(self, arrival: "Arrival") -> Future:
        """Queue ``arrival`` with whatever else is waiting; the future gives its queue id,
        or the error that kept it out (nothing of it is then left in the spool)."""
        done: Future = Future()
        with self._cond:
            self._waiting.append((arrival, done))
            if self._thread is None:
                # A daemon thread: a process that exits has no caller left to answer, and
                # whatever it had not queued was never acknowledged.
                self._thread = threading.Thread(target=self._run, name="spool-intake", daemon=True)
                self._thread.start()
            self._cond.notify()
        return done

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting:
                    self._cond.wait()
                batch = [self._waiting.popleft() for _ in range(min(BATCH_MAX, len(self._waiting)))]
            self.batches += 1
            try:
                results = self.queue.enqueue_batch([arrival for arrival, _ in batch])
            except BaseException as exc:  # enqueue_batch answers each message; this is a bug's way out
                results = [exc] * len(batch)
            for (_, done), result in zip(batch, results):
                if isinstance(result, sqlite3.Error):
                    done.set_exception(CatalogueFailed.of(result))
                elif isinstance(result, BaseException):
                    done.set_exception(result)
                else:
                    done.set_result(result)
