"""DATA on its way into the spool: the queue's tmp file, filled as the client sends it.

No message is ever held whole in memory.  The SMTP reader hands over each line (or each
piece of an overlong one), already unstuffed; at most ``FLUSH_AT`` bytes wait here before
they are written, on a thread, to the tmp file that ``spool.queue`` gave out.  The file
starts with our Received: header.  It is created by the first such write; a message
smaller than the buffer (most office mail) is written whole by the queue's intake, on
its own process (``spool.writer``), just before it is fsynced: no thread hop at DATA and
none at the dot.

Mail submitted from the LAN (mynetworks or AUTH) that lacks Date: or Message-ID: gets
them here, once, at the end of its header block (RFC 6409 §8, as Postfix's cleanup does
for local clients): the block is still in the buffer when its first bytes go to the file.
A header block longer than the buffer is left as it came.

The order that keeps the spool honest: write as it comes (taking its SHA-256 on the way)
-> at the final dot, the header block is parsed from memory, and a virus scan reads the
file -> the queue's writer process writes what is left, fsyncs it beside its envelope,
renames both into the queue and commits, with whatever else reached its dot meanwhile
(``spool.writer``, ``spool.intake``) -> 250.  Whatever is not queued (a refusal, a disk error, a client
that went away, a cancelled transaction) is removed by ``close``, which the DATA command
always calls; once the writer has the message, what it does not queue it removes itself.
"""
from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from gateway.mail import headers as mail_headers
from spool.queue import Queue

# Bytes kept in memory per transaction before they go to the file: large enough that a
# 20 MB upload is a few hundred thread hops, small enough that 100 clients stalled in
# DATA cost a few tens of MB.
FLUSH_AT = 64 * 1024


