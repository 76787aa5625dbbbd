"""What a session fetches from one ISP folder, and in which order: decisions only, no I/O.

The IMAP side (``gateway.fetch.imap``) hands in what it read from the server (RFC822.SIZE
of each new UID) and what the session took so far; these functions say:

- which copies the oversize policy keeps out of the session (``leave``, ``defer`` to the
  off-peak window, ``delete`` unread) and which are fetched;
- the order: smallest first, so one big attachment never holds up the short urgent mail;
- where the per-session caps (``max_messages``, ``max_bytes``) cut the list, leaving
  the rest for a later session;
- how the list goes over the wire: batches of whole messages in one UID FETCH, and each
  message over ``chunk_size`` alone, in pieces (``gateway.fetch.partial``);
- whether the folder can be opened read-only, and which copies kept on the server may go.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from gateway.config import FetchConfig

# Outcomes of the size policy, also the notice kinds recorded once per copy.
LEFT = "oversize-left"
DEFERRED = "oversize-deferred"
DELETED_OVERSIZE = "oversize-deleted"

OVERSIZE_OUTCOMES = {"leave": LEFT, "defer": DEFERRED, "delete": DELETED_OVERSIZE}


def in_window(window: tuple[int, int] | None, now: float) -> bool:
    """Is local time ``now`` inside ``(start, end)`` minutes (wrapping past midnight)?"""
    if window is None:
        return False
    lt = time.localtime(now)
    minute = lt.tm_hour * 60 + lt.tm_min
    start, end = window
    return start <= minute < end if start < end else (minute >= start or minute < end)


def format_window(window: tuple[int, int]) -> str:
    """``(1320, 360)`` -> ``22:00-06:00``, as the admin wrote it."""
    return "-".join(f"{m // 60:02d}:{m % 60:02d}" for m in window)


def opens_read_only(account: FetchConfig) -> bool:
    """SELECT read-only (EXAMINE) when nothing in the folder can be deleted this session:
    copies are kept for ever and the size policy deletes none."""
    return (account.keep and account.keep_days is None
            and not (account.max_message_size and account.oversize == "delete"))


def kept_until(account: FetchConfig, now: float) -> float | None:
    """Copies taken before this time may now be deleted on the server; None: keep them.

    With keep = false that is every copy taken (some may have been kept while keep was
    true: they are spooled, so they may go now).
    """
    if not account.keep:
        return float("inf")
    if account.keep_days:
        return now - account.keep_days * 86400
    return None


def recognises_copies(account: FetchConfig, renumbered: bool) -> bool:
    """Look a new UID's copy up by digest (size and header block) before taking it?

    Within one UIDVALIDITY a new UID is a new copy, however alike its headers and size
    (mail without Message-ID or Received lines can be): the digest recognises copies
    again after a renumbering, or a copy moved between the account's folders.
    """
    return renumbered or len(account.folders) > 1


@dataclass(frozen=True)
class FolderPlan:
    """The decisions for one folder's new copies."""
    fetch: tuple[tuple[int, int], ...]  # (uid, size) to fetch now, smallest first
    oversize: tuple[int, ...]           # UIDs over max_message_size kept out by the policy, by UID
    outcome: str | None                 # what the policy does with them: LEFT, DEFERRED or DELETED_OVERSIZE
    capped: int                         # copies fetchable but left for a later session by the caps

    @property
    def messages(self) -> int:
        return len(self.fetch)

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.fetch)


def plan_folder(account: FetchConfig, sizes: dict[int, int], now: float,
                fetched: int = 0, fetched_bytes: int = 0) -> FolderPlan:
    """Plan the new copies ``sizes`` ({uid: RFC822.SIZE}) of one folder.

    ``fetched`` and ``fetched_bytes`` are what this account's session took from earlier
    folders: the caps are per session, not per folder.  At least one message is fetched
    per session whatever its size against ``max_bytes``, or a message bigger than the cap
    would never come.
    """
    candidates = []
    oversize = []
    for uid in sorted(sizes):
        size = sizes[uid]
        if account.max_message_size and size > account.max_message_size:
            if account.oversize == "defer" and in_window(account.offpeak, now):
                candidates.append((size, uid))
            else:
                oversize.append(uid)
        else:
            candidates.append((size, uid))
    candidates.sort()
    fetch: list[tuple[int, int]] = []
    planned_bytes = 0
    for size, uid in candidates:
        count = fetched + len(fetch)
        if account.max_messages and count >= account.max_messages:
            break
        if account.max_bytes and fetched_bytes + planned_bytes + size > account.max_bytes and count:
            break
        fetch.append((uid, size))
        planned_bytes += size
    return FolderPlan(fetch=tuple(fetch), oversize=tuple(oversize),
                      outcome=OVERSIZE_OUTCOMES[account.oversize] if oversize else None,
                      capped=len(candidates) - len(fetch))


@dataclass(frozen=True)
class Batch:
    """Messages fetched whole in one UID FETCH, or (``in_pieces``) one message over
    ``chunk_size`` fetched in pieces straight to disk."""
    messages: tuple[tuple[int, int], ...]  # (uid, size)
    in_pieces: bool = False


def batches(fetch: tuple[tuple[int, int], ...] | list[tuple[int, int]], batch_size: int,
            chunk_size: int) -> list[Batch]:
    """Group the planned messages, in plan order, for the wire.

    A batch holds at most ``batch_size`` messages and ``chunk_size`` bytes (imapclient
    holds a whole response in memory); the message that would overflow it starts the
    next one.
    """
    out: list[Batch] = []
    batch: list[tuple[int, int]] = []
    batch_bytes = 0
    for uid, size in fetch:
        if size > chunk_size:
            if batch:
                out.append(Batch(tuple(batch)))
                batch, batch_bytes = [], 0
            out.append(Batch(((uid, size),), in_pieces=True))
            continue
        if batch and (len(batch) >= batch_size or batch_bytes + size > chunk_size):
            out.append(Batch(tuple(batch)))
            batch, batch_bytes = [], 0
        batch.append((uid, size))
        batch_bytes += size
    if batch:
        out.append(Batch(tuple(batch)))
    return out
