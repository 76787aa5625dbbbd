"""Sessions cut short are logged as "interrupted", by what and while doing what, and lose
or repeat nothing: Ctrl-C of a connect-now that runs the session itself, SIGTERM to the
daemon, and `dialmail hangup` (Ctrl-C of a connect-now that follows the daemon's
session only stops following).  Each signal lands while a message is on the wire: the
tests wait for the first "→ sent" line of a slow simulated line, never for time."""
import os
import signal
import subprocess
import sys
import threading

import pytest

from tests.harness import ROOT, wait_for
from tests.peers import free_port
from tests.test_session import sim_link, submit

pytestmark = pytest.mark.timeout(180)

COUNT, SIZE = 5, 6000   # at 9600 bit/s about 6 s of line time per message


class Live:
    """A dialmail command whose output is read line by line while it runs."""

    def __init__(self, site, *args: str):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "-c", str(site.config_path), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace"))

    def wait_line(self, text: str, timeout: float = 60) -> None:
        wait_for(lambda: any(text in ln for ln in self.lines) or self.proc.poll() is not None, timeout=timeout,
                 what=f"{text!r} in the output")
        assert any(text in ln for ln in self.lines), self.output

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def finish(self, timeout: float = 90) -> int:
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.reader.join(10)
        return rc


def slow_site(site, sink) -> None:
    site.write_config(sim_link(free_port(), sink.port).replace("rate = 115200", "rate = 9600"))


def queued(site) -> int:
    return site.cli("queue", "list").stdout.decode().count("<alice@office.test>")


