"""Autoresponders and out-of-office (RFC 3834): SMTP in, POP3 out, replies through the queue."""
from __future__ import annotations

import datetime as dt
import email

import pytest

from tests.test_policy_kit import (
    message,
    pop3,
    queue_of,
    send,
    settled,
    subjects,
    submit,
)

pytestmark = pytest.mark.timeout(120)

RECIPE = b"""Subject: Chocolate fudge
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="RECIPE"

--RECIPE
Content-Type: text/plain; charset=utf-8

Thanks for asking! The recipe is attached.
--RECIPE
Content-Type: text/plain; name="fudge.txt"
Content-Disposition: attachment; filename="fudge.txt"

400 g sugar, 100 g butter, 150 ml milk, 100 g dark chocolate.
--RECIPE--
"""


def autoreplies(site) -> list:
    """Replies waiting in the queue for outside senders."""
    q = queue_of(site)
    try:
        return [m for m in q.messages() if m.origin == "autoreply"]
    finally:
        q.cat.close()


def days(n: int) -> str:
    return (dt.date.today() + dt.timedelta(days=n)).isoformat()


def test_fudge_answers_every_sender_with_the_recipe_once_per_interval(site):
    (site.dir / "recipe.eml").write_bytes(RECIPE)
    site.write_config('[autoreply."fudge@office.test"]\nfile = "recipe.eml"\nevery = "7d"\n')
    site.start()
    asked = message("alice@office.test", "fudge@office.test", "fudge please")
    d = submit(site, "alice@office.test", "fudge@office.test", asked)
    settled(site)
    got = pop3(site, "alice")
    assert subjects(got) == ["Chocolate fudge"]
    reply = got[0]
    assert reply["From"] == "fudge@office.test" and reply["To"] == "alice@office.test"
    assert reply["Auto-Submitted"] == "auto-replied"
    assert reply["Return-Path"] == "<>"  # null envelope sender: nothing can answer or bounce it back
    asked_id = email.message_from_bytes(asked)["Message-ID"]
    assert reply["In-Reply-To"] == asked_id and reply["References"] == asked_id
    attachment = [p for p in reply.walk() if p.get_filename() == "fudge.txt"]
    assert attachment and b"dark chocolate" in attachment[0].get_payload(decode=True)
    # Same sender again within 7 days: answered already; a new outside sender gets its reply by the queue.
    send(site, "alice@office.test", "fudge@office.test", "more fudge")
    send(site, "stranger@outside.test", "fudge@office.test", "fudge for me")
    settled(site)
    assert len(pop3(site, "alice")) == 1
    out = autoreplies(site)
    assert [(m.sender, [r.rcpt for r in m.recipients], [r.route for r in m.recipients]) for m in out] == \
        [("", ["stranger@outside.test"], ["relay"])]
    assert "already answered recently" in site.log()
    assert d.accepted


def test_rfc3834_never_answers_null_daemons_lists_bulk_or_auto_submitted(site):
    site.write_config(f'[vacation.bob]\nstart = {days(-1)}\nend = {days(1)}\nbody = "Back soon."\n')
    site.start()
    cases = [("list@lists.test", {"List-Id": "<talk.lists.test>"}),
             ("news@shop.test", {"Precedence": "bulk"}),
             ("l2@lists.test", {"Precedence": "list"}),
             ("j@junk.test", {"Precedence": "junk"}),
             ("robot@svc.test", {"Auto-Submitted": "auto-generated"}),
             ("other@svc.test", {"Auto-Submitted": "auto-replied"}),
             ("MAILER-DAEMON@mx.test", {}),
             ("owner-talk@lists.test", {}),
             ("talk-request@lists.test", {})]
    for sender, headers in cases:
        send(site, sender, "bob@office.test", f"from {sender}", headers=headers)
    # The null sender (a bounce), by sendmail -f '' (gateway.smtp.server answers RCPT after MAIL FROM:<> with 503).
    r = site.cli("sendmail", "-f", "", "bob@office.test", input=message("MAILER-DAEMON@mx.test", "bob", "a bounce"))
    assert r.returncode == 0, r.stderr.decode()
    send(site, "person@outside.test", "bob@office.test", "from a person", headers={"Auto-Submitted": "no"})
    settled(site)
    assert len(pop3(site, "bob")) == len(cases) + 2
    out = autoreplies(site)
    assert [m.recipients[0].rcpt for m in out] == ["person@outside.test"]
    log = site.log()
    for why in ("List-* header", "Precedence: bulk", "Precedence: junk", "Auto-Submitted: auto-generated",
                "sender is a daemon or list address"):
        assert why in log, why


