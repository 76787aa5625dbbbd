"""Relay throughput: 500 small messages over ONE reused SMTP connection to smtp-sink on
loopback, measured against Postfix's own ``smtp-source`` doing the same in the same run.

    .venv/bin/python bench/relay_rate.py [--messages 500] [--size 300]

dialmail's figure includes everything a real flush does per message: the claim, reading
the body from the spool (worker thread), MAIL/RCPT/DATA without pipelining, storing the
recipient's outcome and removing the message (fsynced SQLite transaction).  smtp-source
sends from memory and pipelines, so it is the ceiling of the line, not a like-for-like
mail server.
"""
from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway import config as config_mod
from gateway.relay.flush import flush
from spool.queue import RELAY, Catalogue, Queue
from tests.peers import SmtpSink, need


def dialmail_rate(port: int, count: int, size: int, tmp: Path) -> tuple[float, int]:
    cfg = config_mod.loads(f"""
[server]
hostname = "mail.office.test"
domains = ["office.test"]
spool_dir = "{tmp / 'spool'}"
[smarthost]
host = "127.0.0.1"
port = {port}
starttls = "off"
""")
    queue = Queue(Catalogue(cfg.spool_dir))
    body = ("x" * 70 + "\r\n") * max(1, size // 72)
    for i in range(count):
        queue.enqueue("alice@office.test", [("friend@example.com", RELAY)],
                      f"From: alice@office.test\r\nTo: friend@example.com\r\nSubject: bench {i}\r\n\r\n{body}".encode(),
                      origin="smtp")
    start = time.perf_counter()
    result = asyncio.run(flush(cfg, queue))
    elapsed = time.perf_counter() - start
    if result.messages != count or result.error is not None:
        raise SystemExit(f"flush sent {result.messages}/{count} ({result.error})")
    queue.cat.close()
    return elapsed, result.bytes


def smtp_source_rate(port: int, count: int, size: int) -> float:
    start = time.perf_counter()
    subprocess.run(["smtp-source", "-s", "1", "-d", "-m", str(count), "-l", str(size), "-f", "alice@office.test",
                    "-t", "friend@example.com", f"127.0.0.1:{port}"], check=True, capture_output=True, timeout=300)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=500)
    ap.add_argument("--size", type=int, default=300, help="body bytes per message")
    args = ap.parse_args()
    need("smtp-sink", "smtp-source")
    with tempfile.TemporaryDirectory() as d, SmtpSink() as sink:
        ours, nbytes = dialmail_rate(sink.port, args.messages, args.size, Path(d))
        theirs = smtp_source_rate(sink.port, args.messages, args.size)
    n = args.messages
    print(f"dialmail relay : {n} messages ({nbytes} bytes) over one connection in {ours:.3f} s "
          f"= {n / ours:.0f} msgs/s")
    print(f"smtp-source    : {n} messages over one connection (-s 1 -d) in {theirs:.3f} s = {n / theirs:.0f} msgs/s")
    print(f"ratio          : dialmail at {theirs / ours * 100:.0f}% of smtp-source's rate")


if __name__ == "__main__":
    main()
