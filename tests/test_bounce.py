"""Bounces, delay warnings and expiry: RFC 3464 reports that real parsers understand."""
from __future__ import annotations

import asyncio
import email
import email.policy
import time

import pytest
from flufl.bounce import scan_message

from gateway.mail import dsn, outcome
from gateway.office import bounce
from gateway.relay.expiry import expire
from gateway.relay.flush import flush
from spool.clock import ClockSteps, ClockWatch, Step
from spool.queue import BOUNCED, DEFERRED, DELIVERED, LOCAL, RELAY, Catalogue, Queue
from tests.harness import wait_for
from tests.test_relay import Office, message

DAY = 86400


@pytest.fixture
def office(tmp_path):
    o = Office(tmp_path / "office", 9)  # port 9: nothing is ever sent in these tests
    yield o
    o.queue.cat.close()


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def notices(o: Office) -> list:
    return [m for m in o.queue.messages() if m.origin == bounce.ORIGIN]


def notice_of(o: Office, m) -> email.message.EmailMessage:
    return parse(o.queue.body_path(m.id).read_bytes())


def test_dsn_is_a_valid_multipart_report():
    headers = b"From: Alice <alice@office.test>\r\nTo: x@example.com\r\nSubject: the original\r\n\r\nbody not returned\r\n"
    data = bytes(dsn.build(hostname="mail.office.test", sender="alice@office.test", qid="Q1", arrival=time.time() - 60,
                            action=dsn.FAILED, original_headers=headers, entries=[
                                dsn.Entry("x@example.com", None, "5.1.1", "550 5.1.1 no such user"),
                                dsn.Entry("y@example.com", "list@office.test", "5.2.2", "552 5.2.2 mailbox full")]))
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF only
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"].addresses[0].addr_spec == "alice@office.test" and "MAILER-DAEMON@mail.office.test" in msg["From"]
    assert msg["Auto-Submitted"] == "auto-replied"
    text, status, original = msg.get_payload()
    assert text.get_content_type() == "text/plain" and "x@example.com" in text.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, *per_rcpt = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mail.office.test" and per_message["Arrival-Date"]
    assert [(b["Final-Recipient"], b["Action"], b["Status"], b["Diagnostic-Code"]) for b in per_rcpt] == [
        ("rfc822; x@example.com", "failed", "5.1.1", "smtp; 550 5.1.1 no such user"),
        ("rfc822; y@example.com", "failed", "5.2.2", "smtp; 552 5.2.2 mailbox full")]
    assert per_rcpt[1]["Original-Recipient"] == "rfc822; list@office.test"
    assert original.get_content_type() == "text/rfc822-headers"
    assert b"Subject: the original" in original.as_bytes() and b"body not returned" not in data
    assert scan_message(msg) == {b"x@example.com", b"list@office.test"}


def test_bounce_of_a_bounce_is_never_sent_but_kept_whole_for_the_postmaster(office):
    qid = office.send("", ["gone@example.com"], message("a bounce", sender="MAILER-DAEMON@mail.office.test"))
    office.queue.record(qid, "gone@example.com", BOUNCED, 550, "5.1.1 no such user")
    settled = bounce.settle(office.cfg, office.queue, qid)
    assert settled.removed and settled.bounce_id and settled.local
    assert not office.queue.body_path(qid).exists()
    [report] = office.queue.messages()
    assert (report.sender, report.origin) == ("", bounce.DOUBLE_BOUNCE)
    assert [(r.rcpt, r.route) for r in report.recipients] == [("postmaster@office.test", LOCAL)]
    with office.queue.open_body(report.id) as f:
        data = f.read()
    assert b"Content-Type: message/rfc822" in data and b"Subject: a bounce" in data
    assert data.rstrip().endswith(b"--")


