"""Dial sessions end to end: simulated modem + line shaper + real smarthost, through the daemon or not."""
import asyncio
import subprocess
import sys
import textwrap
import time

import aiosmtplib
import pytest

from tests.harness import ROOT, wait_for
from tests.peers import free_port

pytestmark = pytest.mark.timeout(180)


def sim_link(route_port: int, sink_port: int, extra: str = "") -> str:
    return f"""
[smarthost]
host = "127.0.0.1"
port = {route_port}
starttls = "off"

[link]
type = "sim"
rate = 115200
dial_delay = "1s"
redial_delay = "0.2s"
forward = ["127.0.0.1:{route_port}->127.0.0.1:{sink_port}"]
{extra}
[session]
retry_delay = "1s"
retry_count = 3
idle_timeout = "20s"
cost_per_call = 0.10
cost_per_minute = 0.02
"""


def submit(port: int, n: int, size: int = 2000, to="partner@elsewhere.test") -> list[str]:
    async def go():
        subjects = []
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as c:
            for i in range(n):
                subject = f"outbound {i}"
                body = ("line of text for the outbound message\r\n" * (size // 39)).encode()
                msg = (f"From: alice@office.test\r\nTo: {to}\r\nSubject: {subject}\r\n"
                       f"Message-ID: <out{i}.{time.time()}@office.test>\r\n\r\n").encode() + body
                await c.sendmail("alice@office.test", [to], msg)
                subjects.append(subject)
        return subjects
    return asyncio.run(go())


def test_lock_keeps_two_sessions_apart(site, smtp_sink):
    """Two connect-now runs (cron and a user, no daemon) at once: one session, the other is refused."""
    route = free_port()
    site.write_config(sim_link(route, smtp_sink.port).replace('dial_delay = "1s"', 'dial_delay = "3s"'))
    cmd = [sys.executable, "-m", "gateway", "-c", str(site.config_path), "connect-now", "--send-only"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    lock = site.spool / "locks" / "session"
    wait_for(lambda: lock.exists() and lock.read_text().strip(), timeout=20, what="the first session's lock")
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    out1 = first.communicate(timeout=60)[0].decode()
    assert first.returncode == 0, out1
    assert second.returncode == 75, second.stdout + second.stderr
    assert "already running" in second.stdout
    assert "CONNECTED" in out1


def test_connect_now_through_the_daemon_sends_and_logs(site, smtp_sink):
    route = free_port()
    site.write_config(sim_link(route, smtp_sink.port))
    site.start()
    subjects = submit(site.smtp_port, 5)
    r = site.cli("connect-now", "--send-only", timeout=120)
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert "CONNECTED" in out and "5 sent" in out
    got = smtp_sink.wait_messages(5)
    assert sorted(m.message["Subject"] for m in got) == sorted(subjects)
    log = site.cli("log").stdout.decode()
    assert "manual" in log and " ok " in log and "5/0/0" in log
    status = site.cli("status").stdout.decode()
    assert "daemon: running" in status and "last session: #1" in status and "sent 5" in status
    assert "0 message(s)" in status
    # The link is down again: the shaper no longer accepts connections.
    with pytest.raises(OSError):
        import socket
        socket.create_connection(("127.0.0.1", route), timeout=2).close()


def test_carrier_drop_mid_session_retries_and_loses_nothing(site, smtp_sink):
    """The line drops after 40 kB each call: bounded retries move everything, each message exactly once."""
    route = free_port()
    # 8 x 12 kB at 3 messages per call needs 3 calls; 6 leave room for a loaded machine.
    site.write_config(sim_link(route, smtp_sink.port, extra="drop_after_bytes = 40000\n")
                      .replace("retry_count = 3", "retry_count = 5"))
    site.start()
    subjects = submit(site.smtp_port, 8, size=12000)
    r = site.cli("connect-now", "--send-only", timeout=150)
    out = r.stdout.decode()
    assert "line dropped: trying again" in out, out
    got = smtp_sink.wait_messages(8, timeout=30)
    names = [m.message["Subject"] for m in got]
    assert sorted(names) == sorted(subjects), f"lost or duplicated: {sorted(names)}"
    assert site.cli("queue", "list").stdout.decode().startswith("queue is empty"), out
    log = site.cli("log").stdout.decode()
    assert "retry" in log and "carrier lost" in log


def test_demand_dials_when_enough_mail_waits_and_the_lock_refuses_a_second_session(site, smtp_sink):
    """The daemon dials on its own once 3 messages wait; a session started beside it meanwhile is refused."""
    route = free_port()
    site.write_config(sim_link(route, smtp_sink.port).replace('dial_delay = "1s"', 'dial_delay = "4s"')
                      + "\n[demand]\nmin_messages = 3\nmin_gap = \"1h\"\n")
    site.start()
    submit(site.smtp_port, 3)
    lock = site.spool / "locks" / "session"
    wait_for(lambda: lock.exists() and lock.read_text().strip(), timeout=30, what="a demand session")
    beside = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import asyncio
            from gateway.config import load
            from gateway.daemon import Spool
            from gateway.session.session import Session, SessionContext
            cfg = load({str(site.config_path)!r})
            rec = asyncio.run(Session(SessionContext(cfg, Spool(cfg)), "schedule", "send").run())
            print(rec.outcome, rec.errors)
            """)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert beside.stdout.startswith("refused"), beside.stdout + beside.stderr
    assert "already running" in beside.stdout
    got = smtp_sink.wait_messages(3, timeout=60)
    assert len(got) == 3
    wait_for(lambda: "demand" in site.cli("log").stdout.decode(), timeout=30, what="the demand session in the log")
    assert "dial on demand: 3 messages queued" in site.log()


def test_hooks_run_and_max_time_hangs_up_leaving_the_rest_queued(site, smtp_sink):
    """before/after commands run around the session; at max_time the line is hung up and mail waits."""
    route = free_port()
    marker = site.dir / "hooks.txt"
    site.write_config(sim_link(route, smtp_sink.port).replace("rate = 115200", "rate = 9600")
                      .replace("[session]", f'[session]\nmax_time = "4s"\nbefore = "echo before >> {marker}"\n'
                                            f'after = "echo after >> {marker}"'))
    site.start()
    submit(site.smtp_port, 6, size=12000)   # 72 kB at 9600 bit/s: about a minute of line time
    r = site.cli("connect-now", "--send-only", timeout=120)
    out = r.stdout.decode()
    assert r.returncode == 75, out
    assert "maximum session time of 4s reached" in out
    assert marker.read_text().split() == ["before", "after"]
    left = site.cli("queue", "list").stdout.decode()
    assert "partner@elsewhere.test" in left
    # A capture cut short by the hang-up is not a delivery: count only whole messages.
    whole = [m for m in smtp_sink.messages() if m.data.count(b"line of text") == 12000 // 39]
    assert len(whole) < 6
    assert left.count("<alice@office.test>") == 6 - len(whole)
