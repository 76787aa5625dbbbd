"""Stage 3, virus scan: the message streamed to clamd with INSTREAM, chunk by chunk.

clamd protocol (clamd(8)): ``zINSTREAM\\0``, then chunks each prefixed by its length as
a 4-byte big-endian number, then a zero length; clamd answers ``stream: OK``,
``stream: <name> FOUND`` or ``... ERROR`` (e.g. "INSTREAM size limit exceeded"), each
ending in NUL.  Memory stays bounded: nothing is held beyond one chunk.

What a result means is decided here, once: infected -> reject at SMTP time or quarantine
when fetched; clamd unreachable or failing -> ``[virus] on_error``: "accept" (fail-open,
deliver unscanned) or "reject" (fail-closed: 451 at SMTP time, fetched mail deferred in
the queue); always with a log line.  Messages over ``max_scan_size`` are delivered
unscanned with a log line (clamd would refuse them anyway past its StreamMaxLength).
"""
from __future__ import annotations

import logging
import socket
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterable

from gateway.policy.settings import VirusScan
from gateway.policy.verdict import ACCEPT, Verdict, defer, quarantine, reject

log = logging.getLogger("dialmail.virus")

CHUNK = 64 * 1024


@dataclass(frozen=True)
class ScanResult:
    virus: str | None = None  # detection name when infected
    error: str | None = None  # why there is no answer (clamd down, refused, timed out)

    @property
    def clean(self) -> bool:
        return self.virus is None and self.error is None


def parse_reply(reply: bytes) -> ScanResult:
    text = reply.rstrip(b"\0\n").decode("utf-8", "replace")
    body = text.split(": ", 1)[1] if ": " in text else text
    if body == "OK":
        return ScanResult()
    if body.endswith(" FOUND"):
        return ScanResult(virus=body[:-6].strip())
    return ScanResult(error=f"clamd: {body or 'no answer'}")


class ClamdScanner:
    """A blocking INSTREAM client; callers on the event loop go through a thread."""

    def __init__(self, settings: VirusScan):
        self.settings = settings

    @property
    def enabled(self) -> bool:
        return self.settings.clamd is not None

    def _connect(self) -> socket.socket:
        c = self.settings.clamd
        if c.kind == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.settings.timeout)
            try:
                s.connect(c.path)
            except BaseException:
                s.close()
                raise
            return s
        return socket.create_connection((c.host, c.port), timeout=self.settings.timeout)

    def scan(self, chunks: Iterable[bytes | memoryview]) -> ScanResult:
        try:
            with self._connect() as s:
                s.sendall(b"zINSTREAM\0")
                try:
                    for chunk in chunks:
                        if len(chunk):
                            s.sendall(struct.pack("!L", len(chunk)))
                            s.sendall(chunk)
                    s.sendall(struct.pack("!L", 0))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # clamd stopped reading (size limit): its reply says why
                reply = b""
                while not reply.endswith(b"\0"):
                    part = s.recv(4096)
                    if not part:
                        break
                    reply += part
        except OSError as exc:
            c = self.settings.clamd
            return ScanResult(error=f"clamd at {c} unreachable: {exc.strerror or exc}")
        return parse_reply(reply)

    def scan_parts(self, parts: Iterable[bytes]) -> ScanResult:
        """Scan the concatenation of ``parts`` (e.g. a message held in memory) without copying it."""
        def chunks():
            for part in parts:
                view = memoryview(part)
                for i in range(0, len(view), CHUNK):
                    yield view[i:i + CHUNK]
        return self.scan(chunks())

    def scan_file(self, f: BinaryIO) -> ScanResult:
        return self.scan(iter(lambda: f.read(CHUNK), b""))

    def too_big(self, size: int) -> bool:
        return size > self.settings.max_scan_size

    def verdict(self, result: ScanResult, fetched: bool, what: str) -> Verdict:
        """What a scan result means for a message; logs every outcome but a clean one."""
        if result.virus:
            log.warning("%s: virus found: %s", what, result.virus)
            if fetched:
                return quarantine(f"virus found: {result.virus}", virus=result.virus)
            return reject(554, "5.7.1", f"virus found: {result.virus}", virus=result.virus)
        if result.error:
            if self.settings.on_error == "accept":
                log.warning("%s: not scanned for viruses (%s); accepted unscanned (virus on_error = accept)",
                            what, result.error)
                return ACCEPT
            log.warning("%s: not scanned for viruses (%s); refused for now (virus on_error = reject)",
                        what, result.error)
            return defer(451, "4.7.1", f"could not be scanned for viruses: {result.error}")
        return ACCEPT
