"""Mail that can be neither delivered nor returned is kept for the postmaster, never dropped.

Fetched mail (its ISP copy is gone once spooled) and null-sender mail (bounces, automatic
replies, notices: never answered) have nobody to hear of a failure, so when such a
message cannot reach a recipient it lands in the review mailboxes with the reason; a
null-sender message the smarthost refuses comes back to the postmaster whole.
"""
from __future__ import annotations

import email
import email.policy

import pytest

from gateway.delivery.stages.review import FALLBACK
from spool.queue import LOCAL
from tests.test_fetch_dovecot import FetchSite, fill, message
from tests.test_relay import Office
from tests.test_relay import message as relay_message

pytestmark = [pytest.mark.peer, pytest.mark.timeout(120)]


def parsed(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


@pytest.fixture
def fs(tmp_path):
    s = FetchSite(tmp_path, users=("alice", "bob"))
    yield s
    s.site.stop()


def test_fetched_mail_for_nobody_with_a_postmaster_who_is_nobody_lands_in_the_postmaster_maildir(fs, isp):
    """The sample's postmaster = "admin@..." with no user admin: the unknown recipient's
    message went to admin for review, failed, and was lost with the ISP copy expunged."""
    fs.site.server_extra = 'postmaster = "admin@office.test"'
    fill(isp, "office", [message(1, headers="Delivered-To: alice@office.test\r\n"),
                         message(2, headers="Delivered-To: stranger@office.test\r\n")])
    fs.configure(fs.account("isp", isp.imap_port, "office", mode="multidrop", envelope_header="Delivered-To"))
    result = fs.fetch()
    assert result.errors == [] and result.fetched == 2
    assert isp.message_count("office") == 0  # gone from the ISP ...
    [kept] = fs.site.mail_of(FALLBACK)  # ... and here, not nowhere
    m = parsed(kept)
    assert m["Subject"] == "message 2"
    reasons = " | ".join(m.get_all("X-Dialmail-Review"))
    assert "no local user for stranger@office.test" in reasons and "no local user or alias admin@office.test" in reasons
    assert [parsed(r)["Subject"] for r in fs.site.mail_of("alice")] == ["message 1"]
    assert fs.queued() == 0  # nothing left over, and no bounce queued for the outside sender


def test_fetched_mail_to_a_members_only_group_from_outside_is_kept_for_review(fs, isp):
    fs.site.add_user("postmaster", "pm-pw")
    fill(isp, "office", [message(1)])
    fs.configure(fs.account("isp", isp.imap_port, "office", deliver_to="team") + """
[groups.team]
members = ["alice", "bob"]
members_only = true
""")
    fs.fetch()
    [kept] = fs.site.mail_of("postmaster")
    assert "not a member of team" in parsed(kept)["X-Dialmail-Review"]
    assert fs.site.mail_of("alice") == [] and fs.queued() == 0


def test_local_bounce_to_a_sender_who_left_is_kept_for_review(office):
    o = office()
    qid = o.queue.enqueue("", [("gone@office.test", LOCAL)], relay_message("bounce for gone"), origin="bounce")
    o.deliver_local()
    [kept] = o.mailbox(FALLBACK)
    assert kept["Subject"] == "bounce for gone" and "gone@office.test" in kept["X-Dialmail-Review"]
    assert o.queue.get(qid) is None


@pytest.mark.parametrize("postmaster", ["", 'postmaster = "admin@example.com"'])
def test_null_sender_mail_refused_by_the_smarthost_comes_back_whole_to_the_postmaster(tmp_path, postfix_smarthost,
                                                                                      postmaster):
    """Postfix answers 550 to bad*: the null-sender message used to be logged and dropped.
    With the postmaster outside, the report still stays here: it must never leave and fail again."""
    pf = postfix_smarthost
    o = Office(tmp_path / "o", pf.port, server=postmaster)
    marker = "the only copy of this text"
    qid = o.send("", ["bad1@example.com", "fine@example.com"], relay_message("auto reply", body=marker))
    o.flush()
    assert o.queue.get(qid) is None
    o.deliver_local()
    [report] = o.mailbox(FALLBACK)
    assert report["Subject"] == "Undelivered Mail Returned to Postmaster"
    assert report.get_content_type() == "multipart/report"
    parts = {p.get_content_type(): p for p in report.iter_parts()}
    assert "bad1@example.com" in str(parts["message/delivery-status"])
    original = parts["message/rfc822"].get_content()
    assert original["Subject"] == "auto reply" and marker in original.get_body().get_content()
    assert o.queue.messages() == []
    assert [d.original_to for d in pf.wait_delivered(1)] == ["fine@example.com"]  # nothing else went out
