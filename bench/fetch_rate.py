"""Fetch throughput: N small messages from Dovecot IMAP on loopback, dialmail against fetchmail
on the same mailbox in the same run.

    .venv/bin/python bench/fetch_rate.py [--messages 1000]

dialmail's figure is what a session does per message: UID FETCH in batches, the body
written to a spool file and fsynced, the directory fsynced, the envelope plus the UID
committed in one fsynced SQLite transaction.  fetchmail (``fetchall keep``) is measured two
ways: piping each message to ``cat >/dev/null`` (no durability at all: its ceiling), and
forwarding by SMTP to smtp-sink (its normal mode).
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway import config as config_mod
from gateway.fetch.imap import fetch_all  # noqa: E402
from gateway.office.directory import Directory  # noqa: E402
from spool.queue import Catalogue, Queue  # noqa: E402
from spool.users import Users  # noqa: E402
from tests.peers import Dovecot, SmtpSink, have, run_fetchmail  # noqa: E402

PASSWORD = "bench-pw"


def messages(count: int) -> list[bytes]:
    rnd = random.Random(count)
    out = []
    for i in range(count):
        body = ("x" * 70 + "\r\n") * rnd.choice([5, 20, 40, 80])
        out.append((f"Return-Path: <s{i}@outside.test>\r\nFrom: s{i}@outside.test\r\nTo: office@isp.test\r\n"
                    f"Subject: bench {i}\r\nMessage-ID: <bench{i}@outside.test>\r\n\r\n{body}").encode())
    return out


def dialmail(port: int, tmp: Path) -> tuple[float, int]:
    pw = tmp / "pw"
    pw.write_text(PASSWORD)
    pw.chmod(0o600)
    cfg = config_mod.loads(f"""
[server]
hostname = "mail.office.test"
domains = ["office.test"]
spool_dir = "{tmp / 'spool'}"
[[fetch]]
name = "bench"
host = "127.0.0.1"
port = {port}
tls = "off"
username = "office"
password_file = "{pw}"
deliver_to = "postmaster"
keep = true
""")
    cat = Catalogue(cfg.spool_dir)
    start = time.perf_counter()
    result = asyncio.run(fetch_all(cfg, Queue(cat), cat, Directory(cfg, Users(cfg.spool_dir))))
    elapsed = time.perf_counter() - start
    cat.close()
    if result.errors:
        raise SystemExit(f"dialmail fetch failed: {result.errors}")
    return elapsed, result.fetched


def fetchmail(port: int, tmp: Path, deliver: str) -> float:
    rc = (f"set no syslog\npoll 127.0.0.1 with proto IMAP port {port}\n"
          f'  user "office" there with password "{PASSWORD}" is "postmaster@office.test" here\n'
          f"  options keep fetchall no sslcertck sslproto '' {deliver}\n")
    start = time.perf_counter()
    proc = run_fetchmail(rc, tmp, timeout=600, verbose=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"fetchmail failed ({proc.returncode}): {proc.stderr[-1000:]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--no-smtp", action="store_true", help="skip fetchmail -> smtp-sink (slow: ~45 ms/message)")
    args = ap.parse_args()
    need_programs = ("dovecot", "doveadm", "fetchmail")
    if not have(*need_programs):
        raise SystemExit(f"needs {', '.join(need_programs)}")
    msgs = messages(args.messages)
    total = sum(map(len, msgs))
    with Dovecot(tls="none") as dovecot, tempfile.TemporaryDirectory() as tmp:
        dovecot.add_user("office", PASSWORD)
        dovecot.save_many("office", msgs)
        ours, n = dialmail(dovecot.imap_port, Path(tmp))
        print(f"{args.messages} messages, {total} bytes, Dovecot IMAP on 127.0.0.1")
        print(f"  dialmail fetch (spooled, fsynced, UID committed per message): {ours:6.2f} s  "
              f"{n / ours:7.0f} msg/s")
        cat = fetchmail(dovecot.imap_port, Path(tmp) / "fm-mda", "mda 'cat >/dev/null'")
        print(f"  fetchmail fetchall keep, mda 'cat >/dev/null':                {cat:6.2f} s  "
              f"{args.messages / cat:7.0f} msg/s   fetchmail/dialmail {cat / ours:.2f}")
        if not args.no_smtp and have("smtp-sink"):
            with SmtpSink() as sink:
                smtp = fetchmail(dovecot.imap_port, Path(tmp) / "fm-smtp",
                                 f"smtphost 127.0.0.1/{sink.port} smtpname postmaster@office.test")
            print(f"  fetchmail fetchall keep, SMTP to smtp-sink:                   {smtp:6.2f} s  "
                  f"{args.messages / smtp:7.0f} msg/s   fetchmail/dialmail {smtp / ours:.2f}")


if __name__ == "__main__":
    main()
