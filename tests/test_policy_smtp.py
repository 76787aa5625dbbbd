"""LAN submissions: block lists, members-only groups and the virus scan answer at SMTP time."""
from __future__ import annotations

import pytest

from tests.test_policy_kit import (
    EICAR,
    message,
    pop3,
    send,
    settled,
    subjects,
    submit,
    wait_mail,
)

pytestmark = pytest.mark.timeout(90)

BLOCKS = """
[blocklist]
senders = ["spammer@bad.test", "junk.test", "*.spam.test"]
allow = ["boss@hq.spam.test"]
"""


def test_block_listed_sender_is_refused_at_rcpt(site):
    site.write_config(BLOCKS)
    site.start()
    for sender in ("spammer@bad.test", "anyone@junk.test", "x@a.b.spam.test", "y@mail.spam.test"):
        d = submit(site, sender, "alice@office.test", message(sender, "alice@office.test", "spam"))
        assert d.mail[0] == 250  # refused at RCPT, where every client reports it against the message
        assert d.rcpt == [(550, "550 5.7.1 Sender address rejected: blocked by local policy")], (sender, d)
    # Not blocked: other senders at the same domain, the bare parent of a wildcard, the allow list.
    for sender in ("friend@bad.test", "z@spam.test", "boss@hq.spam.test"):
        send(site, sender, "alice@office.test", f"from {sender}")
    settled(site)
    assert subjects(pop3(site, "alice")) == ["from boss@hq.spam.test", "from friend@bad.test", "from z@spam.test"]
    assert "sender blocked (junk.test)" in site.log()


def test_block_listed_from_header_is_refused_at_data(site):
    site.write_config(BLOCKS)
    site.start()
    d = submit(site, "relay@fine.test", "alice@office.test",
               message("Spammer <spammer@bad.test>", "alice@office.test", "forged"))
    assert d.rcpt == [(250, "250 2.1.5 Ok")]
    assert d.data == (550, "550 5.7.1 Message rejected: From address blocked by local policy")
    settled(site)
    assert pop3(site, "alice") == []


def test_members_only_group_refuses_outsiders_at_rcpt(site):
    site.add_user("carol@branch.test", "carol-pw")
    site.domains = ("office.test", "branch.test")
    site.write_config("""
[groups."board@office.test"]
members = ["alice", "carol@branch.test"]
members_only = true
""")
    site.start()
    d = submit(site, "outsider@else.test", "board@office.test", message("outsider@else.test", "board", "hi"))
    assert d.rcpt == [(550, "550 5.7.1 Only members of this group may send to it")]
    d = submit(site, "bob@office.test", "board@office.test", message("bob@office.test", "board", "hi"))
    assert d.rcpt == [(550, "550 5.7.1 Only members of this group may send to it")]  # a local user, but not a member
    send(site, "carol@branch.test", "board@office.test", "from a member")
    settled(site)
    assert subjects(pop3(site, "alice")) == ["from a member"]
    assert subjects(pop3(site, "carol@branch.test", "carol-pw")) == ["from a member"]


@pytest.mark.peer
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_eicar_attachment_is_rejected_at_data_and_postmaster_told(site, clamd, transport):
    where = f"unix:{clamd.socket_path}" if transport == "unix" else f"tcp:127.0.0.1:{clamd.port}"
    site.add_user("postmaster", "pm-pw")
    site.write_config(f'[virus]\nclamd = "{where}"\n')
    site.start()
    d = submit(site, "a@outside.test", ["alice@office.test", "bob@office.test"],
               message("a@outside.test", "alice@office.test", "infected", attachment=("eicar.com", EICAR)))
    assert d.data == (554, f"554 5.7.1 Message rejected: virus found ({clamd.signature_name})")
    send(site, "a@outside.test", "alice@office.test", "clean", attachment=("notes.txt", b"just text"))
    notice = wait_mail(site, "postmaster", 1, "pm-pw")
    assert clamd.signature_name in str(notice[0]["Subject"])
    assert "alice@office.test, bob@office.test" in notice[0].get_payload()
    settled(site)
    assert subjects(pop3(site, "alice")) == ["clean"]
    assert pop3(site, "bob") == []


def test_clamd_down_fail_closed_answers_451_and_keeps_running(site, tmp_path):
    site.write_config(f'[virus]\nclamd = "unix:{tmp_path}/nothing.sock"\non_error = "reject"\n')
    site.start()
    d = submit(site, "a@outside.test", "alice@office.test", message("a@outside.test", "alice", "later"))
    assert d.data == (451, "451 4.7.1 Message could not be scanned for viruses, try again later")
    assert "refused for now (virus on_error = reject)" in site.log()
    assert site.proc.poll() is None
    # The same connection pattern still works after the failure: the daemon did not crash.
    d = submit(site, "a@outside.test", "alice@office.test", message("a@outside.test", "alice", "again"))
    assert d.data == (451, "451 4.7.1 Message could not be scanned for viruses, try again later")


def test_clamd_down_fail_open_accepts_with_a_log_line(site):
    site.write_config('[virus]\nclamd = "tcp:127.0.0.1:1"\non_error = "accept"\n')
    site.start()
    send(site, "a@outside.test", "alice@office.test", "unscanned")
    settled(site)
    assert subjects(pop3(site, "alice")) == ["unscanned"]
    assert "accepted unscanned (virus on_error = accept)" in site.log()
