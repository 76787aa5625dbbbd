"""Stage 1, size limits: the largest message delivered here.

LAN submissions over the limit are refused at SMTP time (SIZE= and DATA, in
gateway.smtp.server); this stage covers everything else, above all mail fetched from the ISP,
which is quarantined rather than lost.
"""
from __future__ import annotations

from gateway.policy.verdict import ACCEPT, Verdict, reject


def check(size: int, limit: int) -> Verdict:
    if size > limit:
        return reject(552, "5.3.4", f"message size {size} exceeds the local limit of {limit} bytes")
    return ACCEPT
