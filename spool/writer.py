"""The queue's writer: SMTP's messages are put on disk by a process of their own.

Queueing a message is mostly waiting for the disk and a little Python around each wait
(see ``spool.intake``).  On a thread of the daemon, that little Python competed with the
event loop for the interpreter lock on every system call: the profile of a burst of
SMTP clients showed a third of the daemon's CPU spent waking threads and passing the
lock back and forth.  In a process of its own (as Postfix's cleanup is to its smtpd) the
writer has an interpreter of its own, and the machine's second core works for it.

The daemon starts it on the first message (``python -m spool.writer SPOOL PID``) and talks
to it over its stdin and stdout:

* a request is ``!II`` (length of the JSON part, length of the body bytes), the JSON
  envelope, then the message's bytes as they go into the file (empty when the daemon
  has written the file itself, a message over DATA's buffer: its size and SHA-256 come
  in the JSON instead);
* a reply is one JSON line per message: ``[qid, batch]`` once the message is in the
  queue (fsynced, renamed, committed), ``[qid, batch, errno, text]`` when it is not, and
  then nothing of it is left.

The order that makes kill -9 harmless is the intake's, unchanged.  If the writer dies,
the daemon answers its waiting clients 451 (a message it had committed is then queued
and may come again from the client: never lost) and starts a new writer for the next
message.  When the daemon goes, the writer reads the end of its stdin, finishes what it
was given and exits.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import hashlib
import json
import logging
import os
import struct
import sys
import threading
from pathlib import Path
from typing import BinaryIO

from spool.intake import Intake
from spool.locks import die_with_parent, ignore_stop_signals
from spool.queue import Arrival, Catalogue, Queue

log = logging.getLogger("dialmail.spool")

HEAD = struct.Struct("!II")
# A request's JSON part is an envelope: a generous bound still refuses a broken stream.
META_MAX = 4 * 1024 * 1024


class InMemory:
    """A body the daemon still held whole: written here, in one call, just before its fsync."""

    def __init__(self, path: Path, data: bytes):
        self.path, self.data = path, data

    def write_out(self) -> tuple[int, str, int]:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(self.data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            raise
        return len(self.data), hashlib.sha256(self.data).hexdigest(), fd


class OnDisk:
    """A body the daemon wrote itself (larger than DATA's buffer)."""

    def __init__(self, path: Path, size: int, sha256: str):
        self.path, self.size, self.sha256 = path, size, sha256

    def write_out(self) -> tuple[int, str, int]:
        return self.size, self.sha256, os.open(self.path, os.O_RDONLY)


def request(arrival: Arrival, data: bytes, size: int | None = None, sha256: str | None = None) -> bytes:
    """The frame for one message (``data``: its bytes, or empty with ``size`` and ``sha256``
    for a file already written)."""
    meta = {"qid": arrival.qid, "tmp": str(arrival.tmp), "sender": arrival.sender,
            "recipients": arrival.recipients, "origin": arrival.origin, "client": arrival.client,
            "message_id": _text(arrival.message_id), "subject": _text(arrival.subject),
            "urgent": arrival.urgent, "smtputf8": arrival.smtputf8, "size": size, "sha256": sha256}
    raw = json.dumps(meta).encode("ascii")  # ASCII: surrogate escapes of raw 8-bit headers survive
    return HEAD.pack(len(raw), len(data)) + raw + data


def _text(value) -> str | None:
    return None if value is None else str(value)


def _arrival(meta: dict, data: bytes) -> Arrival:
    tmp = Path(meta["tmp"])
    body = OnDisk(tmp, int(meta["size"]), str(meta["sha256"])) if meta.get("sha256") else InMemory(tmp, data)
    return Arrival(str(meta["qid"]), tmp, str(meta["sender"]), [(str(r), str(route)) for r, route in meta["recipients"]],
                   origin=str(meta["origin"]), client=meta.get("client"), message_id=meta.get("message_id"),
                   subject=meta.get("subject"), urgent=bool(meta.get("urgent")), smtputf8=bool(meta.get("smtputf8")),
                   body=body)


# ---------------------------------------------------------------- the writer process

def serve(spool_dir: Path, requests: BinaryIO, replies: BinaryIO) -> None:
    """Queue every message read from ``requests`` until it ends, answering on ``replies``."""
    queue = Queue(Catalogue(spool_dir))
    intake = Intake(queue)
    out = threading.Lock()
    given: list[concurrent.futures.Future] = []

    def answer(qid: str, done: concurrent.futures.Future) -> None:
        try:
            line = [qid, intake.batches, done.result()]
        except OSError as exc:
            line = [qid, intake.batches, exc.errno or errno.EIO, exc.strerror or str(exc)]
        except Exception as exc:  # noqa: BLE001 - reported to the daemon, which answers 451
            line = [qid, intake.batches, errno.EIO, str(exc)]
        with out:
            replies.write(json.dumps(line).encode("ascii") + b"\n")
            replies.flush()

    try:
        while head := requests.read(HEAD.size):
            meta_len, data_len = HEAD.unpack(head)
            if meta_len > META_MAX:
                raise ValueError(f"a request of {meta_len} bytes: the stream is broken")
            raw = requests.read(meta_len)
            data = requests.read(data_len)
            if len(raw) != meta_len or len(data) != data_len:
                break  # the daemon went away in the middle of a request: never acknowledged
            meta = json.loads(raw)
            arrival = _arrival(meta, data)
            done = intake.submit(arrival)
            done.add_done_callback(lambda d, qid=arrival.qid: answer(qid, d))
            given.append(done)
            if len(given) > 1000:
                given = [g for g in given if not g.done()]
    finally:
        concurrent.futures.wait(given)  # everything handed in is answered before exiting
        queue.cat.close()


def main() -> None:
    spool_dir, daemon = Path(sys.argv[1]), int(sys.argv[2])
    ignore_stop_signals()
    if not die_with_parent(daemon):
        return
    logging.basicConfig(level=logging.WARNING, format="dialmail queue writer: %(message)s")
    serve(spool_dir, sys.stdin.buffer, sys.stdout.buffer)


# ---------------------------------------------------------------- the daemon's side

class WriterStopped(OSError):
    """The writer process exited with messages unanswered: they were not acknowledged."""


class QueueWriter:
    """The daemon's end: ``queue`` hands a message to the writer process and waits for it."""

    def __init__(self, queue: Queue):
        self.queue = queue
        self.proc: asyncio.subprocess.Process | None = None
        self.waiting: dict[str, tuple[asyncio.Future, Path]] = {}
        self.batches = 0  # the writer's count of batches committed, as last heard
        self.inline = False  # no process could be started: the intake runs on a thread here
        self._starting = asyncio.Lock()
        self._reader: asyncio.Task | None = None

    async def put(self, arrival: Arrival, data: bytes, size: int | None = None, sha256: str | None = None) -> str:
        """Queue ``arrival`` (its bytes ``data``, or a file already written with ``size`` and
        ``sha256``); its queue id once it is on disk and in the catalogue.  Raises OSError
        (the disk's error, or ``WriterStopped``) when it is not queued."""
        proc = None if self.inline else await self._running()
        if proc is None:
            # No process could be started: the same intake on a thread of the daemon.
            arrival.body = OnDisk(arrival.tmp, size, sha256) if sha256 else InMemory(arrival.tmp, data)
            return await asyncio.wrap_future(self.queue.intake.submit(arrival))
        done = asyncio.get_running_loop().create_future()
        self.waiting[arrival.qid] = (done, arrival.tmp)
        try:
            proc.stdin.write(request(arrival, data, size, sha256))
            await proc.stdin.drain()
        except (ConnectionError, RuntimeError) as exc:  # the writer is gone
            self.waiting.pop(arrival.qid, None)
            self._remove_unqueued(arrival.qid, arrival.tmp)
            raise WriterStopped(errno.EIO, f"the queue's writer process is gone: {exc}") from None
        return await done

    async def _running(self) -> asyncio.subprocess.Process | None:
        async with self._starting:
            if self.inline:
                return None
            if self.proc is None or self.proc.returncode is not None or self._reader is None or self._reader.done():
                try:
                    self.proc = await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "spool.writer", str(self.queue.cat.root), str(os.getpid()),
                        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, close_fds=True)
                except OSError as exc:
                    # The interpreter cannot be started again (its file is not executable for
                    # the user the daemon runs as): mail still goes in, more slowly.
                    log.warning("cannot start the queue's writer process (%s: %s): messages are queued on a "
                                "thread of the daemon instead, which takes fewer of them a second",
                                sys.executable, exc.strerror or exc)
                    self.inline = True
                    return None
                self._reader = asyncio.create_task(self._read_replies(self.proc), name="queue-writer-replies")
            return self.proc

    async def _read_replies(self, proc: asyncio.subprocess.Process) -> None:
        try:
            while line := await proc.stdout.readline():
                reply = json.loads(line)
                qid, self.batches = reply[0], int(reply[1])
                done, tmp = self.waiting.pop(qid, (None, None))
                if done is None or done.done():
                    continue  # its client went away meanwhile: queued all the same, or removed
                if len(reply) == 3:
                    done.set_result(reply[2])
                else:
                    done.set_exception(OSError(int(reply[2]), str(reply[3])))
        finally:
            await self._stopped(proc)

    async def _stopped(self, proc: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            if proc.returncode is None:
                proc.kill()
        code = await proc.wait()
        if self.waiting:
            log.error("the queue's writer process exited (%s) with %d messages unanswered: their clients are told "
                      "451 and send them again", _exit(code), len(self.waiting))
        for qid, (done, tmp) in list(self.waiting.items()):
            self._remove_unqueued(qid, tmp)
            if not done.done():
                done.set_exception(WriterStopped(errno.EIO, f"the queue's writer process exited ({_exit(code)})"))
        self.waiting.clear()

    def _remove_unqueued(self, qid: str, tmp: Path) -> None:
        """A message the writer never answered for: left in tmp/ unless it reached the queue."""
        if not (self.queue.msg / qid).exists():
            for path in (tmp, self.queue.tmp / f"{qid}.env"):
                with contextlib.suppress(OSError):
                    os.unlink(path)

    async def close(self, timeout: float = 30.0) -> None:
        """Let the writer finish what it was given, then exit."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            proc.stdin.close()
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        except TimeoutError:
            log.error("the queue's writer process did not finish within %.0f s: stopped", timeout)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await self._reader


def _exit(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


if __name__ == "__main__":
    main()
