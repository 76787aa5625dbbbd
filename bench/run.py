"""``make bench``: the benchmarks, each against the tool users would pick instead,
measured side by side in this run (compare the ratios, not absolute times).

    .venv/bin/python bench/run.py [--quick] [--only link|smtp|smtpprof|pop3|memory|shaper|local|connmem ...]

1. bench/link_efficiency.py  line time over the simulated modem vs Postfix + fetchmail
2. bench/smtp_ingest.py      smtp-source into dialmail vs Postfix smtpd (durable queue)
2b. bench/ingest_profile.py  where dialmail's CPU goes per message during that ingest
3. bench/pop3_retrieval.py   poplib RETR from dialmail vs Dovecot
4. bench/memory.py           daemon peak RSS with 50 MB messages
5. bench/shaper_rate.py      the simulated line's pace against the wall clock (no peer)
6. bench/local_delivery.py   Maildir delivery against a 30 s SMTP burst: backlog, capacity
7. bench/connection_memory.py  memory per idle SMTP connection and per connection in DATA
                             vs Postfix's smtpd processes
8. bench/compress_ratio.py   IMAP bytes per byte of mail with COMPRESS=DEFLATE on and off

``--quick`` shrinks the workloads (for checking the scripts, not for results).
The link benchmark takes most of the time: ~10 minutes at 33.6 kbit/s.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SCRIPTS = {
    "link": ("link_efficiency.py", [], ["--scale", "0.1"]),
    "smtp": ("smtp_ingest.py", [], ["--messages", "300", "--rounds", "1"]),
    "smtpprof": ("ingest_profile.py", [], ["--messages", "300"]),
    "pop3": ("pop3_retrieval.py", [], ["--messages", "60", "--rounds", "2"]),
    "local": ("local_delivery.py", [], ["--seconds", "3", "--capacity", "100"]),
    "connmem": ("connection_memory.py", [], ["--connections", "10", "--data-kb", "64"]),
    "memory": ("memory.py", [], ["--size-mb", "10"]),
    "shaper": ("shaper_rate.py", [], ["--seconds", "2"]),
    "compress": ("compress_ratio.py", [], []),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=list(SCRIPTS), action="append")
    args = ap.parse_args()
    print(f"dialmail benchmarks, {time.strftime('%Y-%m-%d %H:%M %Z')}: {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, {platform.system()} {platform.release()}", flush=True)
    failed = []
    tables = []
    for name in args.only or list(SCRIPTS):
        script, normal, quick = SCRIPTS[name]
        started = time.monotonic()
        print(f"\n== {script} ...", flush=True)
        r = subprocess.run([sys.executable, str(HERE / script), *(quick if args.quick else normal)],
                           stdout=subprocess.PIPE, text=True, timeout=1800, check=False)
        print(r.stdout, end="", flush=True)
        print(f"   ({time.monotonic() - started:.0f} s)", flush=True)
        if r.returncode:
            failed.append(script)
        else:
            tables.append(r.stdout.strip())
    print("\n" + "=" * 100 + "\nSummary\n")
    print("\n\n".join(tables))
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
