"""What a LAN client submits reaches the smarthost as it was given: a real `dialmail run`,
Python's smtplib as the client, `dialmail connect-now` over an always-on link, Postfix's
smtp-sink as the smarthost."""
import smtplib

import pytest

pytestmark = [pytest.mark.timeout(120), pytest.mark.peer]


def with_smarthost(site, sink) -> None:
    site.write_config(f"""
[smarthost]
host = "127.0.0.1"
port = {sink.port}
starttls = "off"
""")
    site.start()


def flush(site) -> None:
    r = site.cli("connect-now", timeout=90)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


def test_a_quoted_local_part_is_accepted_and_relayed_byte_exact(site, smtp_sink):
    # RFC 5321 §4.1.2: Local-part = Dot-string / Quoted-string.  A quoted string with a
    # space and a quoted pair is a valid address and goes out exactly as the client wrote it.
    with_smarthost(site, smtp_sink)
    c = smtplib.SMTP("127.0.0.1", site.smtp_port, timeout=30)
    c.ehlo("client.test")
    c.mail("alice@office.test")
    assert c.docmd('RCPT TO:<"john doe"@remote.example>') == (250, b"2.1.5 Ok")
    assert c.docmd('RCPT TO:<"a\\"b"@remote.example>') == (250, b"2.1.5 Ok")
    # routing characters stay refused inside quotes too, as in a dot-atom
    assert c.docmd('RCPT TO:<"victim@elsewhere.test"@remote.example>')[0] == 553
    assert c.docmd('RCPT TO:<"victim%elsewhere.test"@remote.example>')[0] == 553
    assert c.docmd('RCPT TO:<"john doe"@[192.0.2.1]>')[0] == 553
    c.data(b"Subject: quoted\r\n\r\nhello\r\n")
    c.quit()
    flush(site)
    got = smtp_sink.wait_messages(1)[0]
    assert sorted(got.rcpts) == ['"a\\"b"@remote.example', '"john doe"@remote.example']


def test_a_utf8_message_is_stored_and_relayed_with_smtputf8(site, postfix_smarthost):
    # RFC 6531: taken with the SMTPUTF8 parameter and passed on with it, bytes unchanged, to
    # a real Postfix with smtputf8_enable = yes (smtp-sink never offers SMTPUTF8).
    postfix_smarthost.set_params(smtputf8_enable="yes")
    with_smarthost(site, postfix_smarthost)
    data = ("From: Jörg <jörg@office.test>\r\nTo: jürgen@bücher.example\r\nSubject: Grüße\r\n"
            "Date: Sat, 28 Nov 2026 10:00:00 +0100\r\nMessage-ID: <grüße@office.test>\r\n\r\nHallo\r\n").encode()
    c = smtplib.SMTP("127.0.0.1", site.smtp_port, timeout=30)
    c.ehlo("client.test")
    assert c.mail("jörg@office.test", ["SMTPUTF8"]) == (250, b"2.1.0 Ok")
    assert c.rcpt("jürgen@bücher.example") == (250, b"2.1.5 Ok")
    assert c.data(data)[0] == 250
    c.quit()
    flush(site)
    got = postfix_smarthost.wait_delivered(1)[0]
    head = got.raw.split(b"\n\n", 1)[0].split(b"\n")
    assert "X-Original-To: jürgen@bücher.example".encode() in head
    assert "Return-Path: <jörg@office.test>".encode() in head
    assert got.raw.endswith(data.replace(b"\r\n", b"\n"))


def test_quoted_local_part_passes_a_strict_postfix_byte_exact(site, postfix_smarthost):
    # The smarthost as strict as Postfix gets about envelopes and HELO: it takes what
    # dialmail relays, and the quoted local part arrives as the client wrote it.
    postfix_smarthost.set_params(strict_rfc821_envelopes="yes", smtpd_helo_required="yes",
                                 smtpd_helo_restrictions="reject_non_fqdn_helo_hostname")
    with_smarthost(site, postfix_smarthost)
    c = smtplib.SMTP("127.0.0.1", site.smtp_port, timeout=30)
    c.ehlo("client.test")
    c.mail("alice@office.test")
    assert c.docmd('RCPT TO:<"john doe"@remote.example>') == (250, b"2.1.5 Ok")
    c.data(b"Subject: quoted\r\nDate: Sat, 28 Nov 2026 10:00:00 +0100\r\nMessage-ID: <q@office.test>\r\n\r\nhi\r\n")
    c.quit()
    flush(site)
    got = postfix_smarthost.wait_delivered(1)[0]
    assert b'X-Original-To: "john doe"@remote.example\n' in got.raw


def test_utf8_mail_no_route_can_carry_is_refused_at_rcpt(site, postfix_smarthost):
    # The smarthost (Postfix, smtputf8_enable = no) did not offer SMTPUTF8 at its last EHLO:
    # a UTF-8 address for the outside is refused while the client is there, instead of a
    # bounce after the next dial.  Local recipients still take it; ASCII mail still goes.
    with_smarthost(site, postfix_smarthost)
    c = smtplib.SMTP("127.0.0.1", site.smtp_port, timeout=30)
    c.ehlo("client.test")
    c.mail("alice@office.test", ["SMTPUTF8"])
    assert c.rcpt("jürgen@bücher.example") == (250, b"2.1.5 Ok")  # nothing known about the smarthost yet
    c.rset()
    c.sendmail("alice@office.test", ["friend@remote.example"], b"Subject: first\r\n\r\nhi\r\n")
    flush(site)  # the smarthost answers EHLO: no SMTPUTF8
    postfix_smarthost.wait_delivered(1)
    c.mail("alice@office.test", ["SMTPUTF8"])
    assert c.rcpt("jürgen@bücher.example") == \
        (553, b"5.6.7 The smarthost cannot take non-ASCII addresses (no SMTPUTF8 on the way out)")
    c.rset()
    c.mail("jörg@office.test", ["SMTPUTF8"])
    assert c.rcpt("friend@remote.example")[0] == 553
    assert c.rcpt("alice@office.test") == (250, b"2.1.5 Ok")
    c.quit()
