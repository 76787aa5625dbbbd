"""SMTP ingest with durable queueing: Postfix's ``smtp-source`` sends N messages with
parallel sessions to dialmail's daemon and to Postfix's smtpd, in the same run.

    .venv/bin/python bench/smtp_ingest.py [--messages 2000] [--sessions 5] [--size 2048] [--rounds 3]

Both servers run side by side and each round measures both, in alternating order (so
neither always follows the other's burst of disk writes on a shared machine); the table
has each server's best round, and the per-round ratios give the median and the spread.

Both servers accept for a remote recipient and queue the message for a smarthost that
is not dialled (dialmail: link down; Postfix: ``defer_transports = smtp``); both have
the message on disk, fsynced, before they answer 250 to the final dot (dialmail: body
file + directory + SQLite WAL commit; Postfix: cleanup's queue file).  smtp-source opens
one connection per message (as office mail clients do), ``--sessions`` at a time.
"""
from __future__ import annotations

import argparse
import statistics
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
    """(user, system) CPU seconds a process and its children (the daemon's queue writer)
    have used so far, from /proc."""
    import psutil
    user = system = 0.0
    proc = psutil.Process(pid)
    for p in (proc, *proc.children(recursive=True)):
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        user, system = user + t.user, system + t.system
    return user, system


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
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    need("smtp-source", "postfix")
    if not IS_ROOT:
        raise SystemExit("Postfix needs root")
    n = args.messages
    best: dict[str, float] = {}
    ratios = []  # per round: dialmail's rate / Postfix's
    cpu = [0.0, 0.0]  # dialmail daemon (user, system) seconds over every measured round
    with DialmailSite() as site, OfficePostfix(free_port()) as pf:
        site.write_config('[link]\ntype = "modem"\ndevice = "/dev/null"\nnumbers = ["0"]\n')
        site.start()
        ports = {"dialmail": site.smtp_port, "postfix": pf.port}
        for port in ports.values():
            smtp_source(port, 20, 2, args.size)  # warm-up
        for r in range(args.rounds):
            this = {}
            for name in (("dialmail", "postfix") if r % 2 == 0 else ("postfix", "dialmail")):
                before = cpu_seconds(site.proc.pid)
                this[name] = smtp_source(ports[name], n, args.sessions, args.size)
                if name == "dialmail":
                    after = cpu_seconds(site.proc.pid)
                    cpu = [cpu[0] + after[0] - before[0], cpu[1] + after[1] - before[1]]
                best[name] = min(this[name], best.get(name, this[name]))
            ratios.append(this["postfix"] / this["dialmail"])
        wait_until(lambda: pf.queued() >= (n * args.rounds) + 20, 60, "Postfix to have every message queued", 0.1)
        site.stop()
        queued = dialmail_queued(site)
        if queued != n * args.rounds + 20:
            raise SystemExit(f"dialmail queued {queued} messages, expected {n * args.rounds + 20}")
    ours, theirs = n / best["dialmail"], n / best["postfix"]
    total = n * args.rounds
    print(f"\n2. SMTP ingest, durable queueing: smtp-source, {n} messages, {args.size} B bodies, "
          f"{args.sessions} sessions, one connection per message, best of {args.rounds} rounds")
    print(f"{'server':22} {'seconds':>8} {'msgs/s':>8}")
    print(f"{'dialmail':22} {best['dialmail']:8.2f} {ours:8.0f}")
    print(f"{'Postfix smtpd+cleanup':22} {best['postfix']:8.2f} {theirs:8.0f}")
    print(f"  dialmail / Postfix: best rounds {ours / theirs:.2f} x; per round median {statistics.median(ratios):.2f} x, "
          f"spread {min(ratios):.2f}-{max(ratios):.2f} x over {len(ratios)} rounds   (target >= 1.0 x)")
    print(f"  dialmail daemon CPU per message: {1000 * (cpu[0] + cpu[1]) / total:.2f} ms "
          f"(user {1000 * cpu[0] / total:.2f}, system {1000 * cpu[1] / total:.2f}; the daemon and its queue writer)")


if __name__ == "__main__":
    main()
