"""The messages the benchmarks move: plain-text bodies plus base64 attachments of random
bytes, so no compression (V.42bis, TLS, a server's own) can make anyone look better.

The link workload is fixed and documented (README "Benchmarks"): 20 outbound and 20
inbound messages of these sizes, about 590 kB each way.
"""
from __future__ import annotations

import base64
import random

# Bytes per message (approximate, headers included): 2 kB .. 120 kB, ~590 kB in all.
LINK_SIZES = (2_000, 3_000, 4_000, 5_000, 6_000, 8_000, 10_000, 12_000, 15_000, 18_000,
              20_000, 24_000, 28_000, 32_000, 40_000, 48_000, 56_000, 64_000, 80_000, 120_000)

_WORDS = ["the", "office", "line", "carries", "mail", "both", "ways", "while", "the", "meter", "runs", "so", "every", "second", "counts", "and", "nothing", "should", "wait", "on", "a", "round", "trip", "that", "could", "have", "been", "avoided"]


def message(size: int, *, sender: str, rcpt: str, subject: str, seed: int) -> bytes:
    """One MIME message of about ``size`` bytes (CRLF line ends)."""
    rnd = random.Random(seed)
    text_len = min(1500, max(200, size // 5))
    words, length = [], 0
    while length < text_len:
        w = rnd.choice(_WORDS)
        words.append(w)
        length += len(w) + 1
    lines, line = [], ""
    for w in words:
        if len(line) + len(w) > 70:
            lines.append(line)
            line = ""
        line += w + " "
    lines.append(line)
    text = "\r\n".join(lines)
    head = (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{seed}.{subject.replace(' ', '.')}@bench.test>\r\n"
            f"Date: Wed, 25 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: multipart/mixed; boundary=\"b{seed}\"\r\n\r\n")
    part1 = (f"--b{seed}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{text}\r\n")
    part2_head = (f"--b{seed}\r\nContent-Type: application/octet-stream\r\n"
                  f"Content-Transfer-Encoding: base64\r\n"
                  f"Content-Disposition: attachment; filename=\"data{seed}.bin\"\r\n\r\n")
    tail = f"--b{seed}--\r\n"
    room = size - len(head) - len(part1) - len(part2_head) - len(tail)
    raw_len = max(0, room * 57 // 78)  # 57 raw bytes make one 76-char line + CRLF
    b64 = base64.encodebytes(rnd.randbytes(raw_len)).replace(b"\n", b"\r\n")
    return (head + part1 + part2_head).encode() + b64 + tail.encode()


def mixed(count: int, seed: int, sizes=(2_000, 5_000, 10_000, 30_000, 100_000)) -> list[bytes]:
    """``count`` messages cycling through ``sizes`` (for the POP3 benchmark)."""
    return [message(sizes[i % len(sizes)], sender=f"s{i}@outside.test", rcpt="alice@office.test",
                    subject=f"pop {i}", seed=seed + i) for i in range(count)]
