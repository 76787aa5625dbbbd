"""Link efficiency: line time for the same mail both ways, dialmail against the usual
Postfix + fetchmail setup, through the same simulated modem and shaper, in one run.

    .venv/bin/python bench/link_efficiency.py [--rate 33600] [--latency-ms 75] [--scale 1.0]

Workload (bench/workload.py): 20 outbound and 20 inbound messages, 2 kB to 120 kB, about
590 kB each way, plain text plus a base64 attachment of random bytes.  The line: the
simulated modem on a pty at 33.6 kbit/s, 75 ms latency each way, one shared serial pipe
per direction (modem.shaper).  The ISP: smtp-sink as smarthost, Dovecot IMAP as mailbox.

Measured for each setup: CONNECT to hang-up as the simulated modem saw it.

* dialmail: the daemon dials with its own driver (link type ``modem``, a stand-in for
  pppd since this kernel has no PPP), sends and fetches at once, hangs up; once with
  ``[smarthost] connections = 1`` and once with 2 (the default).
* Postfix + fetchmail, the usual admin setup: Postfix with ``relayhost`` and
  ``defer_transports = smtp``; the line is dialled with the same driver; then
  ``postqueue -f`` and fetchmail over IMAP (deleting, delivering with ``mda "cat
  >/dev/null"``: its cheapest delivery), one after the other (the admin's script waits
  for the queue to empty, then polls) and overlapped (``postqueue -f`` returns at once,
  fetchmail runs meanwhile); hang-up as soon as the last message is across.

The lower bound is max(message bytes up, message bytes down) / line rate: what a
perfect, overhead-free protocol would need.  Ratios are to that bound.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from line import SimulatedLine
from office import DialmailSite, OfficePostfix, submit, wait_until
from workload import LINK_SIZES, message

from tests.peers import (
    IS_ROOT,
    Dovecot,
    SmtpSink,
    free_port,
    need,
    peer_tmpdir,
    run_fetchmail,
)

ISP_USER, ISP_PASS = "office", "isp-secret"

STAND_IN_PPPD = """#!/bin/sh
# Stands in for pppd (this kernel has no PPP): holds the line like pppd nodetach.
trap 'exit 0' TERM INT
while :; do sleep 1; done
"""


def workload(tag: str, scale: float) -> tuple[list[tuple[str, str, bytes]], list[bytes]]:
    sizes = [max(2000, int(s * scale)) for s in LINK_SIZES]
    out = [("alice@office.test", f"partner{i}@elsewhere.test",
            message(s, sender="alice@office.test", rcpt=f"partner{i}@elsewhere.test", subject=f"out {tag} {i}",
                    seed=1000 + i)) for i, s in enumerate(sizes)]
    inbound = [message(s, sender=f"sender{i}@outside.test", rcpt="alice@office.test", subject=f"in {tag} {i}",
                       seed=2000 + i) for i, s in enumerate(reversed(sizes))]
    return out, inbound


class Bench:
    def __init__(self, args, tmp: Path):
        self.args = args
        self.tmp = tmp
        self.dovecot = Dovecot(tls="none").start()
        self.dovecot.add_user(ISP_USER, ISP_PASS)
        self.sink = SmtpSink().start()
        self.relay_port, self.imap_port = free_port(), free_port()
        self.pty = tmp / "ttyMODEM"
        self.line = SimulatedLine(self.pty, [f"127.0.0.1:{self.relay_port}->127.0.0.1:{self.sink.port}",
                                             f"127.0.0.1:{self.imap_port}->127.0.0.1:{self.dovecot.imap_port}"],
                                  args.rate, args.latency_ms).start()

    def close(self):
        self.line.stop()
        self.sink.stop()
        self.dovecot.stop()

    def load_isp(self, inbound: list[bytes]) -> None:
        self.sink.clear()
        self.dovecot.save_many(ISP_USER, inbound)

    def isp_left(self) -> int:
        return len(self.dovecot.list_uids(ISP_USER, "INBOX"))

    # ------------------------------------------------------------ dialmail

    def dialmail(self, out, inbound, connections: int) -> dict:
        site = DialmailSite(self.tmp / f"dialmail-{connections}")
        pppd = site.dir / "pppd"
        pppd.write_text(STAND_IN_PPPD)
        pppd.chmod(0o755)
        pw = site.dir / "isp.password"
        pw.write_text(ISP_PASS + "\n")
        pw.chmod(0o600)
        site.write_config(f"""
            [smarthost]
            host = "127.0.0.1"
            port = {self.relay_port}
            starttls = "off"
            connections = {connections}

            [[fetch]]
            name = "isp"
            host = "127.0.0.1"
            port = {self.imap_port}
            tls = "off"
            username = "{ISP_USER}"
            password_file = "{pw}"
            deliver_to = "alice"
            keep = false

            [link]
            type = "modem"
            device = "{self.pty}"
            numbers = ["555 0100"]
            redial_delay = "0.5s"
            pppd_path = "{pppd}"
            interface = "lo"

            [session]
            idle_timeout = "120s"
            max_time = "30m"
            """)
        site.add_user("alice", "alice-pw")
        self.load_isp(inbound)
        with site.start():
            submit(site.smtp_port, out)
            earlier = len(self.line.calls)
            r = site.cli("connect-now", timeout=1800)
            if r.returncode != 0:
                raise SystemExit(f"dialmail session failed: {r.stdout}{r.stderr}")
            call = self.line.call_after(earlier)
            sent = len(self.sink.wait_messages(len(out), timeout=30))
            left = self.isp_left()
        if left:
            raise SystemExit(f"dialmail left {left} messages at the ISP:\n{r.stdout}")
        return {"call": call, "sent": sent, "fetched": len(inbound)}

    # ------------------------------------------------------------ Postfix + fetchmail

    def fetchmail(self, home: Path) -> subprocess.CompletedProcess:
        rc = (f"set no syslog\npoll 127.0.0.1 with proto IMAP port {self.imap_port}\n"
              f'  user "{ISP_USER}" there with password "{ISP_PASS}" is "alice" here\n'
              f"  options no keep no sslcertck sslproto '' mda \"cat >/dev/null\"\n")
        return run_fetchmail(rc, home, timeout=1800, verbose=False)

    def postfix(self, out, inbound, overlapped: bool) -> dict:
        with OfficePostfix(self.relay_port) as pf:
            submit(pf.port, out)
            wait_until(lambda: pf.deferred() == len(out), 60, "Postfix to defer the outbound mail")
            self.load_isp(inbound)
            home = self.tmp / f"fetchmail-{overlapped}"
            earlier = len(self.line.calls)
            self.line.dial()
            fetched: dict = {}
            if overlapped:
                pf.flush()
                t = threading.Thread(target=lambda: fetched.setdefault("r", self.fetchmail(home)))
                t.start()
                wait_until(lambda: len(self.sink.messages()) >= len(out), 1800, "Postfix to send", 0.05)
                t.join(1800)
            else:
                pf.flush()
                wait_until(lambda: len(self.sink.messages()) >= len(out), 1800, "Postfix to send", 0.05)
                fetched["r"] = self.fetchmail(home)
            self.line.hang_up()
            call = self.line.call_after(earlier)
            r = fetched["r"]
            if r.returncode != 0:
                raise SystemExit(f"fetchmail failed ({r.returncode}): {r.stdout[-800:]}{r.stderr[-800:]}")
            left = self.isp_left()
            if left:
                raise SystemExit(f"fetchmail left {left} messages at the ISP")
            sent = len(self.sink.messages())
        return {"call": call, "sent": sent, "fetched": len(inbound)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=int, default=33600, help="line rate in bits/s")
    ap.add_argument("--latency-ms", type=float, default=75.0, help="one-way latency")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every message size (quick runs)")
    ap.add_argument("--connections", type=int, action="append",
                    help="dialmail's [smarthost] connections, one run each (default: 1 and 2)")
    ap.add_argument("--only", choices=("dialmail", "sequential", "overlapped"), action="append")
    args = ap.parse_args()
    need("dovecot", "doveadm", "smtp-sink", "fetchmail", "postfix", "postqueue")
    if not IS_ROOT:
        raise SystemExit("the Postfix side needs root")
    tmp = peer_tmpdir("link")
    bench = Bench(args, tmp)
    rows = []
    try:
        which = args.only or ["dialmail", "sequential", "overlapped"]
        runs = [(name, c) for name in which for c in ((args.connections or [1, 2]) if name == "dialmail" else [0])]
        for name, connections in runs:
            out, inbound = workload(name, args.scale)
            started = time.monotonic()
            if name == "dialmail":
                res = bench.dialmail(out, inbound, connections)
                label = f"dialmail, connections = {connections}"
            else:
                res = bench.postfix(out, inbound, overlapped=name == "overlapped")
                label = f"Postfix + fetchmail, {name}"
            up = sum(len(d) for _, _, d in out)
            down = sum(map(len, inbound))
            rows.append((label, res, up, down))
            print(f"  ... {label}: {res['call'].seconds:.1f} s connected "
                  f"({time.monotonic() - started:.0f} s wall)", file=sys.stderr, flush=True)
    finally:
        bench.close()
        if not os.environ.get("DIALMAIL_KEEP_PEER_DIRS"):
            subprocess.run(["rm", "-rf", str(tmp)], check=False)
    bps = args.rate / 8
    print(f"\n1. Link efficiency: {args.rate} bit/s, {args.latency_ms:g} ms each way, "
          f"{len(LINK_SIZES)} messages out + {len(LINK_SIZES)} in")
    print(f"{'setup':42} {'connected':>10} {'bound':>8} {'x bound':>8} {'msg kB up/down':>15} "
          f"{'line kB up/down':>16}")
    for label, res, up, down in rows:
        call = res["call"]
        bound = max(up, down) / bps
        print(f"{label:42} {call.seconds:9.1f}s {bound:7.1f}s {call.seconds / bound:7.2f}x "
              f"{up / 1000:7.0f}/{down / 1000:<7.0f} {call.bytes_up / 1000:7.0f}/{call.bytes_down / 1000:<7.0f}")
    for ours in (r for r in rows if r[0].startswith("dialmail")):
        for label, res, _, _ in rows:
            if not label.startswith("dialmail"):
                print(f"  {ours[0]} / {label}: line time ratio {ours[1]['call'].seconds / res['call'].seconds:.2f}")
    print("  (target: dialmail <= 1.10 x bound; reference for the admin setup: ~1.87 x sequential, "
          "~1.35 x overlapped)")


if __name__ == "__main__":
    main()