def test_bounced_recipients_reported_once_while_others_wait(office):
    qid = office.send("alice@office.test", ["a@example.com", "b@example.com", "c@example.com"], message("three"))
    office.queue.record(qid, "a@example.com", BOUNCED, 550, "5.1.1 no such user")
    office.queue.record(qid, "b@example.com", DEFERRED, 450, "4.2.0 try later")
    first = bounce.settle(office.cfg, office.queue, qid)
    assert first.bounce_id and not first.removed and first.local
    assert bounce.settle(office.cfg, office.queue, qid).bounce_id is None  # nothing new: no second notice
    office.queue.record(qid, "b@example.com", BOUNCED, 550, "5.7.1 refused")
    office.queue.record(qid, "c@example.com", DELIVERED, 250, "2.0.0 ok")
    last = bounce.settle(office.cfg, office.queue, qid)
    assert last.removed and last.bounce_id
    assert office.queue.get(qid) is None
    reports = [scan_message(notice_of(office, m)) for m in notices(office)]
    assert reports == [{b"a@example.com"}, {b"b@example.com"}]
    office.deliver_local()
    assert len(office.mailbox("alice")) == 2


def test_failure_while_removing_leaves_neither_bounce_nor_loss(office):
    qid = office.send("alice@office.test", ["x@example.com"], message("atomic"))
    office.queue.record(qid, "x@example.com", BOUNCED, 550, "5.1.1 no such user")
    # the removal fails inside the transaction that also queues the bounce (as a crash would)
    office.queue.cat.execute("CREATE TEMP TRIGGER power_cut BEFORE DELETE ON messages "
                             "BEGIN SELECT RAISE(ABORT, 'power cut'); END")
    with pytest.raises(Exception, match="power cut"):
        bounce.settle(office.cfg, office.queue, qid)
    assert [m.id for m in office.queue.messages()] == [qid]
    assert sorted(p.name for p in office.queue.msg.iterdir()) == [qid]  # no stray bounce body either
    office.queue.cat.execute("DROP TRIGGER power_cut")
    settled = bounce.settle(office.cfg, office.queue, qid)
    assert settled.removed and settled.bounce_id
    assert [m.id for m in office.queue.messages()] == [settled.bounce_id]
    assert bounce.settle(office.cfg, office.queue, qid).bounce_id is None


def test_unknown_local_recipient_bounces_to_outside_sender(office):
    qid = office.send("friend@example.com", ["nosuch@office.test", "bob@office.test"],
                      message("hello office", sender="friend@example.com", to="nosuch@office.test"))
    office.deliver_local()
    assert office.queue.get(qid) is None and len(office.mailbox("bob")) == 1
    [n] = notices(office)
    assert n.sender == "" and [(r.rcpt, r.route) for r in n.recipients] == [("friend@example.com", RELAY)]
    assert scan_message(notice_of(office, n)) == {b"nosuch@office.test"}


def test_expiry_and_one_delay_warning_with_injected_clock(office):
    qid = office.send("alice@office.test", ["slow@example.com"], message("slow"))
    arrival = office.queue.get(qid).arrival
    office.queue.record(qid, "slow@example.com", DEFERRED, 451, "4.3.0 server busy", next_retry=arrival + 300)

    assert not expire(office.cfg, office.queue, arrival + 3 * 3600).warned
    first = expire(office.cfg, office.queue, arrival + 5 * 3600)
    assert first.warned == [qid] and first.local_notices == 1 and bool(first)
    assert not expire(office.cfg, office.queue, arrival + 6 * 3600).warned  # only one warning
    [warning] = notices(office)
    w = notice_of(office, warning)
    assert "Delayed Mail" in w["Subject"]
    block = w.get_payload()[1].get_payload()[1]
    assert (block["Action"], block["Status"]) == ("delayed", "4.3.0") and block["Will-Retry-Until"]
    assert scan_message(w) == set()  # a warning is not a failure
    office.deliver_local()

    assert not expire(office.cfg, office.queue, arrival + 4 * DAY - 1).bounced
    done = expire(office.cfg, office.queue, arrival + 4 * DAY + 1)
    assert done.bounced == [qid] and office.queue.get(qid) is None
    failure = notice_of(office, notices(office)[0])
    assert scan_message(failure) == {b"slow@example.com"}
    block = failure.get_payload()[1].get_payload()[1]
    # as Postfix's expiry bounces: the last temporary error's status and the server's own
    # reply, whose classes agree (4.3.0 with 451), under Action: failed
    assert (block["Action"], block["Status"]) == ("failed", "4.3.0")
    assert " ".join(block["Diagnostic-Code"].split()) == \
        "smtp; 451 4.3.0 server busy (message expired after 4 days in the queue)"
    office.deliver_local()
    assert [m["Subject"] for m in office.mailbox("alice")] == ["Delayed Mail (still being retried)",
                                                               "Undelivered Mail Returned to Sender"]