def test_vacation_dates_from_config(site):
    site.write_config(f"""
[vacation.alice]
start = {days(-2)}
end = {days(2)}
subject = "Alice is away"
body = "I am on holiday until next week."

[vacation.bob]
start = {days(-10)}
end = {days(-3)}
body = "That trip is over."
""")
    site.start()
    send(site, "x@outside.test", ["alice@office.test", "bob@office.test"], "hello both")
    settled(site)
    out = autoreplies(site)
    assert len(out) == 1
    with queue_of(site).open_body(out[0].id) as f:
        reply = f.read()
    assert b"From: alice@office.test" in reply and b"Subject: Alice is away" in reply
    assert b"Auto-Submitted: auto-replied" in reply and b"I am on holiday" in reply


def test_vacation_managed_from_the_cli_and_remembered_across_restarts(site):
    text = site.dir / "away.txt"
    text.write_text("Out until Monday.\n")
    r = site.cli("users", "vacation", "bob", "--start", days(-1), "--end", days(3), "--subject", "Away",
                 "--message-file", str(text))
    assert r.returncode == 0, r.stderr.decode()
    assert "on" in site.cli("users", "vacation", "bob", "--show").stdout.decode()
    site.start()
    send(site, "alice@office.test", "bob@office.test", "lunch?")
    settled(site)
    assert subjects(pop3(site, "alice")) == ["Away"]
    site.stop()
    site.start()
    send(site, "alice@office.test", "bob@office.test", "lunch tomorrow?")  # answered already: no second reply
    settled(site)
    assert subjects(pop3(site, "alice")) == ["Away"]
    assert site.cli("users", "vacation", "bob", "--off").returncode == 0
    send(site, "carol@outside.test", "bob@office.test", "hi bob")
    settled(site)
    assert autoreplies(site) == []
    assert site.cli("users", "vacation", "nobody", "--off").returncode == 64


def test_two_autoresponders_facing_each_other_exchange_at_most_one_message_each(site):
    site.write_config(f"""
[vacation.alice]
start = {days(-1)}
end = {days(1)}
subject = "alice is away"
body = "Away."

[vacation.bob]
start = {days(-1)}
end = {days(1)}
subject = "bob is away"
body = "Away too."
""")
    site.start()
    send(site, "alice@office.test", "bob@office.test", "from alice")
    send(site, "bob@office.test", "alice@office.test", "from bob")
    settled(site)
    alice, bob = pop3(site, "alice"), pop3(site, "bob")
    print("alice:", subjects(alice), "bob:", subjects(bob))
    assert subjects(alice) == ["bob is away", "from bob"]
    assert subjects(bob) == ["alice is away", "from alice"]
    # Each reply reached a responder and was not answered: null envelope sender, Auto-Submitted.
    assert site.log().count("no automatic reply") == 2 and "null sender" in site.log()


