"""A user's Maildir as a POP3 maildrop: listing, session lock, UIDLs, removal at UPDATE.

At login every message in new/ moves to cur/ with an empty info part (``:2,``), as
Maildir readers do when they have seen a message, so Dovecot can serve the same
Maildir.  Mail that arrives later stays in new/ until the next login: a session
works on the listing it started with.

A message's UIDL is its Maildir file name without the ``:2,`` info (``,S=`` size fields
included): exactly what Dovecot's POP3 says with ``pop3_uidl_format = %f``, so IMAP
and POP3 can be served by either program, or POP3 moved to Dovecot, without a client
fetching everything again.  It does not change when the file moves from new/ to cur/
or when a reader changes its flags, and it is the same after a restart.

Every blocking call here is meant for a worker thread.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gateway.pop3.wire import scan
from spool.fsio import fsync_dir

MAX_UID = 70  # RFC 1939: 1 to 70 characters in the range 0x21 to 0x7E
_PRINTABLE = re.compile(rf"[\x21-\x7e]{{1,{MAX_UID}}}")
_WIRE_SIZE = re.compile(r",W=(\d+)(?=[,:]|$)")  # Dovecot's CRLF size in the name


@dataclass(frozen=True)
class MaildropMessage:
    uid: str
    octets: int  # size on the wire: CRLF line ends, before dot-stuffing
    path: Path
    verbatim: bool = False  # stored exactly as sent (wire.scan): RETR passes it through


def unique_part(name: str) -> str:
    """``1700000000.Qx.host,S=12:2,S`` -> ``1700000000.Qx.host``."""
    return name.split(":", 1)[0].split(",", 1)[0]


def uid_of(name: str) -> str:
    base = name.split(":", 1)[0]
    if _PRINTABLE.fullmatch(base) and not base.startswith("."):
        return base
    # A foreign name that POP3 cannot carry: a digest of it is just as stable.
    return "H" + hashlib.sha256(base.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def read_cached(f: BinaryIO, size: int) -> bytes | None:
    """The next ``size`` bytes of ``f`` (fewer only at the end of the file) if the page
    cache holds them all, without waiting for the disk (``RWF_NOWAIT``); None when a read
    would have to wait, or the system cannot say: then read in a worker thread.

    A message just listed or delivered is nearly always cached, and reading it here costs
    less than the hop to a worker thread and back (five context switches per RETR).
    """
    if _NOWAIT is None:
        return None
    fd = f.fileno()
    offset = f.tell()
    buf = bytearray(size)
    try:
        n = os.preadv(fd, [buf], offset, _NOWAIT)
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: this file system cannot tell
        return None
    if n < size and offset + n < os.fstat(fd).st_size:
        return None  # partly cached
    f.seek(offset + n)
    return bytes(memoryview(buf)[:n])


_NOWAIT = getattr(os, "RWF_NOWAIT", None)


class OctetCounts:
    """Wire sizes already computed, so each file is read for its size once per daemon.

    Keyed by inode, size and mtime: a file that changed is measured again.
    """

    def __init__(self):
        self._known: dict[tuple[int, int, int], tuple[int, bool]] = {}
        self._lock = threading.Lock()

    def of(self, path: Path, st: os.stat_result) -> int:
        return self.measure(path, st)[0]

    def measure(self, path: Path, st: os.stat_result) -> tuple[int, bool]:
        """(wire size, verbatim: see ``wire.scan``); a size Dovecot put in the name is
        taken as it is, without reading the file (and without the verbatim shortcut)."""
        found = _WIRE_SIZE.search(path.name)
        if found:
            return int(found.group(1)), False
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._known:
                return self._known[key]
        with open(path, "rb") as f:
            measured = scan(f)
        with self._lock:
            self._known[key] = measured
        return measured


class MaildropLocks:
    """At most one POP3 session per maildrop (RFC 1939 exclusive-access lock).

    One daemon serves a spool (the daemon lock sees to that), so the lock lives in
    its memory and vanishes with it: a crash can never leave a maildrop locked.
    """

    def __init__(self):
        self._held: set[str] = set()
        self._lock = threading.Lock()

    def acquire(self, user: str) -> bool:
        with self._lock:
            if user in self._held:
                return False
            self._held.add(user)
            return True

    def release(self, user: str) -> None:
        with self._lock:
            self._held.discard(user)


class Maildrop:
    def __init__(self, path: Path, octets: OctetCounts):
        self.path = Path(path)
        self.octets = octets

    def open(self) -> list[MaildropMessage]:
        """Move new mail to cur/ and list the maildrop, oldest first."""
        cur, new = self.path / "cur", self.path / "new"
        if not cur.is_dir():
            return []
        moved = False
        if new.is_dir():
            for name in os.listdir(new):
                if name.startswith("."):
                    continue
                try:
                    os.rename(new / name, cur / (name if ":" in name else name + ":2,"))
                    moved = True
                except FileNotFoundError:
                    pass  # another reader moved it first; it is in cur/ now
        if moved:
            fsync_dir(cur)
            fsync_dir(new)
        messages = []
        for name in os.listdir(cur):
            if name.startswith("."):
                continue
            path = cur / name
            try:
                st = path.stat()
                octets, verbatim = self.octets.measure(path, st)
                messages.append(MaildropMessage(uid_of(name), octets, path, verbatim))
            except FileNotFoundError:
                continue  # removed by another reader while we listed
        # Maildir unique names begin with the delivery time, so this is arrival order.
        messages.sort(key=lambda m: (m.uid, m.path.name))
        return messages

    def _current_path(self, message: MaildropMessage) -> Path | None:
        """Where the message is now: another reader may have renamed it to change flags."""
        if message.path.exists():
            return message.path
        base = unique_part(message.path.name)
        for sub in ("cur", "new"):
            d = self.path / sub
            for name in os.listdir(d) if d.is_dir() else ():
                if unique_part(name) == base:
                    return d / name
        return None

    def open_message(self, message: MaildropMessage) -> BinaryIO | None:
        for _ in range(3):
            path = self._current_path(message)
            if path is None:
                return None
            try:
                return open(path, "rb")
            except FileNotFoundError:
                continue  # renamed between the lookup and the open
        return None

    def remove(self, messages) -> int:
        """UPDATE state: unlink the messages deleted in the session; returns how many failed."""
        failed = 0
        for message in messages:
            path = self._current_path(message)
            if path is None:
                continue  # already gone: what the client asked for
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError:
                failed += 1
        if messages:
            fsync_dir(self.path / "cur")
        return failed