def test_being_offline_never_bounces_before_the_lifetime(office):
    qid = office.send("alice@office.test", ["later@example.com"], message("offline"))
    arrival = office.queue.get(qid).arrival
    assert not expire(office.cfg, office.queue, arrival + 3 * DAY).bounced
    assert office.queue.get(qid).recipients[0].status == "queued"


def test_held_message_neither_expires_nor_warns(office):
    qid = office.send("alice@office.test", ["x@example.com"], message("held"))
    office.queue.set_hold(qid, True)
    result = expire(office.cfg, office.queue, time.time() + 10 * DAY)
    assert not result.bounced and not result.warned and office.queue.get(qid) is not None


def test_flush_expires_before_sending(office):
    qid = office.send("alice@office.test", ["x@example.com"], message("old"))
    result = asyncio.run(flush(office.cfg, office.queue, clock=lambda: time.time() + 5 * DAY))
    assert result.expired == 1 and result.sent == 0 and result.error is None  # nothing left to connect for
    assert office.queue.get(qid) is None


def test_a_forward_clock_step_bounces_and_warns_nothing_early(office):
    qid = office.send("alice@office.test", ["far@example.com"], message("queued for minutes"))
    arrival = office.queue.get(qid).arrival
    watch = ClockWatch(office.queue.cat, boot="boot-1")  # what the daemon's scheduler runs every second
    watch.observe(arrival + 60, 1000.0)
    jumped = arrival + 5 * DAY + 70
    assert watch.observe(jumped, 1010.0).seconds == 5 * DAY  # ten real seconds; five days on the wall

    result = expire(office.cfg, office.queue, jumped)
    assert not result.bounced and not result.warned and not notices(office)
    flushed = asyncio.run(flush(office.cfg, office.queue, clock=lambda: jumped))  # port 9: nobody answers
    assert flushed.expired == 0 and office.queue.get(qid).recipients[0].status == DEFERRED  # still waiting

    # Four days of real time later the message has been queued four days by both clocks.
    watch.observe(jumped + 4 * DAY - 80, 1000.0 + 4 * DAY - 70)
    almost = expire(office.cfg, office.queue, jumped + 4 * DAY - 80)
    assert not almost.bounced and almost.warned == [qid]  # it has really waited long enough for a warning
    office.deliver_local()
    watch.observe(jumped + 4 * DAY - 60, 1000.0 + 4 * DAY - 50)
    assert expire(office.cfg, office.queue, jumped + 4 * DAY - 60).bounced == [qid]
    office.deliver_local()
    expire(office.cfg, office.queue, jumped + 4 * DAY)
    assert ClockSteps(office.queue.cat).all() == []  # no message left that lived through the step


def test_mail_queued_after_a_forward_step_expires_on_time(office):
    old = office.send("alice@office.test", ["a@example.com"], message("before the step"))
    arrival = office.queue.get(old).arrival
    ClockSteps(office.queue.cat).record(Step(before=arrival, seconds=2 * DAY))  # right after it arrived
    new = office.send("alice@office.test", ["b@example.com"], message("after the step"))
    assert office.queue.get(new).arrival > arrival
    later = office.queue.get(new).arrival + 4 * DAY + 1
    assert expire(office.cfg, office.queue, later).bounced == [new]
    assert office.queue.get(old) is not None  # two days of this one's wall-clock age were the step


