"""Local delivery against ingest: a burst of small local messages by SMTP at full speed,
and how far the Maildir delivery falls behind while it lasts.

    .venv/bin/python bench/local_delivery.py [--seconds 30] [--clients 4] [--size 2048]

``--clients`` smtp-source processes (two sessions each, one connection per message, as
office mail clients do) send to one local user each, back to back, for ``--seconds``.
Every 0.2 s the bench reads the spool's catalogue: how many recipients wait for a
mailbox and how old the oldest of them is.  It prints the ingest and delivery rates
over the burst, the largest backlog (count, and count / delivery rate in seconds), the
oldest undelivered message's largest age, and how long the backlog took to drain after
the burst.  Then the daemon's delivery capacity on its own: ``--capacity`` messages are
put straight into the stopped daemon's queue, and the bench times how long the restarted
daemon takes to have them all in the Maildirs.  No peer: the targets are delivery
capacity >= ingest rate, and a backlog under 1 s during the burst.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from office import DialmailSite, wait_until

from tests.peers import need

BATCH = 100  # messages per smtp-source run; the burst is as many runs as fit in --seconds


@dataclass
class Sample:
    at: float  # seconds since the burst started
    waiting: int  # local recipients not yet in a mailbox
    oldest_age: float  # seconds the oldest of them has waited (0 when none)
    delivered: int  # files in the users' Maildirs


def sender(port: int, user: str, size: int, until: float, sent: list[int]) -> None:
    while time.monotonic() < until:
        subprocess.run(["smtp-source", "-s", "2", "-m", str(BATCH), "-l", str(size), "-f", "s@outside.test",
                        "-t", f"{user}@office.test", f"127.0.0.1:{port}"],
                       check=True, capture_output=True, timeout=300)
        sent.append(BATCH)


def delivered(site: DialmailSite, users: list[str]) -> int:
    return sum(len(os.listdir(site.spool / "mail" / u / "new")) for u in users
               if (site.spool / "mail" / u / "new").is_dir())


def sampler(site: DialmailSite, users: list[str], start: float, stop: threading.Event,
            out: list[Sample]) -> None:
    from spool.queue import Catalogue
    cat = Catalogue(site.spool, check=False)
    try:
        while not stop.is_set():
            row = cat.execute("SELECT COUNT(*), MIN(m.arrival) FROM recipients r JOIN messages m ON m.id=r.msg_id "
                              "WHERE r.route='local' AND r.status IN ('queued','deferred')").fetchone()
            now = time.time()
            out.append(Sample(time.monotonic() - start, row[0], now - row[1] if row[1] else 0.0,
                              delivered(site, users)))
            stop.wait(0.2)
    finally:
        cat.close()


def delivery_capacity(site: DialmailSite, users: list[str], n: int, size: int) -> tuple[float, int]:
    """Queue ``n`` local messages into the stopped daemon's spool; msgs/s it delivers them at."""
    from spool.queue import LOCAL, Catalogue, Queue
    body = (b"From: s@outside.test\r\nSubject: capacity\r\n\r\n"
            + b"".join(b"%069d\r\n" % i for i in range(max(1, size // 71))))
    queue = Queue(Catalogue(site.spool))
    try:
        for i in range(n):
            queue.enqueue("s@outside.test", [(f"{users[i % len(users)]}@office.test", LOCAL)], body,
                          origin="smtp", client="127.0.0.1")
    finally:
        queue.cat.close()
    before = delivered(site, users)
    site.start()
    # Timed from the first message in a Maildir: the daemon's start-up is not delivery.
    first = wait_until(lambda: delivered(site, users) - before, 120, "the first queued message", 0.005)
    start = time.monotonic()
    wait_until(lambda: delivered(site, users) - before >= n, 600, "the queued messages to be delivered", 0.02)
    return (n - first) / (time.monotonic() - start), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--size", type=int, default=2048, help="body bytes per message")
    ap.add_argument("--trace", action="store_true", help="print every sample")
    ap.add_argument("--capacity", type=int, default=1000, help="messages queued for the capacity run")
    args = ap.parse_args()
    need("smtp-source")
    users = [f"user{i}" for i in range(args.clients)]
    with DialmailSite() as site:
        for u in users:
            site.add_user(u, f"{u}-bench-pw")
        site.start()
        subprocess.run(["smtp-source", "-s", "2", "-m", "20", "-l", str(args.size), "-f", "s@outside.test",
                        "-t", f"{users[0]}@office.test", f"127.0.0.1:{site.smtp_port}"],
                       check=True, capture_output=True, timeout=60)  # warm-up
        wait_until(lambda: delivered(site, users) >= 20, 60, "the warm-up to be delivered", 0.05)
        before = delivered(site, users)
        samples: list[Sample] = []
        sent: list[int] = []
        stop = threading.Event()
        start = time.monotonic()
        watch = threading.Thread(target=sampler, args=(site, users, start, stop, samples))
        watch.start()
        clients = [threading.Thread(target=sender, args=(site.smtp_port, u, args.size, start + args.seconds, sent))
                   for u in users]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        burst = time.monotonic() - start
        at_end = delivered(site, users) - before
        total = sum(sent)
        try:
            wait_until(lambda: delivered(site, users) - before >= total, 600, "the backlog to drain", 0.05)
        finally:
            stop.set()
            watch.join()
        drained = time.monotonic() - start - burst
        site.stop()
        capacity, queued = delivery_capacity(site, users, args.capacity, args.size)
    ingest = total / burst
    delivery = at_end / burst
    during = [s for s in samples if s.at <= burst] or samples
    worst = max(during, key=lambda s: s.waiting)
    ages = sorted(s.oldest_age for s in during)
    oldest = ages[-1]
    p50, p95 = ages[len(ages) // 2], ages[min(len(ages) - 1, int(len(ages) * 0.95))]
    print(f"\n6. Local delivery under a {burst:.0f} s SMTP burst: {args.clients} smtp-source clients x 2 sessions, "
          f"{args.size} B bodies, one local recipient each")
    print(f"  ingest    {total:6d} messages  {ingest:7.0f} msgs/s")
    print(f"  delivery  {at_end:6d} in Maildirs by the burst's end  {delivery:7.0f} msgs/s   "
          f"delivery / ingest: {delivery / ingest:.2f} x   (target >= 1.0 x)")
    print(f"  backlog   max {worst.waiting} waiting (at {worst.at:.1f} s) = {worst.waiting / max(delivery, 1e-9):.2f} s "
          f"of delivery; oldest undelivered waited {oldest:.2f} s at most   (target < 1 s)")
    print(f"  oldest undelivered, sampled every 0.2 s: median {p50:.2f} s, 95th percentile {p95:.2f} s, "
          f"max {oldest:.2f} s")
    print(f"  drained   {drained:.2f} s after the burst ended")
    if args.trace:
        print("  t (s)  waiting  oldest (s)  delivered")
        for s in during:
            print(f"  {s.at:5.1f}  {s.waiting:7d}  {s.oldest_age:10.2f}  {s.delivered:9d}")
    print(f"  capacity  {queued} queued messages delivered at {capacity:.0f} msgs/s (timed from the first), "
          f"{capacity / ingest:.2f} x the burst's ingest rate   (target >= 1.0 x)")


if __name__ == "__main__":
    main()
