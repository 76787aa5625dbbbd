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

A clamd that does not answer at all is warned about once, not once per message: at
daemon start and by ``dialmail check`` (``ping``), and when one that answered stops.
Each message it could not scan then gets an info line in the daemon log, and nothing on
the stderr of every ``sendmail`` or ``queue`` command of a machine without clamd.
"""
from __future__ import annotations

import logging
import socket
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterable

from gateway.config.policy import VirusScan
from gateway.policy.verdict import ACCEPT, Verdict, defer, quarantine, reject

log = logging.getLogger("dialmail.virus")

CHUNK = 64 * 1024


@dataclass(frozen=True)
class ScanResult:
    virus: str | None = None  # detection name when infected
    error: str | None = None  # why there is no answer (clamd down, refused, timed out)
    unreachable: bool = False  # clamd did not answer at all (as opposed to failing this message)

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


# Whether each clamd (by address) answered the last time this process asked.
_answering: dict[str, bool] = {}


def _answered(clamd, ok: bool, why: str | None = None) -> None:
    was = _answering.get(str(clamd))
    _answering[str(clamd)] = ok
    if was is True and not ok:
        log.warning("clamd at %s stopped answering (%s)", clamd, why)
    elif was is False and ok:
        log.info("clamd at %s answers again", clamd)


def ping(settings: VirusScan) -> str | None:
    """Ask clamd PING; None when it answers PONG, else why not (one line)."""
    c = settings.clamd
    try:
        with ClamdScanner(settings)._connect(timeout=min(settings.timeout, 5.0)) as s:
            s.sendall(b"zPING\0")
            reply = b""
            while not reply.endswith(b"\0"):
                part = s.recv(64)
                if not part:
                    break
                reply += part
    except OSError as exc:
        why = f"clamd at {c} does not answer: {exc.strerror or exc or type(exc).__name__}"
        _answered(c, False, why)
        return why
    answer = reply.rstrip(b"\0\n").decode("utf-8", "replace")
    if answer != "PONG":
        why = f"clamd at {c} answered PING with {answer!r}"
        _answered(c, False, why)
        return why
    _answered(c, True)
    return None


class ClamdScanner:
    """A blocking INSTREAM client; callers on the event loop go through a thread."""

    def __init__(self, settings: VirusScan):
        self.settings = settings

    @property
    def enabled(self) -> bool:
        return self.settings.clamd is not None

    def _connect(self, timeout: float | None = None) -> socket.socket:
        c = self.settings.clamd
        timeout = self.settings.timeout if timeout is None else timeout
        if c.kind == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            try:
                s.connect(c.path)
            except BaseException:
                s.close()
                raise
            return s
        return socket.create_connection((c.host, c.port), timeout=timeout)

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
            error = f"clamd at {c} unreachable: {exc.strerror or exc}"
            _answered(c, False, error)
            return ScanResult(error=error, unreachable=True)
        _answered(self.settings.clamd, True)
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
                # clamd not answering at all was warned about once (see ping and _answered)
                log.log(logging.INFO if result.unreachable else logging.WARNING,
                        "%s: not scanned for viruses (%s); accepted unscanned (virus on_error = accept)",
                        what, result.error)
                return ACCEPT
            log.warning("%s: not scanned for viruses (%s); refused for now (virus on_error = reject)",
                        what, result.error)
            return defer(451, "4.7.1", f"could not be scanned for viruses: {result.error}")
        return ACCEPT
