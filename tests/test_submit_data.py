"""The DATA phase on the wire: what goes in the spool byte for byte, and the refusals
that come only after the whole message (raw socket against a real `dialmail run`)."""
import re
import socket

import pytest

from tests.harness import wait_for

pytestmark = pytest.mark.timeout(60)

# Mail from the LAN without these gets them added (see the test below): given here, the
# stored message is the one sent, byte for byte.
DATED = b"Date: Sat, 28 Nov 2026 10:00:00 +0100\r\nMessage-ID: <m@client.test>\r\n"


class Client:
    def __init__(self, port: int, source: str = "127.0.0.1"):
        self.sock = socket.create_connection((source, port), timeout=20, source_address=(source, 0))
        self.buf = b""
        assert self.reply().startswith(b"220")

    def reply(self) -> bytes:
        while True:
            lines = self.buf.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if line[3:4] == b" ":
                    self.buf = b"\r\n".join(lines[i + 1:])
                    return b"\r\n".join(lines[:i + 1])
            data = self.sock.recv(65536)
            assert data, "connection closed"
            self.buf += data

    def command(self, text: bytes) -> bytes:
        self.sock.sendall(text + b"\r\n")
        return self.reply()

    def transaction(self, body: bytes) -> bytes:
        assert self.command(b"MAIL FROM:<x@outside.test>").startswith(b"250")
        assert self.command(b"RCPT TO:<alice@office.test>").startswith(b"250")
        assert self.command(b"DATA").startswith(b"354")
        self.sock.sendall(body)
        return self.reply()


def test_dot_stuffed_lines_are_unstuffed_and_the_rest_kept_byte_for_byte(running):
    c = Client(running.smtp_port)
    c.command(b"EHLO client.test")
    body = DATED + b"Subject: dots\r\n\r\n..leading dot\r\n...two\r\nmid.dle\r\n.\r\n"
    assert c.transaction(body).startswith(b"250")
    mail = wait_for(lambda: running.mail_of("alice"), what="alice's mail")
    assert mail[0].endswith(DATED + b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\nmid.dle\r\n")


def test_empty_message_and_a_second_transaction_on_the_same_connection(running):
    c = Client(running.smtp_port)
    c.command(b"EHLO client.test")
    assert c.transaction(b".\r\n").startswith(b"250")
    assert c.transaction(b"Subject: second\r\n\r\nbody\r\n.\r\n").startswith(b"250")
    wait_for(lambda: len(running.mail_of("alice")) == 2, what="both messages")


def test_overlong_line_is_accepted_byte_for_byte_and_the_session_goes_on(running):
    # Postfix takes lines over 1,000 octets (copiers' scan-to-mail, scripts' HTML mail) and
    # folds them on the way out; refusing them loses the mail.  A line of dots also proves
    # that only the dot at the start of the line is unstuffed, not one at the start of each
    # piece the reader hands over.
    c = Client(running.smtp_port)
    c.command(b"EHLO client.test")
    long_line = b"." * 200_000 + b"\r\n"  # longer than the reader's buffer limit too
    assert c.transaction(DATED + b"Subject: long\r\n\r\n." + long_line + b".\r\n").startswith(b"250")
    assert c.transaction(b"Subject: fine\r\n\r\nshort\r\n.\r\n").startswith(b"250")
    mail = wait_for(lambda: len(running.mail_of("alice")) == 2 and running.mail_of("alice"), what="both messages")
    long_mail = next(m for m in mail if b"Subject: long" in m)
    assert long_mail.endswith(DATED + b"Subject: long\r\n\r\n" + long_line)


def test_a_line_longer_than_the_size_limit_is_refused_with_552_after_the_final_dot(running):
    c = Client(running.smtp_port)
    c.command(b"EHLO client.test")
    endless = b"Subject: one line\r\n\r\n" + b"z" * 31_000_000 + b"\r\n.\r\n"  # over 30 MB, no CRLF
    assert c.transaction(endless).startswith(b"552")
    assert c.command(b"NOOP").startswith(b"250")
    assert running.mail_of("alice") == []


def test_too_much_data_is_refused_with_552_after_the_final_dot(running):
    c = Client(running.smtp_port)
    c.command(b"EHLO client.test")
    big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 31_000 + b".\r\n"  # over 30 MB
    assert c.transaction(big).startswith(b"552")
    assert c.command(b"NOOP").startswith(b"250")
    assert running.mail_of("alice") == []


def stored_header_block(mail: bytes) -> list[bytes]:
    return mail.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def test_lan_mail_without_date_or_message_id_gets_them_once_at_the_end_of_its_header_block(running):
    # RFC 6409 §8.2/8.3, as Postfix's cleanup does for local clients.
    c = Client(running.smtp_port)
    c.command(b"EHLO client.test")
    assert c.transaction(b"From: a@office.test\r\nSubject: bare\r\n\r\nhello\r\n.\r\n").startswith(b"250 ")
    assert c.transaction(b"From: a@office.test\r\nSubject: dated\r\nDate: Sat, 28 Nov 2026 10:00:00 +0100\r\n"
                         b"Message-ID: <given@client.test>\r\n\r\nhello\r\n.\r\n").startswith(b"250 ")
    mail = wait_for(lambda: len(running.mail_of("alice")) == 2 and running.mail_of("alice"), what="both messages")
    bare = stored_header_block(next(m for m in mail if b"Subject: bare" in m))
    i = bare.index(b"Subject: bare")
    assert bare[i - 1] == b"From: a@office.test" and len(bare) == i + 3
    assert bare[i + 1].startswith(b"Date: ") and re.fullmatch(rb"Message-ID: <\d{14}\.\w+@mail\.office\.test>",
                                                              bare[i + 2]), bare
    dated = stored_header_block(next(m for m in mail if b"Subject: dated" in m))
    assert [h for h in dated if h.startswith((b"Date:", b"Message-ID:"))] == \
        [b"Date: Sat, 28 Nov 2026 10:00:00 +0100", b"Message-ID: <given@client.test>"]


def test_mail_from_outside_the_lan_is_stored_as_it_came(running):
    c = Client(running.smtp_port, source="127.0.0.2")
    c.command(b"EHLO outside.test")
    assert c.transaction(b"From: x@outside.test\r\nSubject: inbound\r\n\r\nhello\r\n.\r\n").startswith(b"250 ")
    mail = wait_for(lambda: running.mail_of("alice"), what="the message")[0]
    assert mail.endswith(b"\r\nFrom: x@outside.test\r\nSubject: inbound\r\n\r\nhello\r\n")