def test_forged_senders_from_outside_get_no_automatic_reply_but_lan_and_auth_do(site, smtp_sink):
    """Five unauthenticated messages from forged senders to an autoresponder and a user on
    vacation produced ten replies to the forged addresses through the smarthost."""
    import smtplib
    doc = site.dir / "reply.eml"
    doc.write_text("Subject: Thanks\n\nWe got your mail.\n")
    site.write_config(f"""
[smarthost]
host = "127.0.0.1"
port = {smtp_sink.port}
starttls = "off"

[autoreply."info@office.test"]
file = "{doc}"

[vacation.bob]
subject = "Away"
body = "Back on Monday."
""")
    site.start()
    for i in range(5):  # from 127.0.0.2, outside mynetworks, no AUTH
        with smtplib.SMTP("127.0.0.1", site.smtp_port, source_address=("127.0.0.2", 0), timeout=30) as c:
            c.sendmail(f"victim{i}@forged.test", ["info@office.test", "bob@office.test"],
                       f"From: victim{i}@forged.test\r\nTo: info@office.test, bob@office.test\r\n"
                       f"Subject: spam {i}\r\n\r\nhi\r\n")
    with smtplib.SMTP("127.0.0.1", site.smtp_port, source_address=("127.0.0.2", 0), timeout=30) as c:
        c.login("alice", "alice-pw")  # a logged-in user outside the LAN: a real colleague
        c.sendmail("alice@office.test", ["bob@office.test"], "To: bob@office.test\r\nSubject: from alice\r\n\r\nhi\r\n")
    with smtplib.SMTP("127.0.0.1", site.smtp_port, timeout=30) as c:  # 127.0.0.1: in mynetworks
        c.sendmail("partner@lan.test", ["info@office.test"], "To: info@office.test\r\nSubject: from the LAN\r\n\r\nhi\r\n")
    settled(site)
    q = queue_of(site)
    try:
        replies = sorted(r.rcpt for m in q.messages() if m.origin == "autoreply" for r in m.recipients)
    finally:
        q.cat.close()
    assert replies == ["partner@lan.test"]  # alice's reply went into her mailbox (local)
    assert any(m["Subject"] == "Away" for m in pop3(site, "alice"))
    assert site.log().count("its sender may be forged") == 10


def test_no_reply_unless_the_recipient_is_named_in_to_or_cc(site):
    # RFC 3834 §2: an out-of-office answers only mail that names its user (or an alias of
    # the user) in To/Cc/Bcc; an old-style list without List-* headers names only itself.
    site.write_config(f"""
[aliases]
robert = ["bob"]

[vacation.bob]
start = {days(-1)}
end = {days(1)}
body = "Back soon."
""")
    site.start()
    for who, to in (("lister@outside.test", "talk@lists.test"), ("alias@outside.test", "Robert <robert@office.test>"),
                     ("cc@outside.test", None)):
        m = message(who, to or "someone@outside.test", f"from {who}",
                    headers={"Cc": "Bob <BOB@Office.Test>"} if to is None else None)
        assert submit(site, who, ["bob@office.test"], m).accepted
    settled(site)
    assert len(pop3(site, "bob")) == 3
    assert sorted(m.recipients[0].rcpt for m in autoreplies(site)) == ["alias@outside.test", "cc@outside.test"]
    assert "not addressed to bob@office.test in To/Cc/Bcc" in site.log()


def test_the_reply_subject_carries_the_original_unless_the_admin_fixed_one(site):
    # RFC 3834 §3.1.5: "Auto:" followed by the subject of the message answered.
    site.write_config(f"""
[vacation.bob]
start = {days(-1)}
end = {days(1)}
body = "Back soon."

[vacation.alice]
start = {days(-1)}
end = {days(1)}
subject = "Alice is away"
body = "Back soon."
""")
    site.start()
    send(site, "carol@outside.test", "bob@office.test", "Lunch on Friday?")
    send(site, "carol@outside.test", "alice@office.test", "Lunch on Friday?")
    settled(site)
    q = queue_of(site)
    try:
        replies = []
        for m in autoreplies(site):
            with q.open_body(m.id) as f:
                replies.append(email.message_from_bytes(f.read()))
    finally:
        q.cat.close()
    assert sorted((r["From"], r["Subject"]) for r in replies) == [
        ("alice@office.test", "Alice is away"), ("bob@office.test", "Auto: Lunch on Friday?")]
