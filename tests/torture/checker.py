"""What went in against what came out, after a torture run.

In: messages submitted to dialmail (SMTP 250 seen, or put in the queue) for the smarthost
or for local mailboxes, and messages placed in the ISP's mailbox.  Out: the smarthost's
store (smtp-sink captures), the local Maildirs (and the quarantine).  Every message
carries a unique Message-ID and ends with a marker line, so a capture cut short is
told apart from a delivery.

Counted separately from real duplicates:
- outbound RFC 1047 duplicates: the line went after the smarthost had the final "."
  and before its reply reached us (the tap saw the dot pass and nothing after it);
  the message is sent again and the smarthost has it twice.  No SMTP client can close
  that window, so these are expected; their rate is reported.
- ingest duplicates: a client that did not see our 250 (daemon killed after the
  message was safe, before the reply) sends it again.  The same window, inbound.
Every other duplicate, and every missing message, is a bug.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from spool.maildir import Maildir
from tests.torture.tap import Conversation, imap_cut, smtp_cut

MSGID = re.compile(rb"^Message-ID:\s*(<[^>\r\n]*>)", re.I | re.M)


def end_marker(mid: str) -> bytes:
    return f"END-OF-MESSAGE {mid}".encode()


def make_message(mid: str, rcpt: str, size: int, subject: str = "torture", sender: str = "alice@office.test",
                 delivered_to: bool = False) -> bytes:
    head = ""
    if delivered_to:
        head += f"Delivered-To: {rcpt}\r\n"
    head += (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\nMessage-ID: {mid}\r\n"
             f"Date: Wed, 25 Nov 2026 10:00:00 +0000\r\n\r\n")
    line = f"{mid} filler line of the torture run, .dot at start next:\r\n.leading dot\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return (head + body).encode() + end_marker(mid) + b"\r\n"


def message_id(data: bytes) -> str | None:
    m = MSGID.search(re.split(rb"\r?\n\r?\n", data, maxsplit=1)[0])
    return m.group(1).decode() if m else None


@dataclass
class Ledger:
    """What the run put in, and what happened to the line meanwhile."""
    outbound: set[str] = field(default_factory=set)            # Message-IDs for the smarthost
    local: dict[str, set[str]] = field(default_factory=dict)   # mailbox -> Message-IDs expected
    resent: set[str] = field(default_factory=set)              # sent again after a missing 250
    drops: int = 0
    kills: int = 0
    kill_phases: Counter = field(default_factory=Counter)

    def expect_local(self, mailbox: str, mid: str) -> None:
        self.local.setdefault(mailbox, set()).add(mid)


@dataclass
class Report:
    submitted_out: int = 0
    arrived_out: int = 0
    lost_out: list[str] = field(default_factory=list)
    dup_out_window: int = 0
    dup_out_ingest: int = 0
    dup_out_bug: list[str] = field(default_factory=list)
    partial_captures: int = 0
    expected_local: int = 0
    arrived_local: int = 0
    lost_local: list[str] = field(default_factory=list)
    dup_local_ingest: int = 0
    dup_local_bug: list[str] = field(default_factory=list)
    unexpected_local: list[str] = field(default_factory=list)
    left_at_isp: int = 0
    drops: int = 0
    kills: int = 0
    smtp_cuts: Counter = field(default_factory=Counter)
    imap_cuts: Counter = field(default_factory=Counter)
    kill_phases: Counter = field(default_factory=Counter)

    @property
    def lost(self) -> int:
        return len(self.lost_out) + len(self.lost_local)

    @property
    def duplicated(self) -> int:
        return len(self.dup_out_bug) + len(self.dup_local_bug)

    def problems(self) -> list[str]:
        out = []
        if self.lost_out:
            out.append(f"lost outbound: {sorted(self.lost_out)[:10]}")
        if self.lost_local:
            out.append(f"lost local: {sorted(self.lost_local)[:10]}")
        if self.dup_out_bug:
            out.append(f"outbound duplicates outside the RFC 1047 window: {sorted(self.dup_out_bug)[:10]}")
        if self.dup_local_bug:
            out.append(f"duplicates in local mailboxes: {sorted(self.dup_local_bug)[:10]}")
        if self.unexpected_local:
            out.append(f"unexpected local mail: {sorted(self.unexpected_local)[:10]}")
        if self.left_at_isp:
            out.append(f"{self.left_at_isp} message(s) left at the ISP")
        return out

    def format(self) -> str:
        window = self.smtp_cuts.get("window", 0)
        cuts = self.drops + self.kills
        rate = f"{self.dup_out_window / cuts:.2%} of interruptions" if cuts else "n/a"
        per_msg = f"{self.dup_out_window / self.submitted_out:.2%} of messages" if self.submitted_out else "n/a"
        lines = [
            "torture report",
            f"  carrier drops: {self.drops}   kill -9: {self.kills}",
            f"  SMTP cuts by position: {dict(sorted(self.smtp_cuts.items()))}",
            f"  IMAP cuts by command in flight: {dict(sorted(self.imap_cuts.items()))}",
            f"  kills by phase: {dict(sorted(self.kill_phases.items()))}",
            f"  outbound: submitted {self.submitted_out}, arrived {self.arrived_out}, lost {len(self.lost_out)}, "
            f"duplicated (bug) {len(self.dup_out_bug)}",
            f"  outbound RFC 1047 window: {window} cut(s) in the window, {self.dup_out_window} duplicate(s) "
            f"({rate}, {per_msg})",
            f"  ingest resend duplicates (250 lost with the daemon): outbound {self.dup_out_ingest}, "
            f"local {self.dup_local_ingest}",
            f"  local mailboxes: expected {self.expected_local}, arrived {self.arrived_local}, "
            f"lost {len(self.lost_local)}, duplicated {len(self.dup_local_bug)}, "
            f"unexpected {len(self.unexpected_local)}",
            f"  smarthost captures cut short (not deliveries): {self.partial_captures}",
            f"  left at the ISP: {self.left_at_isp}",
            f"  LOST {self.lost}  DUPLICATED {self.duplicated}",
        ]
        return "\n".join(lines)


def mailbox_ids(spool_dir: Path) -> dict[str, list[str]]:
    """Message-IDs per local mailbox (quarantine included), one entry per stored copy."""
    out: dict[str, list[str]] = {}
    root = Path(spool_dir) / "mail"
    if not root.exists():
        return out
    for box in sorted(p for p in root.iterdir() if p.is_dir()):
        md = Maildir(box)
        ids = []
        for path in md.messages():
            data = path.read_bytes()
            ids.append(message_id(data) or f"<no-id:{path.name}>")
        out[box.name] = ids
    return out


def check(ledger: Ledger, sink_messages, spool_dir: Path, smtp_convs: list[Conversation] = (),
          imap_convs: list[Conversation] = (), left_at_isp: int = 0) -> Report:
    r = Report(drops=ledger.drops, kills=ledger.kills, kill_phases=Counter(ledger.kill_phases),
               left_at_isp=left_at_isp)
    window_ids: Counter = Counter()
    for conv in smtp_convs:
        cut = smtp_cut(conv)
        r.smtp_cuts[cut.phase] += 1
        if cut.phase == "window" and cut.message_id:
            window_ids[cut.message_id] += 1
    for conv in imap_convs:
        r.imap_cuts[imap_cut(conv)] += 1

    got: Counter = Counter()
    for m in sink_messages:
        mid = message_id(m.data)
        if mid is None or end_marker(mid) not in m.data:
            r.partial_captures += 1
            continue
        got[mid] += 1
    r.submitted_out = len(ledger.outbound)
    r.arrived_out = sum(1 for mid in ledger.outbound if got[mid])
    r.lost_out = [mid for mid in ledger.outbound if not got[mid]]
    for mid, n in got.items():
        if mid not in ledger.outbound:
            r.dup_out_bug.append(f"unexpected {mid}")
            continue
        extra = n - 1
        # Each cut in the window explains one extra copy; a resend after a lost 250 at
        # ingest, one more.
        w = min(extra, window_ids[mid])
        r.dup_out_window += w
        extra -= w
        if extra and mid in ledger.resent:
            r.dup_out_ingest += 1
            extra -= 1
        if extra:
            r.dup_out_bug.append(f"{mid} x{n}")

    boxes = mailbox_ids(spool_dir)
    for mailbox, want in ledger.local.items():
        have = Counter(boxes.get(mailbox, []))
        r.expected_local += len(want)
        r.arrived_local += sum(1 for mid in want if have[mid])
        r.lost_local += [f"{mailbox}:{mid}" for mid in want if not have[mid]]
        for mid, n in have.items():
            if mid not in want:
                r.unexpected_local.append(f"{mailbox}:{mid}")
            elif n == 2 and mid in ledger.resent:
                r.dup_local_ingest += 1
            elif n > 1:
                r.dup_local_bug.append(f"{mailbox}:{mid} x{n}")
    for mailbox, ids in boxes.items():
        if mailbox not in ledger.local and ids:
            r.unexpected_local += [f"{mailbox}:{mid}" for mid in ids]
    return r
