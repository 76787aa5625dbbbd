"""Memory: the daemon's peak RSS while it accepts a 50 MB message by SMTP, fetches a
50 MB message from Dovecot over IMAP in a dial session, and serves both by POP3.

    .venv/bin/python bench/memory.py [--size-mb 50]

RSS of the daemon process (``python -m gateway run``) is sampled every 20 ms with
psutil.  Target: peak <= 2 x message size + 80 MB.  Messages: plain text plus a base64
attachment of random bytes (so the message is mostly 76-character lines).
"""
from __future__ import annotations

import argparse
import poplib
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from office import DialmailSite, submit, wait_until
from workload import message

from tests.peers import Dovecot, need

MB = 1024 * 1024


class Sampler:
    def __init__(self, pid: int, interval: float = 0.02):
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                rss = self.proc.memory_info().rss
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            self.samples += 1
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def maildir_count(site: DialmailSite) -> int:
    return sum(1 for sub in ("new", "cur") if (site.spool / "mail/alice" / sub).exists()
               for _ in (site.spool / "mail/alice" / sub).iterdir())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=50)
    args = ap.parse_args()
    need("dovecot", "doveadm")
    size = args.size_mb * 1000 * 1000
    outgoing = message(size, sender="bob@office.test", rcpt="alice@office.test", subject="big smtp", seed=1)
    incoming = message(size, sender="x@outside.test", rcpt="alice@office.test", subject="big imap", seed=2)
    rows = []
    with DialmailSite(max_message_size="200MB") as site, Dovecot(tls="none") as dovecot:
        dovecot.add_user("office", "isp-pw")
        dovecot.doveadm("save", "-u", "office", "-m", "INBOX", input=incoming)
        pw = site.dir / "isp.password"
        pw.write_text("isp-pw\n")
        pw.chmod(0o600)
        site.write_config(f"""
            [[fetch]]
            name = "isp"
            host = "127.0.0.1"
            port = {dovecot.imap_port}
            tls = "off"
            username = "office"
            password_file = "{pw}"
            deliver_to = "alice"
            keep = false
            """)
        site.add_user("alice", "alice-pw")
        site.start()
        base = psutil.Process(site.proc.pid).memory_info().rss
        with Sampler(site.proc.pid) as s:
            t = time.perf_counter()
            submit(site.smtp_port, [("bob@office.test", "alice@office.test", outgoing)])
            wait_until(lambda: maildir_count(site) >= 1, 120, "local delivery of the SMTP message", 0.05)
            rows.append((f"accept {args.size_mb} MB by SMTP + local delivery", s.peak, time.perf_counter() - t))
        with Sampler(site.proc.pid) as s:
            t = time.perf_counter()
            r = site.cli("connect-now", timeout=600)
            if r.returncode != 0:
                raise SystemExit(f"session failed: {r.stdout}{r.stderr}")
            wait_until(lambda: maildir_count(site) >= 2, 120, "local delivery of the fetched message", 0.05)
            rows.append((f"fetch {args.size_mb} MB over IMAP + local delivery", s.peak, time.perf_counter() - t))
        with Sampler(site.proc.pid) as s:
            t = time.perf_counter()
            p = poplib.POP3("127.0.0.1", site.pop3_port, timeout=120)
            p.user("alice")
            p.pass_("alice-pw")
            got = [p.retr(i)[2] for i in (1, 2)]
            p.quit()
            rows.append(("serve both by POP3 (RETR 1, RETR 2)", s.peak, time.perf_counter() - t))
        if min(got) < size:
            raise SystemExit(f"POP3 returned {got} octets, expected >= {size} each")
    limit = 2 * size + 80 * 1000 * 1000
    peak = max(r[1] for r in rows)
    print(f"\n4. Memory: daemon RSS, {args.size_mb} MB messages (sampled every 20 ms); "
          f"baseline after start {base / MB:.0f} MiB")
    print(f"{'phase':40} {'peak RSS':>10} {'seconds':>8}   (POP3 login: argon2id needs 64 MiB while it checks)")
    for name, rss, secs in rows:
        print(f"{name:40} {rss / MB:7.0f} MiB {secs:8.1f}")
    print(f"  peak {peak / MB:.0f} MiB ({peak / 1e6:.0f} MB); limit 2 x {args.size_mb} MB + 80 MB = "
          f"{limit / 1e6:.0f} MB: peak / limit = {peak / limit:.2f}   (target <= 1.0)")


if __name__ == "__main__":
    main()
