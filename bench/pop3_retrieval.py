"""POP3 retrieval: one poplib client RETRs N mixed-size messages from dialmail's POP3
server and from Dovecot's, the same messages in both maildrops, in the same run.

    .venv/bin/python bench/pop3_retrieval.py [--messages 300] [--rounds 3]

dialmail gets the messages by SMTP (local delivery into its Maildir); Dovecot by IMAP
APPEND.  Each round is one session: USER/PASS, LIST, RETR 1..N, QUIT (nothing deleted);
the best round of each server goes in the table.  Each round also gives a ratio of the
two servers measured back to back; the median of those ratios and their spread (lowest,
highest) say how steady it is on a shared machine.  Sizes cycle 2, 5, 10, 30, 100 kB
(plain text and a base64 attachment).
"""
from __future__ import annotations

import argparse
import poplib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from office import DialmailSite, submit, wait_until
from workload import mixed

from tests.peers import Dovecot, need


def retrieve(port: int, user: str, password: str, expect: int) -> tuple[float, float, int]:
    """(whole session, LIST + RETRs only, octets)."""
    start = time.perf_counter()
    p = poplib.POP3("127.0.0.1", port, timeout=60)
    p.user(user)
    p.pass_(password)
    logged_in = time.perf_counter()
    count = len(p.list()[1])
    total = 0
    for i in range(1, count + 1):
        total += p.retr(i)[2]
    retrieved = time.perf_counter()
    p.quit()
    elapsed = time.perf_counter() - start
    if count != expect:
        raise SystemExit(f"port {port}: {count} messages in the maildrop, expected {expect}")
    return elapsed, retrieved - logged_in, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    need("dovecot", "doveadm")
    msgs = mixed(args.messages, seed=7)
    size = sum(map(len, msgs))
    best = {}
    ratios = []  # per round: Dovecot's LIST+RETRs time / dialmail's
    with DialmailSite() as site, Dovecot(tls="none") as dovecot:
        site.add_user("alice", "alice-pw")
        site.start()
        submit(site.smtp_port, [("s@outside.test", "alice@office.test", m) for m in msgs], connections=4)
        new = site.spool / "mail" / "alice" / "new"
        cur = site.spool / "mail" / "alice" / "cur"
        wait_until(lambda: sum(1 for d in (new, cur) if d.exists() for _ in d.iterdir()) >= args.messages,
                   120, "local delivery", 0.05)
        dovecot.add_user("alice", "alice-pw")
        dovecot.save_many("alice", msgs)
        for _ in range(args.rounds):  # alternate, so drift on a noisy machine hits both
            this = {}
            for name, port in (("dialmail", site.pop3_port), ("Dovecot", dovecot.pop3_port)):
                t, retr, nbytes = retrieve(port, "alice", "alice-pw", args.messages)
                this[name] = retr
                old = best.get(name, (1e9, 1e9, 0))
                best[name] = (min(t, old[0]), min(retr, old[1]), nbytes)
            ratios.append(this["Dovecot"] / this["dialmail"])
    print(f"\n3. POP3 retrieval: one poplib client, {args.messages} messages ({size / 1e6:.1f} MB, 2-100 kB), "
          f"best of {args.rounds} rounds")
    print(f"{'server':10} {'LIST+RETRs':>11} {'msgs/s':>8} {'MB/s':>7} {'session':>9} {'msgs/s':>8}")
    for name, (t, retr, nbytes) in best.items():
        print(f"{name:10} {retr:10.3f}s {args.messages / retr:8.0f} {nbytes / retr / 1e6:7.1f} {t:8.3f}s "
              f"{args.messages / t:8.0f}")
    print(f"  dialmail / Dovecot, retrieval (LIST + RETRs): best rounds {best['Dovecot'][1] / best['dialmail'][1]:.2f} x; "
          f"per round median {statistics.median(ratios):.2f} x, spread {min(ratios):.2f}-{max(ratios):.2f} x "
          f"over {len(ratios)} rounds   (target >= 0.8 x in every round)")
    print(f"  dialmail / Dovecot, whole session incl. login: {best['Dovecot'][0] / best['dialmail'][0]:.2f} x   "
          f"(dialmail checks an argon2id hash, Dovecot here a plain password via checkpassword)")


if __name__ == "__main__":
    main()
