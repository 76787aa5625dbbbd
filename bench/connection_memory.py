"""Memory per SMTP connection: dialmail's daemon next to Postfix's smtpd processes, with
N connections idle after EHLO, then N connections each in the middle of DATA.

    .venv/bin/python bench/connection_memory.py [--connections 50] [--data-kb 256]

dialmail is one process: its RSS growth over N connections, divided by N.  Postfix runs
one smtpd process per connection: the RSS of each smtpd (shared libraries counted in
every one, as ``ps`` shows them) and its USS (the memory only that process holds, what
one more connection costs).  In DATA each client has sent ``--data-kb`` of its message
and waits; peaks are sampled every 20 ms while the connections are held.
"""
from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from memory import Sampler
from office import DialmailSite, OfficePostfix, wait_until

from tests.peers import IS_ROOT, free_port, need

KB = 1024
MiB = 1024 * 1024


def _reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") or data.splitlines()[-1][3:4] == b"-":
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def open_clients(port: int, n: int, data_kb: int | None) -> list[socket.socket]:
    """``n`` connections after EHLO; with ``data_kb``, each also halfway through DATA."""
    socks = []
    line = b"X" * 76 + b"\r\n"
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        _reply(s)
        s.sendall(b"EHLO client.office.test\r\n")
        _reply(s)
        if data_kb is not None:
            for cmd in (b"MAIL FROM:<alice@office.test>\r\n", b"RCPT TO:<partner@elsewhere.test>\r\n",
                        b"DATA\r\n"):
                s.sendall(cmd)
                if not _reply(s)[:1] in (b"2", b"3"):
                    raise SystemExit(f"connection {i}: {cmd!r} refused")
            s.sendall(b"Subject: held open\r\n\r\n" + line * (data_kb * KB // len(line)))
        socks.append(s)
    return socks


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def settle() -> None:
    time.sleep(1.0)  # let the servers read what was sent before the sample is taken


def dialmail_per_connection(site: DialmailSite, n: int, data_kb: int | None) -> float:
    proc = psutil.Process(site.proc.pid)
    before = proc.memory_info().rss
    with Sampler(site.proc.pid) as s:
        socks = open_clients(site.smtp_port, n, data_kb)
        settle()
        close_all(socks)
    return (s.peak - before) / n


def smtpd_processes(pf: OfficePostfix) -> list[psutil.Process]:
    return [c for c in psutil.Process(pf.proc.pid).children() if c.name() == "smtpd"]


def postfix_per_connection(pf: OfficePostfix, n: int, data_kb: int | None) -> tuple[float, float]:
    socks = open_clients(pf.port, n, data_kb)
    try:
        settle()
        procs = wait_until(lambda: (lambda found: found if len(found) >= n else None)(smtpd_processes(pf)),
                           30, f"{n} smtpd processes", 0.1)
        rss, uss = [], []
        for p in procs:
            try:
                full = p.memory_full_info()
            except psutil.Error:
                continue
            rss.append(full.rss)
            uss.append(full.uss)
        return sum(rss) / len(rss), sum(uss) / len(uss)
    finally:
        close_all(socks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--data-kb", type=int, default=256)
    args = ap.parse_args()
    need("postfix")
    if not IS_ROOT:
        raise SystemExit("Postfix needs root")
    n = args.connections
    with DialmailSite() as site:
        site.write_config('[link]\ntype = "modem"\ndevice = "/dev/null"\nnumbers = ["0"]\n')
        site.start()
        ours_idle = dialmail_per_connection(site, n, None)
        ours_data = dialmail_per_connection(site, n, args.data_kb)
    with OfficePostfix(free_port()) as pf:
        pf_idle = postfix_per_connection(pf, n, None)
        time.sleep(1)
        pf_data = postfix_per_connection(pf, n, args.data_kb)
    print(f"\n7. Memory per SMTP connection: {n} connections held idle after EHLO, then {n} each "
          f"{args.data_kb} kB into DATA")
    print(f"{'':34} {'idle':>10} {'in DATA':>10}")
    print(f"{'dialmail, RSS growth / connection':34} {ours_idle / KB:8.0f} kB {ours_data / KB:8.0f} kB")
    print(f"{'Postfix smtpd, RSS per process':34} {pf_idle[0] / KB:8.0f} kB {pf_data[0] / KB:8.0f} kB")
    print(f"{'Postfix smtpd, USS per process':34} {pf_idle[1] / KB:8.0f} kB {pf_data[1] / KB:8.0f} kB")
    print(f"  dialmail / Postfix USS: idle {ours_idle / pf_idle[1]:.2f} x, in DATA {ours_data / pf_data[1]:.2f} x")


if __name__ == "__main__":
    main()