def test_a_backward_clock_step_never_bounces_sooner(office):
    qid = office.send("alice@office.test", ["x@example.com"], message("stepped back"))
    arrival = office.queue.get(qid).arrival
    watch = ClockWatch(office.queue.cat, boot="boot-1")
    watch.observe(arrival + 3 * DAY, 1000.0)
    watch.observe(arrival + 2 * DAY, 1010.0)  # a day back: the wall clock is now the slower one
    assert not expire(office.cfg, office.queue, arrival + 4 * DAY - 1).bounced  # real time says 5 days
    office.deliver_local()  # the delay warning
    assert expire(office.cfg, office.queue, arrival + 4 * DAY + 1).bounced == [qid]


def test_a_retry_time_set_before_a_step_back_does_not_hold_the_mail(office):
    # Deferred while the clock ran a day fast: its next try is "tomorrow" for the corrected clock.
    late = office.send("alice@office.test", ["late@example.com"], message("deferred a day ahead"))
    soon = office.send("alice@office.test", ["soon@example.com"], message("deferred an hour"))
    now = time.time()
    office.queue.record(late, "late@example.com", DEFERRED, 451, "4.3.0 busy", next_retry=now + DAY + 300)
    office.queue.record(soon, "soon@example.com", DEFERRED, 451, "4.3.0 busy", next_retry=now + 3600)
    result = asyncio.run(flush(office.cfg, office.queue, clock=lambda: now))  # port 9: nobody answers
    # retry_max is 4 hours: no back-off runs a day, so that one is due; the hour's back-off stands.
    assert [r.rcpt for r in result.results] == ["late@example.com"]


def test_administrator_bounce(office):
    qid = office.send("alice@office.test", ["x@example.com", "y@example.com"], message("admin"))
    office.queue.record(qid, "y@example.com", DELIVERED, 250, "2.0.0 ok")
    settled = bounce.bounce_now(office.cfg, office.queue, qid, outcome.administrator_bounce())
    assert settled.removed and settled.local
    n = notice_of(office, notices(office)[0])
    assert scan_message(n) == {b"x@example.com"}
    assert "deleted by the administrator" in n.as_string()


# ---------------------------------------------------------------- the CLI, end to end


@pytest.mark.peer
def test_cli_queue_bounce_and_flush(site, smtp_sink):
    site.write_config(f"""
        [smarthost]
        host = "127.0.0.1"
        port = {smtp_sink.port}
        starttls = "off"
        """)
    q = Queue(Catalogue(site.spool))
    doomed = q.enqueue("alice@office.test", [("x@example.com", RELAY)], message("doomed"), origin="smtp")
    going = q.enqueue("alice@office.test", [("y@example.com", RELAY), ("bob@office.test", LOCAL)],
                      message("going"), origin="smtp")
    r = site.cli("queue", "bounce", doomed)
    assert r.returncode == 0, r.stderr
    assert f"{doomed}: bounced" in r.stdout.decode()
    mail = wait_for(lambda: site.mail_of("alice"), what="the bounce in alice's mailbox")
    assert scan_message(parse(mail[0])) == {b"x@example.com"}

    r = site.cli("queue", "flush")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert f"{going} <y@example.com> delivered: 250" in out and "1 delivered, 0 deferred, 0 bounced" in out
    assert [m.rcpts for m in smtp_sink.wait_messages(1)] == [["y@example.com"]]


def test_a_message_left_final_by_a_kill_is_settled_by_the_next_delivery_pass(office):
    """kill -9 between recording the last outcome and settling left a fully delivered
    message in the queue for good (the kill torture's "queue did not drain")."""
    done = office.send("alice@example.com", ["bob@office.test"], message("delivered, not settled"))
    office.queue.record(done, "bob@office.test", DELIVERED, 250, "2.0.0 delivered to mailbox")
    failed = office.send("alice@office.test", ["x@example.com"], message("bounced, nobody told"))
    office.queue.record(failed, "x@example.com", BOUNCED, 550, "5.1.1 no such user")
    assert sorted(office.queue.finished()) == sorted([done, failed])
    office.deliver_local()  # a restarted daemon's first pass
    assert office.queue.get(done) is None and office.queue.get(failed) is None
    [bounce_msg] = office.mailbox("alice")  # the bounce alice never got, delivered
    assert bounce_msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert office.queue.messages() == []


