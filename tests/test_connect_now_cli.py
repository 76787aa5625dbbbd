"""What `connect-now`, `log` and `status` tell the admin when a session did not go through:
the reason from the real peer (smarthost AUTH reply, refused port, the ISP's IMAP login
reply) on the "sending done"/"fetching done" lines and in the summary, `--quiet` for
cron, and a session log that reads on an 80-column terminal."""
import os
import re

import pytest

from tests.peers import free_port
from tests.test_session import submit

pytestmark = pytest.mark.timeout(120)

AUTH_REPLY = "535 5.7.8 Error: authentication failed: the password for office-relay has expired"


def smarthost(port: int, auth_user: str | None = None, password_file=None) -> str:
    """An always-on link (no dialing) to a smarthost on 127.0.0.1:``port``."""
    auth = f'username = "{auth_user}"\npassword_file = "{password_file}"\n' if auth_user else ""
    return f"""
[smarthost]
host = "127.0.0.1"
port = {port}
starttls = "off"
{auth}
[link]
type = "always-on"
"""


def queue_two(site, extra: str) -> None:
    """Two messages for the outside queued by the real daemon, which is then stopped."""
    site.write_config(extra)
    site.start()
    submit(site.smtp_port, 2)
    site.stop()


def line_with(out: str, start: str) -> str:
    lines = [ln for ln in out.splitlines() if start in ln]
    assert lines, f"no line with {start!r} in:\n{out}"
    return lines[-1]


def test_auth_refused_by_the_smarthost_shows_its_reply(site, smtp_sink_factory):
    sink = smtp_sink_factory(announce_auth=True, hard_reject=["AUTH"], hard_reply=AUTH_REPLY)
    pw = site.dir / "relay.password"
    pw.write_text("old-secret\n")
    os.chmod(pw, 0o600)
    queue_two(site, smarthost(sink.port, "office-relay", pw))
    r = site.cli("connect-now", "--send-only")
    out = r.stdout.decode()
    assert r.returncode == 75, out + r.stderr.decode()
    done = line_with(out, "sending done:")
    assert "0 sent, 2 deferred, 0 bounced" in done
    assert "authentication" in done and "the password for office-relay has expired" in done, out
    summary = line_with(out, "session 1 partial")
    assert "the password for office-relay has expired" in summary, out
    assert "old-secret" not in out
    log = site.cli("log").stdout.decode()
    assert "the password for office-relay has expired" in " ".join(log.split()), log
    status = site.cli("status").stdout.decode()
    assert "the password for office-relay has expired" in status, status


def test_refused_connection_names_host_and_port(site):
    closed = free_port()
    queue_two(site, smarthost(closed))
    r = site.cli("connect-now", "--send-only")
    out = r.stdout.decode()
    assert r.returncode == 75, out + r.stderr.decode()
    done = line_with(out, "sending done:")
    assert f"127.0.0.1:{closed}" in done and "connection refused" in done, out
    assert "connection refused" in line_with(out, "session 1 partial")


def test_isp_imap_login_refused_shows_the_servers_reply(site, dovecot_notls):
    dovecot_notls.add_user("office", "right-password")
    site.write_config(smarthost(free_port()) + site.fetch_account(dovecot_notls.imap_port, "office",
                                                                  "wrong-password",
                                                                  deliver_to='"alice"'))
    r = site.cli("connect-now", "--fetch-only")
    out = r.stdout.decode()
    assert r.returncode != 0, out
    assert out, r.stderr.decode()
    done = line_with(out, "fetching done:")
    # Dovecot's own words, its response code in brackets included (not eaten as markup).
    assert "login refused" in done and "[AUTHENTICATIONFAILED] Authentication failed." in done, out
    assert "[AUTHENTICATIONFAILED]" in line_with(out, "session 1 ")
    assert "wrong-password" not in out


def test_quiet_prints_nothing_when_the_session_went_through(site, smtp_sink):
    queue_two(site, smarthost(smtp_sink.port))
    r = site.cli("connect-now", "--quiet")
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    assert r.stdout == b"" and r.stderr == b""
    assert len(smtp_sink.wait_messages(2)) == 2


def test_quiet_explains_a_failure(site):
    closed = free_port()
    queue_two(site, smarthost(closed))
    r = site.cli("connect-now", "--quiet", "--send-only")
    out = r.stdout.decode()
    assert r.returncode == 75, out
    assert out.startswith("dialmail connect-now: session 1 partial"), out
    assert f"127.0.0.1:{closed}" in out and "connection refused" in out, out
    assert "bringing the link up" not in out  # the blow-by-blow stays out of cron mail


def test_log_reads_on_80_columns(site, smtp_sink_factory, monkeypatch):
    sink = smtp_sink_factory(announce_auth=True, hard_reject=["AUTH"], hard_reply=AUTH_REPLY)
    pw = site.dir / "relay.password"
    pw.write_text("old-secret\n")
    os.chmod(pw, 0o600)
    queue_two(site, smarthost(sink.port, "office-relay", pw))
    site.cli("connect-now", "--send-only")
    site.cli("connect-now", "--send-only")
    monkeypatch.setenv("COLUMNS", "80")
    out = site.cli("log").stdout.decode()
    error = next(e for e in _errors_of(site) if "expired" in e)
    words = set(error.split())
    for line in out.splitlines():
        assert len(line) <= 80, f"line wider than 80 columns:\n{out}"
        assert not (len(line.split()) == 1 and line.strip() in words), f"a word alone on a line:\n{out}"
    assert error in " ".join(out.split()), out
    assert re.search(r"^\s*2\s+\S+ \S+\s+manual\s+partial", out, re.MULTILINE), out


def _errors_of(site) -> list[str]:
    from spool.queue import Catalogue
    from spool.sessions import SessionLog
    cat = Catalogue(site.spool)
    try:
        return [e for _, rec in SessionLog(cat).last(5) for e in rec.errors]
    finally:
        cat.close()
