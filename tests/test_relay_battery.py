"""Open-relay battery against the real daemon, from an address outside mynetworks
(127.0.0.2; the site trusts 127.0.0.1/32 only): every trick that has made an MTA relay
for strangers is refused without AUTH; with AUTH a normal outside address is accepted
and the tricks are still refused."""
import smtplib

import pytest

from tests.harness import wait_for

pytestmark = pytest.mark.timeout(120)

OUTSIDE = ("127.0.0.2", 0)

TRICKS = [
    "victim@elsewhere.test",                        # plain relay
    "VICTIM@ELSEWHERE.TEST",                        # case
    "victim@Elsewhere.Test.",                       # trailing dot
    "victim%elsewhere.test@office.test",            # percent hack
    "victim%elsewhere.test@OFFICE.TEST",
    "alice%elsewhere.test@office.test",             # percent hack behind a real user's name
    "victim%elsewhere.test%office.test@office.test",
    "elsewhere.test!victim@office.test",            # bang path
    "elsewhere.test!victim",
    "office.test!elsewhere.test!victim",
    '"victim@elsewhere.test"@office.test',          # quoted local parts
    '"victim%elsewhere.test"@office.test',
    '"elsewhere.test!victim"@office.test',
    '"victim@elsewhere.test"',
    "@office.test:victim@elsewhere.test",           # source routes
    "@office.test,@relay.test:victim@elsewhere.test",
    "@office.test:victim%elsewhere.test@office.test",
    "victim@[192.0.2.1]",                           # IP literals
    "victim@[127.0.0.1]",
    "victim@[IPv6:::1]",
    "victim%elsewhere.test@[127.0.0.1]",
    "victim@elsewhere.test@office.test",            # extra @
    "victim@office.test@elsewhere.test",
    "alice@office.test@elsewhere.test",
    "victim@@elsewhere.test",
    "victim@office.test.elsewhere.test",            # local domain as a prefix
    "victim@elsewhere.test%office.test",
    "victim@elsewhere.test (office.test)",
    "victim@elsewhere.test\tX",
]


def rcpt_replies(site, rcpts, login=None):
    c = smtplib.SMTP("127.0.0.1", site.smtp_port, source_address=OUTSIDE, timeout=30)
    try:
        c.ehlo("outside.test")
        if login:
            c.login(*login)
        out = {}
        for rcpt in rcpts:
            c.rset()
            code, _ = c.mail("stranger@outside.test")
            assert code == 250
            out[rcpt] = c.docmd(f"RCPT TO:<{rcpt}>")
        return out
    finally:
        c.quit()


def test_every_relay_trick_is_refused_from_outside_without_auth(running):
    replies = rcpt_replies(running, TRICKS)
    accepted = {r: rep for r, rep in replies.items() if rep[0] < 400}
    assert not accepted, f"relayed for a stranger: {accepted}"
    assert all(code in (501, 550, 553, 554) for code, _ in replies.values()), replies
    # Permanent refusals: a stranger's MTA must not keep retrying.
    log = running.log()
    assert "relay access denied" in log


def test_with_auth_outside_addresses_are_accepted_and_tricks_still_refused(running):
    replies = rcpt_replies(running, ["partner@elsewhere.test", "Partner@Elsewhere.Test"] + TRICKS[3:],
                           login=("alice", "alice-pw"))
    assert replies["partner@elsewhere.test"][0] == 250
    assert replies["Partner@Elsewhere.Test"][0] == 250
    # The routing tricks are not plain addresses even for a user who may relay.  (A source
    # route is dropped as RFC 5321 section 3.6.1 allows: for her it is just the final address.)
    for rcpt in ("victim%elsewhere.test@office.test", "elsewhere.test!victim",
                 '"victim@elsewhere.test"@office.test', "victim@office.test@elsewhere.test"):
        assert replies[rcpt][0] >= 500, (rcpt, replies[rcpt])


def test_a_whole_transaction_from_outside_queues_nothing_for_relay(running):
    c = smtplib.SMTP("127.0.0.1", running.smtp_port, source_address=OUTSIDE, timeout=30)
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        c.sendmail("stranger@outside.test", TRICKS[:6], b"Subject: relay?\r\n\r\nplease\r\n")
    c.quit()
    # Mail for a local user from outside is of course taken (that is inbound mail).
    c = smtplib.SMTP("127.0.0.1", running.smtp_port, source_address=OUTSIDE, timeout=30)
    c.sendmail("stranger@outside.test", ["bob@office.test"], b"Subject: hello\r\n\r\nhi bob\r\n")
    c.quit()
    wait_for(lambda: running.mail_of("bob"), timeout=20, what="bob's mail")
    listing = running.cli("queue", "list").stdout.decode()
    assert "elsewhere" not in listing, listing
