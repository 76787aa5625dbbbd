"""A 20 MB attachment through the whole pipeline (SMTP, clamd scan, groups, forward, Maildir, POP3)
with the daemon's memory bounded; and the round-robin turn under concurrent deliveries."""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import time

import psutil
import pytest

from spool.policystate import PolicyState
from spool.queue import Catalogue
from tests.harness import RssSampler
from tests.test_policy_kit import BigClamd, message, pop3, send, settled, submit

ATTACHMENT = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def big_clamd():
    from tests.peers import need
    need("clamd")
    with BigClamd() as server:
        yield server


@pytest.mark.peer
@pytest.mark.timeout(240)
def test_20mb_attachment_passes_the_whole_pipeline_with_bounded_memory(site, big_clamd):
    site.write_config(f"""
[virus]
clamd = "unix:{big_clamd.socket_path}"
max_scan_size = "40MB"

[groups.everyone]
members = ["alice", "bob"]

[blocklist]
senders = ["spam.test"]
""")
    site.start()
    send(site, "warmup@outside.test", "alice@office.test", "warm-up")  # load every module first
    settled(site)
    blob = os.urandom(ATTACHMENT)
    data = message("big@outside.test", "everyone@office.test", "twenty megabytes",
                   attachment=("blob.bin", blob))
    daemon = psutil.Process(site.proc.pid)
    base = daemon.memory_info().rss
    started = time.monotonic()
    with RssSampler(site.proc.pid, interval=0.02) as smtp:
        d = submit(site, "big@outside.test", "everyone@office.test", data)
    assert d.accepted, d
    smtp_peak = smtp.peak
    after_smtp = daemon.memory_info().rss
    with RssSampler(site.proc.pid, interval=0.02) as rest:  # delivery (group -> two Maildirs) and POP3 retrieval
        settled(site, timeout=120)
        delivery_peak = rest.peak
        got = {u: [m for m in pop3(site, u) if m["Subject"] == "twenty megabytes"] for u in ("alice", "bob")}
    rest_peak = rest.peak
    elapsed = time.monotonic() - started
    mb = 1 << 20
    print(f"\n20 MB attachment ({len(data) / mb:.1f} MiB message): daemon RSS {base / mb:.0f} MiB; "
          f"SMTP+scan peak +{(smtp_peak - base) / mb:.0f} MiB ({(smtp_peak - base) / len(data):.2f}x); "
          f"delivery+POP3 peak +{(rest_peak - after_smtp) / mb:.0f} MiB over the {after_smtp / mb:.0f} MiB left "
          f"after SMTP (delivery alone +{(delivery_peak - after_smtp) / mb:.0f} MiB); {elapsed:.1f}s SMTP->POP3")
    for user, msgs in got.items():
        assert len(msgs) == 1, user
        part = [p for p in msgs[0].walk() if p.get_filename() == "blob.bin"][0]
        assert hashlib.sha256(part.get_payload(decode=True)).digest() == hashlib.sha256(blob).digest(), user
    assert "not scanned" not in site.log()  # clamd read all of it
    # The policy stages stream: scanning, expanding and delivering into two Maildirs add next to nothing.
    assert delivery_peak - after_smtp < len(data) // 4
    # SMTP collects one transaction's DATA in one buffer (gateway.smtp.server) and the scan streams a
    # memoryview of it to clamd without copying: about the message's size, once.
    assert smtp_peak - base < 2 * len(data)
    # The whole daemon stays bounded, POP3 retrieval of both copies included.
    assert max(smtp_peak, rest_peak) - base < 4 * len(data)


def _picker(spool: str, n: int, out) -> None:
    state = PolicyState(Catalogue(spool))
    out.put([state.pick("support", ("a", "b", "c"), f"q{os.getpid()}-{i}", "support@office.test")
             for i in range(n)])


def test_round_robin_turns_are_atomic_across_concurrent_processes(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_picker, args=(str(tmp_path), 60, out)) for _ in range(4)]
    for p in procs:
        p.start()
    picks = [m for _ in procs for m in out.get(timeout=60)]
    for p in procs:
        p.join(30)
    counts = {m: picks.count(m) for m in "abc"}
    assert counts == {"a": 80, "b": 80, "c": 80}, counts
    # A repeated delivery of the same (message, recipient) keeps its member and takes no turn.
    state = PolicyState(Catalogue(tmp_path))
    first = state.pick("support", ("a", "b", "c"), "again", "support@office.test")
    assert all(state.pick("support", ("a", "b", "c"), "again", "support@office.test") == first for _ in range(5))
    assert state.pick("support", ("a", "b", "c"), "next", "support@office.test") != first
