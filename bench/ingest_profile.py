"""What limits SMTP ingest: where dialmail's daemon spends its CPU per message.

    .venv/bin/python bench/ingest_profile.py [--messages 2000] [--sessions 5]

The same load as smtp_ingest.py (smtp-source, one connection per message, fsync before
250), three times: once plain for the rate and the CPU of the daemon's event loop, its
other threads and its queue writer process (from /proc), once under ``strace -c`` for
the system calls per message, once under ``perf record`` for the share of kernel,
interpreter and SQLite.  strace and perf are
Debian's ``strace`` and ``linux-perf``; a part whose tool is missing is skipped with a
line saying so.  The last line is the arithmetic: at this CPU per message, how many
messages a second all of the machine's cores could take at most.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from office import DialmailSite
from smtp_ingest import smtp_source

from tests.peers import need

TICK = os.sysconf("SC_CLK_TCK")

# perf symbols by what they are doing, first match wins
KINDS = [
    ("file system, fsync (ext4, block layer, page cache)",
     re.compile(r"ext4|jbd2|fsync|blk_|bio|folio|filemap|find_get_block|__brelse|recently_deleted|buffer|inode|"
                r"dentry|iowrite|virtqueue|vring|submit|writeback|_find_next_zero_bit|xas_")),
    ("scheduler and futex (threads waking, the interpreter lock)",
     re.compile(r"finish_task_switch|schedule|futex|_raw_spin_unlock_irqrestore|try_to_wake|enqueue_task|"
                r"dequeue|pick_next|update_curr|switch_")),
    ("network (loopback TCP)", re.compile(r"tcp|sock|skb|ip_|net_|__dev_queue|loopback|inet|epoll|softirq")),
]


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds so far of each thread of ``pid``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def process_cpu(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def writer_pid(site: DialmailSite) -> int | None:
    """The daemon's queue writer process (started by the warm-up's first message)."""
    import psutil
    for child in psutil.Process(site.proc.pid).children():
        if "spool.writer" in child.cmdline():
            return child.pid
    return None


def plain_round(site: DialmailSite, n: int, sessions: int) -> float:
    pid, writer = site.proc.pid, writer_pid(site)
    t0, (u0, s0) = thread_cpu(pid), process_cpu(pid)
    w0 = process_cpu(writer) if writer else (0.0, 0.0)
    elapsed = smtp_source(site.smtp_port, n, sessions, 2048)
    t1, (u1, s1) = thread_cpu(pid), process_cpu(pid)
    w1 = process_cpu(writer) if writer else (0.0, 0.0)
    main = t1.get(pid, 0) - t0.get(pid, 0)
    others = sum((t1[t] - t0.get(t, 0)) for t in t1 if t != pid)
    wu, ws = w1[0] - w0[0], w1[1] - w0[1]
    per = 1000 / n
    print(f"  rate {n / elapsed:.0f} msgs/s")
    print(f"  daemon: {per * (u1 - u0 + s1 - s0):.2f} ms CPU per message (user {per * (u1 - u0):.2f}, "
          f"system {per * (s1 - s0):.2f}); its event loop thread (SMTP protocol, policy) {per * main:.2f} ms, "
          f"busy {100 * main / elapsed:.0f} % of the time; its other threads {per * others:.2f} ms")
    print(f"  queue writer process: {per * (wu + ws):.2f} ms CPU per message (user {per * wu:.2f}, "
          f"system {per * ws:.2f}), busy {100 * (wu + ws) / elapsed:.0f} % of the time")
    cores = os.cpu_count() or 1
    cpu = (u1 - u0 + s1 - s0 + wu + ws) / n
    print(f"  ceiling: {cores} cores / {1000 * cpu:.2f} ms per message = {cores / cpu:.0f} msgs/s at most, "
          f"with every core doing nothing but dialmail's work")
    return n / elapsed


def strace_round(site: DialmailSite, n: int, sessions: int) -> None:
    if not shutil.which("strace"):
        print("  system calls: skipped (strace is not installed: apt-get install strace)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "strace.txt"
        pids = [str(p) for p in (site.proc.pid, writer_pid(site)) if p]
        tracer = subprocess.Popen(["strace", "-c", "-f", *[a for p in pids for a in ("-p", p)], "-o", str(out)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)  # strace attaches to every thread
        smtp_source(site.smtp_port, n, sessions, 2048)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(60)
        calls = {}
        for line in out.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                calls[parts[-1]] = int(parts[3])
    top = sorted(calls.items(), key=lambda kv: -kv[1])[:12]
    print(f"  system calls per message, daemon and writer (under strace, {sum(calls.values()) / n:.0f} in all): "
          + ", ".join(f"{name} {count / n:.1f}" for name, count in top))


def perf_round(site: DialmailSite, n: int, sessions: int) -> None:
    if not shutil.which("perf"):
        print("  perf: skipped (linux-perf is not installed)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        pids = ",".join(str(p) for p in (site.proc.pid, writer_pid(site)) if p)
        rec = subprocess.Popen(["perf", "record", "-F", "999", "-p", pids, "-o", str(data)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1)
        smtp_source(site.smtp_port, n, sessions, 2048)
        rec.send_signal(signal.SIGINT)
        _, err = rec.communicate(timeout=60)
        report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,sym",
                                 "-g", "none", "--stdio"], capture_output=True, text=True, timeout=300)
    if report.returncode or not report.stdout.strip():
        print(f"  perf: no profile ({(err or report.stderr).strip().splitlines()[-1:] or 'no samples'})")
        return
    shares: collections.Counter = collections.Counter()
    for line in report.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(\S+)", line)
        if not m:
            continue
        pct, dso, where, sym = float(m[1]), m[2], m[3], m[4]
        if where == "k":
            kind = next((k for k, pattern in KINDS if pattern.search(sym)), "kernel, other")
        elif "python" in dso:
            kind = "Python interpreter (aiosmtpd, asyncio, dialmail)"
        elif "sqlite" in dso:
            kind = "SQLite (the catalogue)"
        else:
            kind = f"other user space ({dso})" if dso.startswith("lib") else "other user space"
        shares[kind] += pct
    print("  where the CPU goes (perf, the daemon and its writer, all threads):")
    for kind, pct in shares.most_common(8):
        print(f"    {pct:5.1f} %  {kind}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=5)
    args = ap.parse_args()
    need("smtp-source")
    print(f"\n2b. What limits SMTP ingest: smtp-source, {args.messages} messages, 2048 B bodies, "
          f"{args.sessions} sessions, dialmail's daemon profiled")
    with DialmailSite() as site:
        site.write_config('[link]\ntype = "modem"\ndevice = "/dev/null"\nnumbers = ["0"]\n')
        site.start()
        smtp_source(site.smtp_port, 20, 2, 2048)  # warm-up
        plain_round(site, args.messages, args.sessions)
        strace_round(site, args.messages, args.sessions)
        perf_round(site, args.messages, args.sessions)
        site.stop()


if __name__ == "__main__":
    main()
