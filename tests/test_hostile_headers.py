"""Raw 8-bit header values (a Latin-1 Subject, bytes that are not UTF-8) must not keep
a message out of the spool: they were refused by SQLite as surrogate escapes, which made
SMTP answer 500 and the fetch stop at such a message every session."""
import smtplib

from spool.queue import LOCAL, Catalogue, Queue
from tests.harness import wait_for

RAW = b"Subject: caf\xe9 \xc3\x28\r\nMessage-ID: <\xff@x>\r\nFrom: x@outside.test\r\n\r\nbody\r\n"


def test_queue_takes_header_values_with_surrogate_escapes(tmp_path):
    cat = Catalogue(tmp_path)
    try:
        q = Queue(cat)
        subject = b"caf\xe9 \xc3\x28".decode("ascii", "surrogateescape")
        qid = q.enqueue("", [("alice@office.test", LOCAL)], RAW, origin="fetch", subject=subject,
                        message_id="<\udcff@x>")
        msg = q.get(qid)
        assert msg.subject == "caf\ufffd \ufffd(" and msg.message_id == "<\ufffd@x>"
        assert (q.msg / qid).read_bytes() == RAW  # the message itself is untouched
    finally:
        cat.close()


def test_smtp_takes_a_message_with_a_raw_8bit_subject(running):
    c = smtplib.SMTP("127.0.0.1", running.smtp_port, timeout=30)
    c.ehlo("lan.test")
    code, reply = c.docmd("MAIL FROM:<x@outside.test>")
    assert code == 250
    assert c.docmd("RCPT TO:<alice@office.test>")[0] == 250
    assert c.docmd("DATA")[0] == 354
    c.send(RAW + b".\r\n")
    code, reply = c.getreply()
    c.quit()
    assert code == 250, reply
    mail = wait_for(lambda: running.mail_of("alice"), timeout=20, what="delivery")
    assert b"caf\xe9 \xc3\x28" in mail[0]
