"""DATA on its way into the spool: the queue's tmp file, filled as the client sends it.

No message is ever held whole in memory.  The SMTP reader hands over each line (or each
piece of an overlong one), already unstuffed; at most ``FLUSH_AT`` bytes wait here before
they are written, on a thread, to the tmp file that ``spool.queue`` gave out.  The file
starts with our Received: header.

Mail submitted from the LAN (mynetworks or AUTH) that lacks Date: or Message-ID: gets
them here, once, at the end of its header block (RFC 6409 §8, as Postfix's cleanup does
for local clients): the block is still in the buffer when its first bytes go to the file.
A header block longer than the buffer is left as it came.

The order that keeps the spool honest: write as it comes (taking its SHA-256 on the way)
-> at the final dot, policy reads the file -> the queue's intake fsyncs it beside its
envelope, renames both into the queue and commits, with whatever else reached its dot
meanwhile (``spool.intake``) -> 250.
Whatever is not queued (a refusal, a disk error, a client that went away, a cancelled
transaction) is removed by ``close``, which the DATA command always calls.
"""
from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
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
    qid: str
    path: Path
    prologue: int  # length of our Received: header at the start of the file
    file: BinaryIO | None
    hold: contextlib.ExitStack  # keeps start-up recovery away from the tmp file
    size: int = 0  # the message's own bytes, unstuffed, without our Received: header
    error: OSError | None = None  # the first write that failed; answered at the dot
    pending: bytearray = field(default_factory=bytearray)
    # host name for a Message-ID when the header block is to be completed (LAN mail), else None
    complete_for: str | None = None
    header_seen: bool = False  # the header block went by (completed or not)
    digest: "hashlib._Hash" = field(default_factory=hashlib.sha256)  # of every byte written

    @classmethod
    async def open(cls, queue: Queue, received: bytes, complete_for: str | None = None) -> "IncomingBody":
        """A new tmp file with ``received`` written; a disk error is kept, not raised, so the
        client can be read to its final dot and then told 452."""
        return await asyncio.to_thread(cls._open, queue, received, complete_for)

    @classmethod
    def _open(cls, queue: Queue, received: bytes, complete_for: str | None) -> "IncomingBody":
        hold = contextlib.ExitStack()
        qid, path = hold.enter_context(queue.receiving())
        body = cls(qid, path, len(received), None, hold, complete_for=complete_for)
        try:
            body.file = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
            body._put(received)
        except OSError as exc:
            body._fail(exc)
        return body

    async def write(self, piece: bytes | memoryview) -> None:
        self.size += len(piece)
        if self.file is None:
            return  # refused or failed: the rest is read and dropped
        self.pending += piece
        if len(self.pending) >= FLUSH_AT:
            await self._flush()

    async def _flush(self, whole: bool = False) -> None:
        if not self.header_seen:
            self._complete_header_block(whole)
        chunk, self.pending = self.pending, bytearray()
        try:
            await asyncio.to_thread(self._put, chunk)
        except OSError as exc:
            self._fail(exc)

    def _put(self, chunk: bytes | bytearray) -> None:
        self.file.write(chunk)
        self.digest.update(chunk)

    @property
    def sha256(self) -> str:
        return self.digest.hexdigest()

    async def finish(self) -> mail_headers.Headers:
        """Everything written (the queue's intake fsyncs it), and the message's header
        block as it now stands in the file, parsed (read once, here, for everything after
        the dot).  One thread hop for both: a small message is written here whole.  Raises
        the disk error met on the way, if any (the file is then gone)."""
        if self.file is not None and not self.header_seen:
            self._complete_header_block(whole=True)
        if self.error is not None:
            raise self.error
        try:
            return await asyncio.to_thread(self._write_out)
        except OSError as exc:
            self._fail(exc)
            raise

    def _write_out(self) -> mail_headers.Headers:
        chunk, self.pending = self.pending, bytearray()
        try:
            self._put(chunk)
        finally:
            f, self.file = self.file, None
            f.close()  # flushes
        return self.read_headers()

    def _complete_header_block(self, whole: bool) -> None:
        """Add a missing Date: and Message-ID: at the end of the header block in ``pending``
        (``whole``: the buffer holds the whole message)."""
        self.header_seen = True
        if self.complete_for is None:
            return
        data = bytes(self.pending)
        if data.startswith(b"\r\n"):
            end = 0  # no header at all: the added ones are the block
        else:
            end = data.find(b"\r\n\r\n") + 2
            if end == 1:
                if not (whole and data.endswith(b"\r\n")) or b"\n\n" in data:
                    return  # the block goes on past the buffer, or ends in bare LFs: left as it came
                end = len(data)  # headers only, no body
        block = mail_headers.parse(data[:end])
        added = []
        if block.get("Date") is None:
            added.append(f"Date: {email.utils.formatdate(time.time(), localtime=True)}\r\n")
        if block.get("Message-ID") is None:
            stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
            added.append(f"Message-ID: <{stamp}.{self.qid}@{self.complete_for}>\r\n")
        if added:
            self.pending[end:end] = "".join(added).encode("ascii")

    def read_headers(self) -> mail_headers.Headers:
        """The message's header block, parsed (blocking: call it on a thread)."""
        with open(self.path, "rb") as f:
            f.seek(self.prologue)
            return mail_headers.parse(mail_headers.read(f))

    def refuse(self) -> None:
        """Drop what was written and what is still to come (the message is refused at its dot)."""
        self._discard()

    def close(self) -> None:
        """Remove the tmp file unless the queue took it; let recovery near it again."""
        self._discard()
        self.hold.close()

    def _fail(self, exc: OSError) -> None:
        if self.error is None:
            self.error = exc
        self._discard()  # give the disk back at once; the client is answered at its dot

    def _discard(self) -> None:
        self.pending = bytearray()
        f, self.file = self.file, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # gone already once the queue renamed it into msg/
