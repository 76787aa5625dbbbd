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