@dataclass
class IncomingBody:
    queue: Queue
    qid: str
    path: Path
    received: bytes  # our Received: header, the file's first bytes
    hold: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # recovery stays away
    file: BinaryIO | None = None  # created by the first write to disk
    created: bool = False
    on_disk: int = 0  # bytes written to the file (our Received: header included)
    size: int = 0  # the message's own bytes, unstuffed, without our Received: header
    error: OSError | None = None  # the first write that failed; answered at the dot
    dropped: bool = False  # refused or failed: the rest is read and dropped
    pending: bytearray = field(default_factory=bytearray)
    # host name for a Message-ID when the header block is to be completed (LAN mail), else None
    complete_for: str | None = None
    header_seen: bool = False  # the header block went by (completed or not)
    head: bytes | None = None  # the header block, once seen whole in the buffer
    parsed: mail_headers.Headers | None = None  # that block, parsed already
    digest: "hashlib._Hash" = field(default_factory=hashlib.sha256)  # of every byte written
    handed_over: bool = False  # the queue's writer has it: it queues or removes the file

    @classmethod
    def start(cls, queue: Queue, received: bytes, complete_for: str | None = None) -> "IncomingBody":
        """A message about to arrive; its tmp file is created when the first bytes go to
        disk, and a disk error then is kept, not raised, so the client can be read to its
        final dot and then told 452."""
        qid, path = queue.new_body()
        return cls(queue, qid, path, received, complete_for=complete_for)

    @property
    def prologue(self) -> int:
        return len(self.received)

    async def write(self, piece: bytes | memoryview) -> None:
        self.size += len(piece)
        if self.dropped:
            return
        self.pending += piece
        if len(self.pending) >= FLUSH_AT:
            await self._flush()

    async def _flush(self) -> None:
        if not self.header_seen:
            self._complete_header_block(whole=False)
        chunk, self.pending = self.pending, bytearray()
        try:
            await asyncio.to_thread(self._put, chunk)
        except OSError as exc:
            self._fail(exc)

    def _create(self) -> None:
        """The tmp file, starting with our Received: header (blocking: on a thread), for
        a message that goes to disk before its dot: recovery is kept away from it."""
        self.hold.enter_context(self.queue.writing())
        self.file = os.fdopen(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
        self.created = True
        self.file.write(self.received)
        self.digest.update(self.received)
        self.on_disk = len(self.received)

    def _put(self, chunk: bytes | bytearray) -> None:
        if self.file is None:
            self._create()
        self.file.write(chunk)
        self.digest.update(chunk)
        self.on_disk += len(chunk)

    async def finish(self) -> mail_headers.Headers:
        """The message's header block as it now stands, parsed (once, here, for everything
        after the dot): from memory, unless the block went on past the first buffer.
        Raises the disk error met on the way, if any (the file is then gone)."""
        if not self.header_seen and not self.dropped:
            self._complete_header_block(whole=True)
        if self.error is not None:
            raise self.error
        if self.parsed is not None:
            return self.parsed
        if self.head is not None:
            return mail_headers.parse(self.head)
        await self.written()
        return await asyncio.to_thread(self.read_headers)

    async def written(self) -> None:
        """Everything on disk in the tmp file (a virus scan reads it; a message larger
        than the buffer goes to the queue's writer as a file)."""
        if self.file is not None or not self.created:
            try:
                await asyncio.to_thread(self._write_rest)
            except OSError as exc:
                self._fail(exc)
                raise

    def _write_rest(self) -> None:
        chunk, self.pending = self.pending, bytearray()
        if not self.created:
            self._create()
        f, self.file = self.file, None
        try:
            f.write(chunk)
            self.digest.update(chunk)
            self.on_disk += len(chunk)
        finally:
            f.close()  # flushes

    def whole(self) -> bytes:
        """The file's bytes, for a message that never went to disk (smaller than the
        buffer): the queue's writer writes them in one call just before the fsync."""
        return self.received + self.pending

    @property
    def sha256(self) -> str:
        return self.digest.hexdigest()

    def _complete_header_block(self, whole: bool) -> None:
        """Add a missing Date: and Message-ID: at the end of the header block in ``pending``
        (``whole``: the buffer holds the whole message), and keep the block to parse."""
        self.header_seen = True
        parsed = self._add_missing(whole) if self.complete_for is not None else None
        block = mail_headers.read(io.BytesIO(self.pending))
        if whole or len(block) < len(self.pending):
            self.head = block  # else it goes on past the buffer: read back from the file
            if parsed is not None and parsed[1] == len(block):
                self.parsed = parsed[0]  # the very block: no need to parse it twice

    def _add_missing(self, whole: bool) -> tuple[mail_headers.Headers, int] | None:
        """The block parsed, with what was added, and where it now ends."""
        data = bytes(self.pending)
        if data.startswith(b"\r\n"):
            end = 0  # no header at all: the added ones are the block
        else:
            end = data.find(b"\r\n\r\n") + 2
            if end == 1:
                if not (whole and data.endswith(b"\r\n")) or b"\n\n" in data:
                    return None  # the block goes on past the buffer, or ends in bare LFs: left as it came
                end = len(data)  # headers only, no body
        block = mail_headers.parse(data[:end])
        added = []
        if block.get("Date") is None:
            added.append(("Date", email.utils.formatdate(time.time(), localtime=True)))
        if block.get("Message-ID") is None:
            stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
            added.append(("Message-ID", f"<{stamp}.{self.qid}@{self.complete_for}>"))
        if added:
            lines = "".join(f"{name}: {value}\r\n" for name, value in added).encode("ascii")
            self.pending[end:end] = lines
            end += len(lines)
            for name, value in added:
                block[name] = value
        return block, end

    def read_headers(self) -> mail_headers.Headers:
        """The message's header block, parsed (blocking: call it on a thread)."""
        with open(self.path, "rb") as f:
            f.seek(self.prologue)
            return mail_headers.parse(mail_headers.read(f))

    def refuse(self) -> None:
        """Drop what was written and what is still to come (the message is refused at its dot)."""
        self._discard()

    def close(self) -> None:
        """Remove the tmp file unless the queue's writer has it; let recovery near it again."""
        if not self.handed_over:
            self._discard()
        self.hold.close()

    def _fail(self, exc: OSError) -> None:
        if self.error is None:
            self.error = exc
        self._discard()  # give the disk back at once; the client is answered at its dot

    def _discard(self) -> None:
        self.dropped = True
        self.pending = bytearray()
        f, self.file = self.file, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # gone already once the queue renamed it into msg/
