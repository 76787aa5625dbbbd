"""The whole product against real peers: a dial session through the simulated modem
(as a pyserial URL and on a real pty) and the line shaper, Dovecot as the ISP's IMAP
server, Postfix's smtp-sink as smarthost, POP3 retrieval by a real client afterwards."""
import asyncio
import email
import email.policy
import poplib
import subprocess
import sys

import aiosmtplib
import pytest

from tests.harness import ROOT, wait_for
from tests.peers import free_port

pytestmark = pytest.mark.timeout(240)

ISP_USER, ISP_PASS = "office", "isp-secret"


def inbound(n: int, size: int, tag: str) -> list[bytes]:
    out = []
    for i in range(n):
        user = ("alice", "bob")[i % 2]
        body = (f"inbound {tag} {i} " * 20 + "\r\n").encode() * max(1, size // 400)
        out.append((f"Delivered-To: {user}@office.test\r\nFrom: sender{i}@outside.test\r\n"
                    f"To: {user}@office.test\r\nSubject: in {tag} {i}\r\n"
                    f"Message-ID: <in-{tag}-{i}@outside.test>\r\n\r\n").encode() + body)
    return out


def submit(port: int, n: int, size: int, tag: str) -> None:
    async def go():
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as c:
            for i in range(n):
                body = (f"outbound {tag} {i} " * 20 + "\r\n").encode() * max(1, size // 400)
                msg = (f"From: alice@office.test\r\nTo: partner{i}@elsewhere.test\r\nSubject: out {tag} {i}\r\n"
                       f"Message-ID: <out-{tag}-{i}@office.test>\r\n\r\n").encode() + body
                await c.sendmail("alice@office.test", [f"partner{i}@elsewhere.test"], msg)
    asyncio.run(go())


def pop3_subjects(site, user, password):
    p = poplib.POP3("127.0.0.1", site.pop3_port, timeout=20)
    p.user(user)
    p.pass_(password)
    subjects = []
    for i in range(1, len(p.list()[1]) + 1):
        msg = email.message_from_bytes(b"\r\n".join(p.retr(i)[1]), policy=email.policy.default)
        subjects.append(str(msg["Subject"]))
    p.quit()
    return sorted(subjects)


def fetch_table(site, port: int, dovecot) -> str:
    return site.fetch_account(port, ISP_USER, ISP_PASS, tls="starttls", ca_file=f'"{dovecot.cert}"',
                              mode='"multidrop"', envelope_header='"Delivered-To"')


def sim_config(site, relay: int, imap: int, sink, dovecot, rate: int = 115200, latency: int = 20) -> str:
    return f"""
[smarthost]
host = "127.0.0.1"
port = {relay}
starttls = "off"
{fetch_table(site, imap, dovecot)}
[link]
type = "sim"
rate = {rate}
dial_delay = "0.5s"
latency_ms = {latency}
forward = ["127.0.0.1:{relay}->127.0.0.1:{sink.port}", "127.0.0.1:{imap}->127.0.0.1:{dovecot.imap_port}"]

[session]
idle_timeout = "60s"
"""


def check_everything_arrived(site, sink, n_out, n_in, tag, dovecot):
    got = sink.wait_messages(n_out, timeout=30)
    assert sorted(m.message["Subject"] for m in got) == sorted(f"out {tag} {i}" for i in range(n_out))
    want = {"alice": sorted(f"in {tag} {i}" for i in range(0, n_in, 2)),
            "bob": sorted(f"in {tag} {i}" for i in range(1, n_in, 2))}
    wait_for(lambda: all(pop3_subjects(site, u, f"{u}-pw") == s for u, s in want.items()), timeout=30,
             what="fetched mail in the POP3 mailboxes")
    assert dovecot.message_count(ISP_USER) == 0 if hasattr(dovecot, "message_count") else True


def test_sim_url_modem_dovecot_smtp_sink_and_pop3(site, smtp_sink, dovecot):
    dovecot.add_user(ISP_USER, ISP_PASS)
    for m in inbound(4, 3000, "url"):
        dovecot.save(ISP_USER, m)
    relay, imap = free_port(), free_port()
    site.write_config(sim_config(site, relay, imap, smtp_sink, dovecot))
    site.start()
    submit(site.smtp_port, 3, 3000, "url")
    r = site.cli("connect-now", timeout=120)
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert "CONNECTED" in out and "3 sent" in out and "4 fetched" in out
    check_everything_arrived(site, smtp_sink, 3, 4, "url", dovecot)


STAND_IN_PPPD = """#!/bin/sh
# Stands in for pppd (this kernel has no PPP): records its arguments, then holds the
# line like pppd with nodetach until it is told to stop.
echo "$@" > "$(dirname "$0")/pppd.args"
trap 'exit 0' TERM INT
while :; do sleep 1; done
"""


def test_pty_modem_with_the_real_driver_dovecot_smtp_sink_and_pop3(site, smtp_sink, dovecot):
    """The driver dials a simulated modem on a real pty; the shaper behind it carries the traffic."""
    dovecot.add_user(ISP_USER, ISP_PASS)
    for m in inbound(2, 2000, "pty"):
        dovecot.save(ISP_USER, m)
    relay, imap = free_port(), free_port()
    pty = site.dir / "ttyMODEM"
    sim = subprocess.Popen([sys.executable, "-m", "gateway", "modem", "simulate", "--pty", str(pty),
                            "--rate", "115200", "--dial-delay", "0.5", "--busy", "1",
                            "--forward", f"127.0.0.1:{relay}->127.0.0.1:{smtp_sink.port}",
                            "--forward", f"127.0.0.1:{imap}->127.0.0.1:{dovecot.imap_port}"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(pty.exists, timeout=15, what="the simulated modem's pty")
        pppd = site.dir / "pppd"
        pppd.write_text(STAND_IN_PPPD)
        pppd.chmod(0o755)
        site.write_config(f"""
[smarthost]
host = "127.0.0.1"
port = {relay}
starttls = "off"
{fetch_table(site, imap, dovecot)}
[link]
type = "modem"
device = "{pty}"
numbers = ["555 0100"]
redial_delay = "0.5s"
pppd_path = "{pppd}"
interface = "lo"
""")
        site.start()
        submit(site.smtp_port, 2, 2000, "pty")
        r = site.cli("connect-now", timeout=120)
        out = r.stdout.decode()
        assert r.returncode == 0, out + r.stderr.decode()
        assert "BUSY" in out and "CONNECT" in out and "2 sent" in out and "2 fetched" in out
        assert str(pty) in (site.dir / "pppd.args").read_text()
        check_everything_arrived(site, smtp_sink, 2, 2, "pty", dovecot)
        transcript = "\n".join(p.read_text() for p in (site.spool / "sessions").glob("*.log"))
        assert "ATD" in transcript and ISP_PASS not in transcript
    finally:
        sim.terminate()
        sim.wait(10)


def connected_seconds(site) -> list[float]:
    from spool.queue import Catalogue
    from spool.sessions import SessionLog
    cat = Catalogue(site.spool)
    rows = SessionLog(cat).last(10)
    cat.close()
    return [r.connected_seconds for _, r in rows]


def test_send_and_fetch_overlap(site, smtp_sink, dovecot):
    """The same work done concurrently takes measurably less line time than one after the other."""
    dovecot.add_user(ISP_USER, ISP_PASS)
    relay, imap = free_port(), free_port()
    site.write_config(sim_config(site, relay, imap, smtp_sink, dovecot, rate=57600, latency=40))
    site.start()
    n, size = 5, 12000
    for m in inbound(n, size, "a"):
        dovecot.save(ISP_USER, m)
    submit(site.smtp_port, n, size, "a")
    assert site.cli("connect-now", timeout=120).returncode == 0
    for m in inbound(n, size, "b"):
        dovecot.save(ISP_USER, m)
    submit(site.smtp_port, n, size, "b")
    assert site.cli("connect-now", "--send-only", timeout=120).returncode == 0
    assert site.cli("connect-now", "--fetch-only", timeout=120).returncode == 0
    both, send, fetch = connected_seconds(site)
    ratio = both / (send + fetch)
    print(f"\nconcurrent {both:.2f}s vs sequential {send:.2f}s + {fetch:.2f}s = {send + fetch:.2f}s: "
          f"ratio {ratio:.2f}")
    assert ratio < 0.8, f"send and fetch did not overlap: {both:.2f}s vs {send + fetch:.2f}s"
    assert len(smtp_sink.messages()) == 2 * n
