"""SMTP ingest with durable queueing: Postfix's ``smtp-source`` sends N messages with
parallel sessions to dialmail's daemon and to Postfix's smtpd, in the same run.

    .venv/bin/python bench/smtp_ingest.py [--messages 2000] [--sessions 5] [--size 2048]

Both servers accept for a remote recipient and queue the message for a smarthost that
is not dialled (dialmail: link down; Postfix: ``defer_transports = smtp``); both have
the message on disk, fsynced, before they answer 250 to the final dot (dialmail: body
file + directory + SQLite WAL commit; Postfix: cleanup's queue file).  smtp-source opens
one connection per message (as office mail clients do), ``--sessions`` at a time.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from office import DialmailSite, OfficePostfix, wait_until

from tests.peers import IS_ROOT, free_port, need


def smtp_source(port: int, messages: int, sessions: int, size: int) -> float:
    start = time.perf_counter()
    subprocess.run(["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size),
                    "-f", "alice@office.test", "-t", "partner@elsewhere.test", f"127.0.0.1:{port}"],
                   check=True, capture_output=True, timeout=900)
    return time.perf_counter() - start


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def dialmail_queued(site: DialmailSite) -> int:
    from spool.queue import Catalogue
    cat = Catalogue(site.spool)
    try:
        return cat.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    finally:
        cat.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=5)
    ap.add_argument("--size", type=int, default=2048, help="body bytes per message")
    args = ap.parse_args()
    need("smtp-source", "postfix")
    if not IS_ROOT:
        raise SystemExit("Postfix needs root")
    n = args.messages
    results = {}
    with DialmailSite() as site:
        site.write_config('[link]\ntype = "modem"\ndevice = "/dev/null"\nnumbers = ["0"]\n')
        site.start()
        smtp_source(site.smtp_port, 20, 2, args.size)  # warm-up
        user0, sys0 = cpu_seconds(site.proc.pid)
        results["dialmail"] = smtp_source(site.smtp_port, n, args.sessions, args.size)
        user1, sys1 = cpu_seconds(site.proc.pid)
        site.stop()
        queued = dialmail_queued(site)
        if queued != n + 20:
            raise SystemExit(f"dialmail queued {queued} messages, expected {n + 20}")
    with OfficePostfix(free_port()) as pf:
        smtp_source(pf.port, 20, 2, args.size)
        results["postfix"] = smtp_source(pf.port, n, args.sessions, args.size)
        wait_until(lambda: pf.queued() >= n + 20, 60, "Postfix to have every message queued", 0.1)
    ours, theirs = n / results["dialmail"], n / results["postfix"]
    print(f"\n2. SMTP ingest, durable queueing: smtp-source, {n} messages, {args.size} B bodies, "
          f"{args.sessions} sessions, one connection per message")
    print(f"{'server':22} {'seconds':>8} {'msgs/s':>8}")
    print(f"{'dialmail':22} {results['dialmail']:8.2f} {ours:8.0f}")
    print(f"{'Postfix smtpd+cleanup':22} {results['postfix']:8.2f} {theirs:8.0f}")
    print(f"  dialmail / Postfix: {ours / theirs:.2f} x   (target >= 1.0 x)")
    print(f"  dialmail daemon CPU per message: {1000 * (user1 - user0 + sys1 - sys0) / n:.2f} ms "
          f"(user {1000 * (user1 - user0) / n:.2f}, system {1000 * (sys1 - sys0) / n:.2f}; one process, one core)")


if __name__ == "__main__":
    main()
