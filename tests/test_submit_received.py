"""Our Received: header (RFC 5321 §4.4): from what the client said, to what is stored."""
import re

import pytest

from gateway.smtp.received import Received, address_literal, protocol
from tests.harness import wait_for
from tests.test_submit import swaks
from tests.test_submit_replies import Wire

pytestmark = pytest.mark.timeout(60)

DATE = "Sat, 28 Nov 2026 10:00:00 +0100"


def stored_received(site, helo: bytes, *, ehlo: bool, utf8: bool = False, auth: bool = False) -> bytes:
    """Send one message to alice after ``helo``; our Received: header as alice's mail holds it."""
    w = Wire(site.smtp_port)
    w.say((b"EHLO " if ehlo else b"HELO ") + helo)
    if auth:
        assert w.say(b"AUTH PLAIN AGFsaWNlAGFsaWNlLXB3").startswith(b"235 ")
    assert w.say(b"MAIL FROM:<a@outside.test>" + (b" SMTPUTF8" if utf8 else b"")).startswith(b"250 ")
    assert w.say(b"RCPT TO:<alice@office.test>").startswith(b"250 ")
    assert w.say(b"DATA").startswith(b"354 ")
    w.sock.sendall(b"Subject: trace\r\n\r\nhi\r\n.\r\n")
    assert w.reply().startswith(b"250 ")
    w.say(b"QUIT")
    w.close()
    mail = wait_for(lambda: site.mail_of("alice"), what="alice's mail")[0]
    for p in site.maildir("alice").messages():
        p.unlink()
    start = mail.index(b"Received: ")
    end = re.compile(rb"\r\n(?![ \t])").search(mail, start).end()
    return re.sub(rb";\r\n\t[^\r]+\r\n$", b";\r\n\tDATE\r\n", mail[start:end])


def test_an_unbalanced_helo_argument_goes_in_a_closed_comment(running):
    got = stored_received(running, b"my laptop (home", ehlo=False)
    assert got == (b"Received: from [127.0.0.1]\r\n\t(helo=my laptop \\(home)\r\n"
                   b"\tby mail.office.test (dialmail) with SMTP\r\n\tfor <alice@office.test>;\r\n\tDATE\r\n")


def test_the_with_keyword_names_the_protocol_the_client_used(running):
    expect = (b"Received: from client.test ([127.0.0.1])\r\n\tby mail.office.test (dialmail) with %s\r\n"
              b"\tfor <alice@office.test>;\r\n\tDATE\r\n")
    assert stored_received(running, b"client.test", ehlo=False) == expect % b"SMTP"
    assert stored_received(running, b"client.test", ehlo=True) == expect % b"ESMTP"
    assert stored_received(running, b"client.test", ehlo=True, auth=True) == expect % b"ESMTPA"
    assert stored_received(running, b"client.test", ehlo=True, utf8=True) == expect % b"UTF8SMTP"
    assert stored_received(running, b"[127.0.0.1]", ehlo=True) == \
        expect.replace(b"client.test", b"[127.0.0.1]") % b"ESMTP"


def test_address_literals_for_ipv4_ipv6_and_mapped_clients():
    assert address_literal("192.0.2.7") == "[192.0.2.7]"
    assert address_literal("::1") == "[IPv6:::1]"
    assert address_literal("2001:DB8:0:0::1") == "[IPv6:2001:db8::1]"
    assert address_literal("::ffff:192.0.2.7") == "[192.0.2.7]"
    assert address_literal("fe80::1%eth0") == "[IPv6:fe80::1]"


def test_an_ipv6_client_and_its_helo_literal():
    r = Received("[IPv6:2001:db8::1]", "2001:db8::1", "mail.office.test", "ESMTPS", DATE)
    assert r.header() == ("Received: from [IPv6:2001:db8::1] ([IPv6:2001:db8::1])\r\n"
                          "\tby mail.office.test (dialmail) with ESMTPS;\r\n\t" + DATE + "\r\n")
    bogus = Received("[IPv6:nonsense] (x", "::1", "mail.office.test", "ESMTP", DATE)
    assert bogus.header().startswith("Received: from [IPv6:::1]\r\n\t(helo=[IPv6:nonsense] \\(x)\r\n")


def test_rfc_3848_and_6531_protocol_names():
    assert [protocol(False, tls, auth, False) for tls in (False, True) for auth in (False, True)] == ["SMTP"] * 4
    assert [protocol(True, tls, auth, False) for tls in (False, True) for auth in (False, True)] == \
        ["ESMTP", "ESMTPA", "ESMTPS", "ESMTPSA"]
    assert [protocol(True, tls, auth, True) for tls in (False, True) for auth in (False, True)] == \
        ["UTF8SMTP", "UTF8SMTPA", "UTF8SMTPS", "UTF8SMTPSA"]


def test_swaks_with_an_unbalanced_helo_gets_a_well_formed_trace_and_coded_replies(running):
    r = swaks(running, "--helo", "my laptop (home", "--to", "alice@office.test", "--from", "x@office.test",
              "--header", "Subject: swaks trace")
    assert r.returncode == 0, r.stdout + r.stderr
    for line in ("<-  250 2.1.0 Ok", "<-  250 2.1.5 Ok", "<-  354 End data with <CR><LF>.<CR><LF>",
                 "<-  221 2.0.0 Bye"):
        assert line in r.stdout.splitlines(), r.stdout
    mail = wait_for(lambda: running.mail_of("alice"), what="alice's mail")[0]
    assert b"Received: from [127.0.0.1]\r\n\t(helo=my laptop \\(home)\r\n\tby mail.office.test (dialmail) with ESMTP" \
        in mail
