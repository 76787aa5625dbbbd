"""Mail fetched from the ISP (real Dovecot IMAP -> dialmail fetch -> delivery policy -> POP3 out).

Fetched mail can no longer be refused to its sender, so what the policy refuses is
quarantined (a Maildir read by the ``quarantine`` user over POP3) with a log line, never
dropped; viruses also notify the postmaster.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from gateway.delivery.stages.quarantine import MAILBOX as QUARANTINE
from tests.harness import wait_for
from tests.test_policy_kit import EICAR, message, pop3, settled, subjects, wait_mail

pytestmark = [pytest.mark.peer, pytest.mark.timeout(120)]


def fetching_site(site, dovecot, extra: str) -> None:
    dovecot.add_user("office", "isp-secret")
    pw = Path(site.dir) / "isp.password"
    pw.write_text("isp-secret\n")
    pw.chmod(0o600)
    site.add_user("postmaster", "pm-pw")
    site.add_user(QUARANTINE, "q-pw")
    site.write_config(f"""
[[fetch]]
name = "isp"
host = "127.0.0.1"
port = {dovecot.imap_port}
tls = "off"
username = "office"
password_file = "{pw}"
deliver_to = "alice"
{extra}""")
    site.start()


def collect(site) -> None:
    r = site.cli("connect-now", "--fetch-only", timeout=90)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    settled(site)


def test_fetched_mail_from_blocked_sender_is_quarantined_not_dropped(site, dovecot):
    fetching_site(site, dovecot, """
[blocklist]
senders = ["*.spam.test", "pest@nuisance.test"]
allow = ["friend@ok.spam.test"]
""")
    dovecot.save("office", b"Return-Path: <x@mail.spam.test>\r\n" + message("x@mail.spam.test", "office@isp.test",
                                                                              "spam 1"))
    dovecot.save("office", message("Pest <pest@nuisance.test>", "office@isp.test", "spam 2"))
    dovecot.save("office", b"Return-Path: <friend@ok.spam.test>\r\n" +
                 message("friend@ok.spam.test", "office@isp.test", "allowed"))
    dovecot.save("office", message("someone@fine.test", "office@isp.test", "fine"))
    collect(site)
    assert subjects(pop3(site, "alice")) == ["allowed", "fine"]
    held = pop3(site, QUARANTINE, "q-pw")
    assert subjects(held) == ["spam 1", "spam 2"]
    assert all("blocked by local policy" in m["X-Dialmail-Quarantine"] for m in held)
    assert all(m["X-Dialmail-Original-Recipients"] == "alice@office.test" for m in held)
    assert site.log().count("status=quarantined") == 2
    assert dovecot.message_count("office") == 0  # taken from the ISP: the quarantine is the only copy


def test_fetched_virus_is_quarantined_and_postmaster_notified(site, dovecot, clamd):
    fetching_site(site, dovecot, f"""
[virus]
clamd = "unix:{clamd.socket_path}"
""")
    dovecot.save("office", message("a@outside.test", "office@isp.test", "infected",
                                   attachment=("eicar.com", EICAR)))
    dovecot.save("office", message("a@outside.test", "office@isp.test", "clean"))
    collect(site)
    assert subjects(pop3(site, "alice")) == ["clean"]
    held = pop3(site, QUARANTINE, "q-pw")
    assert subjects(held) == ["infected"]
    assert clamd.signature_name in held[0]["X-Dialmail-Quarantine"]
    notice = wait_mail(site, "postmaster", 1, "pm-pw")
    assert clamd.signature_name in str(notice[0]["Subject"])
    assert notice[0]["Auto-Submitted"] == "auto-generated"
    assert "virus found" in site.log()


def test_fetched_mail_waits_when_clamd_is_down_and_fail_closed(site, dovecot, tmp_path):
    fetching_site(site, dovecot, f"""
[virus]
clamd = "unix:{tmp_path}/no-clamd.sock"
on_error = "reject"
""")
    dovecot.save("office", message("a@outside.test", "office@isp.test", "unscannable"))
    r = site.cli("connect-now", "--fetch-only", timeout=90)
    assert r.returncode == 0, r.stdout.decode()
    q = wait_for(lambda: [m for m in _queued(site) if m.origin == "fetch"], what="the deferred fetched message")
    assert q[0].recipients[0].status == "deferred" and q[0].recipients[0].last_code is None  # decided here, no server said it
    assert pop3(site, "alice") == []
    assert "refused for now (virus on_error = reject)" in site.log()
    assert site.proc.poll() is None


def test_fetched_mail_is_delivered_unscanned_when_clamd_is_down_and_fail_open(site, dovecot, tmp_path):
    fetching_site(site, dovecot, """
[virus]
clamd = "tcp:127.0.0.1:1"
on_error = "accept"
""")
    dovecot.save("office", message("a@outside.test", "office@isp.test", "unscanned"))
    collect(site)
    assert subjects(pop3(site, "alice")) == ["unscanned"]
    assert "accepted unscanned (virus on_error = accept)" in site.log()


def test_fetched_mail_over_the_size_limit_is_quarantined(site, dovecot):
    fetching_site(site, dovecot, """
[policy]
max_message_size = "20KB"
""")
    dovecot.save("office", message("a@outside.test", "office@isp.test", "huge", body="x" * 40_000 + "\n"))
    dovecot.save("office", message("a@outside.test", "office@isp.test", "small"))
    collect(site)
    assert subjects(pop3(site, "alice")) == ["small"]
    held = pop3(site, QUARANTINE, "q-pw")
    assert subjects(held) == ["huge"] and "exceeds the local limit" in held[0]["X-Dialmail-Quarantine"]


def _queued(site):
    from tests.test_policy_kit import queue_of
    q = queue_of(site)
    try:
        return q.messages()
    finally:
        q.cat.close()


def test_fetched_mail_forwarded_out_keeps_a_sender_and_delivered_to_is_written_once(site, dovecot, smtp_sink):
    """Dovecot stores no Return-Path for saved mail, so the fetched copy's sender is unknown:
    the forwarded copy used to leave with MAIL FROM:<>, which nobody can bounce to, and the
    local copy carried the ISP's Delivered-To and ours."""
    fetching_site(site, dovecot, f"""
mode = "multidrop"
envelope_header = "Delivered-To"

[smarthost]
host = "127.0.0.1"
port = {smtp_sink.port}
starttls = "off"

[forward]
alice = {{ to = ["alice@home.test"], keep = true }}
""")
    dovecot.save("office", b"Delivered-To: alice@office.test\r\n" +
                 message("someone@outside.test", "alice@office.test", "forward me"))
    dovecot.save("office", b"Delivered-To: alice@office.test\r\nReturn-Path: <>\r\n" +
                 message("MAILER-DAEMON@outside.test", "alice@office.test", "a bounce",
                         headers={"Auto-Submitted": "auto-replied"}))
    collect(site)
    kept = site.mail_of("alice")
    assert len(kept) == 2
    for raw in kept:
        head = raw.split(b"\r\n\r\n")[0]
        assert head.lower().count(b"delivered-to: alice@office.test") == 1, head
        assert head.count(b"Return-Path:") <= 1, head
    r = site.cli("connect-now", "--send-only", timeout=90)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    got = {m.message["Subject"]: m for m in smtp_sink.wait_messages(2)}
    assert (got["forward me"].mail_from, got["forward me"].rcpts) == ("alice@office.test", ["alice@home.test"])
    assert got["a bounce"].mail_from == ""  # a bounce stays unanswerable when forwarded