def test_mail_from_a_stranger_that_cannot_be_delivered_is_kept_not_bounced_to_a_forged_sender(office):
    """Backscatter: a client outside mynetworks without AUTH can forge any sender, so a
    local failure of its mail goes to review instead of to that sender."""
    qid = office.send("victim@example.com", ["nosuch@office.test"], message("forged"), client="203.0.113.9")
    office.deliver_local()
    assert office.queue.get(qid) is None and notices(office) == []
    [kept] = office.mailbox("postmaster")
    assert "nosuch@office.test" in kept["X-Dialmail-Review"]


def test_a_dsn_about_a_utf8_recipient_uses_the_rfc_6533_global_types():
    headers = "From: Jörg <jörg@office.test>\r\nTo: jürgen@bücher.example\r\nSubject: Grüße\r\n\r\n".encode()
    data = bytes(dsn.build(hostname="mail.office.test", sender="jörg@office.test", qid="Q1", arrival=time.time(),
                            action=dsn.FAILED, original_headers=headers, entries=[
                                dsn.Entry("jürgen@bücher.example", None, "5.1.1", "550 5.1.1 no such user")]))
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "global-delivery-status"
    text, status, original = msg.get_payload()
    assert status.get_content_type() == "message/global-delivery-status"
    # RFC 6533 §6.2: a UTF-8 body of header-like blocks; the address type is utf-8 (§3)
    raw = data.split(b"Content-Type: message/global-delivery-status\r\n")[1].split(b"\r\n\r\n", 1)[1]
    blocks = raw.split(b"\r\n--")[0].decode("utf-8").split("\r\n\r\n")
    per_message, per_rcpt = (email.message_from_string(b, policy=email.policy.default) for b in blocks if b.strip())
    assert per_message["Reporting-MTA"] == "dns; mail.office.test"
    assert (per_rcpt["Final-Recipient"], per_rcpt["Action"], per_rcpt["Status"]) == \
        ("utf-8; jürgen@bücher.example", "failed", "5.1.1")
    assert original.get_content_type() == "message/global-headers"
    assert "Subject: Grüße".encode() in original.as_bytes()
    # the same report for an ASCII recipient keeps the RFC 3464 types
    ascii_report = parse(bytes(dsn.build(hostname="mail.office.test", sender="alice@office.test", qid="Q2",
                                         arrival=time.time(), action=dsn.FAILED, original_headers=b"Subject: x\r\n\r\n",
                                         entries=[dsn.Entry("x@example.com", None, "5.1.1", None)])))
    assert [p.get_content_type() for p in ascii_report.get_payload()] == \
        ["text/plain", "message/delivery-status", "text/rfc822-headers"]


def test_a_refusal_dialmail_made_itself_claims_no_smtp_reply(office):
    # Mail that expired without ever reaching a server, and a refusal made here: no server
    # said these, so the Diagnostic-Code is dialmail's own (as Postfix writes X-Postfix;).
    never = office.send("alice@office.test", ["never@example.com"], message("never tried"))
    arrival = office.queue.get(never).arrival
    expire(office.cfg, office.queue, arrival + 4 * DAY + 1)
    blocks = {}
    for n in notices(office):
        report = notice_of(office, n)
        if "Undelivered" in report["Subject"]:
            for b in report.get_payload()[1].get_payload()[1:]:
                blocks[b["Final-Recipient"]] = (b["Status"], " ".join(b["Diagnostic-Code"].split()))
    assert blocks["rfc822; never@example.com"] == ("4.4.7", "X-Dialmail; message expired after 4 days in the queue")
    qid = office.send("alice@office.test", ["jörg@example.com"], message("umlaut"))
    office.queue.record_outcomes(qid, {"jörg@example.com": outcome.smtputf8_not_offered("127.0.0.1:25")})
    bounce.settle(office.cfg, office.queue, qid)
    [report] = [notice_of(office, n) for n in notices(office)
                if "jörg@example.com".encode() in office.queue.body_path(n.id).read_bytes()]
    raw = report.as_bytes()
    assert "Diagnostic-Code: X-Dialmail; the message needs SMTPUTF8".encode() in raw, raw
    assert b"smtp; 553" not in raw