def assert_nothing_lost_or_repeated(site, sink, subjects) -> None:
    """Every message is either taken whole by the smarthost (once) or still queued."""
    whole = [m for m in sink.messages() if m.data.count(b"line of text") == SIZE // 39]
    names = [m.message["Subject"] for m in whole]
    assert len(names) == len(set(names)), f"sent twice: {names}"
    assert 0 < len(names) < COUNT, names
    assert queued(site) == COUNT - len(names)
    listing = site.cli("queue", "list").stdout.decode()
    assert all(s not in names for s in subjects if s in listing)


def log_and_status(site) -> tuple[str, str]:
    log = site.cli("log", timeout=60).stdout.decode()
    status = site.cli("status", timeout=60).stdout.decode()
    return " ".join(log.split()), status


def test_ctrl_c_of_connect_now_running_the_session_itself(site, smtp_sink):
    slow_site(site, smtp_sink)
    site.start()
    subjects = submit(site.smtp_port, COUNT, size=SIZE)
    site.stop()                      # no daemon: connect-now runs the session itself
    live = Live(site, "connect-now", "--send-only")
    live.wait_line("→ sent")         # one message through, the next on the wire
    live.proc.send_signal(signal.SIGINT)
    rc = live.finish()
    out = live.output
    assert rc == 130, out
    assert "Ctrl-C: ending the session at a safe point and hanging up" in out
    assert "session 1 interrupted" in out and "hanging up" in out, out
    log, status = log_and_status(site)
    assert "interrupted" in log and "interrupted by Ctrl-C while sending" in log, log
    assert "manual interrupted" in status and "interrupted by Ctrl-C while sending" in status, status
    assert_nothing_lost_or_repeated(site, smtp_sink, subjects)
    assert not (site.spool / "locks" / "session").read_text().strip()   # the line is free again


def test_sigterm_of_connect_now_running_the_session_itself(site, smtp_sink):
    slow_site(site, smtp_sink)
    site.start()
    subjects = submit(site.smtp_port, COUNT, size=SIZE)
    site.stop()
    live = Live(site, "connect-now", "--send-only")
    live.wait_line("→ sent")
    live.proc.send_signal(signal.SIGTERM)
    rc = live.finish()
    assert rc == 143, live.output
    log, _ = log_and_status(site)
    assert "interrupted by SIGTERM while sending" in log, log
    assert_nothing_lost_or_repeated(site, smtp_sink, subjects)


def test_sigterm_to_the_daemon_mid_session(site, smtp_sink):
    slow_site(site, smtp_sink)
    site.start()
    subjects = submit(site.smtp_port, COUNT, size=SIZE)
    live = Live(site, "connect-now", "--send-only")
    live.wait_line("→ sent")
    assert site.stop(signal.SIGTERM) == 0, site.log()
    rc = live.finish()
    out = live.output
    assert rc != 0, out
    assert "interrupted by SIGTERM while sending" in out and "session 1 interrupted" in out, out
    log, status = log_and_status(site)
    assert "daemon: not running" in status
    assert "manual interrupted" in status and "interrupted by SIGTERM while sending" in status, status
    assert "interrupted by SIGTERM" in log, log
    assert_nothing_lost_or_repeated(site, smtp_sink, subjects)


def test_ctrl_c_detaches_from_the_daemon_and_hangup_ends_the_session(site, smtp_sink):
    slow_site(site, smtp_sink)
    site.start()
    r = site.cli("hangup")
    assert r.returncode == 0 and "no dial session is running" in r.stdout.decode(), r
    subjects = submit(site.smtp_port, COUNT, size=SIZE)
    live = Live(site, "connect-now", "--send-only")
    live.wait_line("→ sent")
    live.proc.send_signal(signal.SIGINT)
    rc = live.finish()
    assert rc == 130, live.output
    assert "the session goes on in the daemon; `dialmail hangup` ends it" in live.output
    # The session did go on: the daemon still has it (the link is up).
    status = site.cli("status").stdout.decode()
    assert "link: connected" in status, status
    r = site.cli("hangup", timeout=90)
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert "asked the daemon to end the session at a safe point and hang up" in out
    assert "session 1 interrupted" in out, out
    log, status = log_and_status(site)
    assert "interrupted by dialmail hangup while sending" in log, log
    assert "link: idle" in status and "manual interrupted" in status, status
    assert_nothing_lost_or_repeated(site, smtp_sink, subjects)
    assert "no dial session is running" in site.cli("hangup").stdout.decode()


def test_ctrl_c_while_dialing_cuts_the_dial_short(site, smtp_sink):
    """Nothing moves yet while the modem dials: Ctrl-C ends the dial at once, no waiting for it."""
    site.write_config(sim_link(free_port(), smtp_sink.port).replace('dial_delay = "1s"', 'dial_delay = "60s"'))
    live = Live(site, "connect-now", "--send-only")
    live.wait_line("bringing the link up")
    live.proc.send_signal(signal.SIGINT)
    rc = live.finish(timeout=30)
    assert rc == 130, live.output
    assert "session 1 interrupted" in live.output, live.output
    log, _ = log_and_status(site)
    assert "interrupted by Ctrl-C while dialing" in log, log


def test_sigterm_to_the_daemon_finishes_the_message_in_flight_and_logs_what_was_sent(site, smtp_sink):
    """The signal lands while the second message is on the wire: it is finished (abandoned
    after its final dot it would go again after the restart), nothing else is started, and
    the session is logged interrupted with the real count."""
    from spool.queue import Catalogue
    from spool.sessions import SessionLog
    slow_site(site, smtp_sink)
    site.start()
    submit(site.smtp_port, COUNT, size=SIZE)
    live = Live(site, "connect-now", "--send-only")
    live.wait_line("→ sent")
    assert site.stop(signal.SIGTERM) == 0, site.log()
    live.finish()
    captured = smtp_sink.messages()
    whole = [m for m in captured if m.data.count(b"line of text") == SIZE // 39]
    assert len(whole) == len(captured) == 2, [len(m.data) for m in captured]
    cat = Catalogue(site.spool)
    try:
        [(_, rec)] = SessionLog(cat).last(1)
    finally:
        cat.close()
    assert rec.outcome == "interrupted" and rec.sent == 2, rec
    assert queued(site) == COUNT - 2
    # After the restart the rest goes, and nothing twice.
    site.start()
    r = site.cli("connect-now", "--send-only", timeout=120)
    assert r.returncode == 0, r.stdout.decode()
    names = [m.message["Subject"] for m in smtp_sink.wait_messages(COUNT, timeout=60)]
    assert len(names) == COUNT == len(set(names)), names
