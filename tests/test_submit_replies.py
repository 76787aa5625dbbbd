"""Every reply the SMTP listener can give, byte for byte, against a real `dialmail run`.

ENHANCEDSTATUSCODES is advertised, so every 2xx/4xx/5xx reply carries an RFC 3463 code
(RFC 2034 §3) except the greeting and the answers to HELO/EHLO; a successful RCPT is
2.1.5 (destination address valid), MAIL 2.1.0, and HELP answers 214 (RFC 5321 §4.2).
"""
import socket

import pytest

from tests.harness import Site, wait_for

pytestmark = pytest.mark.timeout(60)

LIMIT = 10_000  # [smtp] max_message_size for this site, small enough to overrun cheaply


class Wire:
    """A raw SMTP client: sends a line, returns the reply bytes exactly as they came."""

    def __init__(self, port: int, source: str = "127.0.0.1"):
        self.sock = socket.create_connection((source, port), timeout=20, source_address=(source, 0))
        self.buf = b""
        self.greeting = self.reply()

    def reply(self) -> bytes:
        while True:
            lines = self.buf.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if line[3:4] == b" ":
                    self.buf = b"\r\n".join(lines[i + 1:])
                    return b"\r\n".join(lines[:i + 1]) + b"\r\n"
            data = self.sock.recv(65536)
            assert data, "connection closed"
            self.buf += data

    def say(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def walk(self, transcript: list[tuple[bytes, bytes]]) -> None:
        for sent, expected in transcript:
            assert (sent, self.say(sent)) == (sent, expected)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def small(tmp_path):
    site = Site(tmp_path)
    site.config_path.write_text(site.config_path.read_text().replace('"30MB"', str(LIMIT)))
    site.add_user("alice", "alice-pw")
    site.start()
    yield site
    site.stop()


def test_every_reply_carries_its_enhanced_status_code(small):
    w = Wire(small.smtp_port)
    assert w.greeting == b"220 mail.office.test dialmail\r\n"  # the greeting takes none (RFC 2034 §3)
    w.walk([
        (b"MAIL FROM:<a@outside.test>", b"503 5.5.1 Error: send HELO first\r\n"),
        (b"HELO client.test", b"250 mail.office.test\r\n"),  # nor the answer to HELO/EHLO
        (b"NOOP", b"250 2.0.0 Ok\r\n"),
        (b"RSET", b"250 2.0.0 Ok\r\n"),
        (b"RSET now", b"501 5.5.4 Syntax: RSET\r\n"),
        (b"VRFY alice@office.test",
         b"252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery\r\n"),
        (b"VRFY", b"501 5.5.4 Syntax: VRFY <address>\r\n"),
        (b"EXPN staff", b"502 5.5.1 EXPN not implemented\r\n"),
        (b"HELP", b"214 2.0.0 Supported commands: AUTH DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET "
                  b"VRFY\r\n"),
        (b"HELP mail", b"214 2.0.0 Syntax: MAIL FROM: <address>\r\n"),
        (b"HELP frobnicate", b"501 5.5.4 Supported commands: AUTH DATA EHLO HELO HELP MAIL NOOP QUIT RCPT "
                             b"RSET VRFY\r\n"),
        (b"FROB", b'500 5.5.2 Error: command "FROB" not recognized\r\n'),
        (b"", b"500 5.5.2 Error: bad syntax\r\n"),
        (b"NOOP " + b"x" * 600, b"500 5.5.2 Error: command line too long\r\n"),
        (b"STARTTLS", b"454 4.7.0 TLS not available\r\n"),
        (b"RCPT TO:<alice@office.test>", b"503 5.5.1 Error: need MAIL command\r\n"),
        (b"DATA", b"503 5.5.1 Error: need RCPT command\r\n"),
        (b"MAIL <a@outside.test>", b"501 5.5.4 Syntax: MAIL FROM: <address>\r\n"),
        (b"MAIL FROM:<a@outside.test> SIZE=10", b"501 5.5.4 Syntax: MAIL FROM: <address>\r\n"),
        (b"EHLO client.test", b"250-mail.office.test\r\n250-PIPELINING\r\n250-SIZE 10000\r\n250-8BITMIME\r\n"
                              b"250-SMTPUTF8\r\n250-AUTH LOGIN PLAIN\r\n250-ENHANCEDSTATUSCODES\r\n"
                              b"250 HELP\r\n"),
        (b"MAIL FROM:<a@outside.test> SIZE=20000",
         b"552 5.3.4 Message too big for this system (limit 10000 bytes)\r\n"),
        (b"MAIL FROM:<a@outside.test> FROB=1",
         b"555 5.5.4 MAIL FROM parameters not recognized or not implemented\r\n"),
        (b"MAIL FROM:<a@outside.test> SMTPUTF8=yes", b"501 5.5.4 Error: SMTPUTF8 takes no arguments\r\n"),
        (b"MAIL FROM:<a@outside.test> BODY=9BIT", b"501 5.5.4 Error: BODY can only be one of 7BIT, 8BITMIME\r\n"),
        (b"MAIL FROM:<a@outside.test>", b"250 2.1.0 Ok\r\n"),
        (b"MAIL FROM:<b@outside.test>", b"503 5.5.1 Error: nested MAIL command\r\n"),
        (b"RCPT TO:<nobody@office.test>", b"550 5.1.1 No such user here\r\n"),
        (b"RCPT TO:<alice@office.test> FROB=1",
         b"555 5.5.4 RCPT TO parameters not recognized or not implemented\r\n"),
        (b"RCPT <alice@office.test>", b"501 5.5.4 Syntax: RCPT TO: <address> [SP <mail-parameters>]\r\n"),
        (b"RCPT TO:<alice@office.test>", b"250 2.1.5 Ok\r\n"),
        (b"DATA now", b"501 5.5.4 Syntax: DATA\r\n"),
        (b"DATA", b"354 End data with <CR><LF>.<CR><LF>\r\n"),  # 3xx take none
    ])
    w.sock.sendall(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 200 + b".\r\n")
    assert w.reply() == b"552 5.3.4 Error: too much mail data\r\n"
    w.walk([
        (b"MAIL FROM:<a@outside.test>", b"250 2.1.0 Ok\r\n"),
        (b"RCPT TO:<alice@office.test>", b"250 2.1.5 Ok\r\n"),
        (b"DATA", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
    ])
    w.sock.sendall(b"Subject: fits\r\n\r\nhello\r\n.\r\n")
    queued = w.reply()
    assert queued.startswith(b"250 2.0.0 Ok: queued as ")
    w.walk([
        (b"AUTH", b"501 5.5.4 Not enough value\r\n"),
        (b"AUTH FROB", b"504 5.5.4 Unrecognized authentication type\r\n"),
        (b"AUTH PLAIN AGFsaWNlAHdyb25n", b"535 5.7.8 Authentication credentials invalid\r\n"),
        (b"AUTH PLAIN AGFsaWNlAGFsaWNlLXB3", b"235 2.7.0 Authentication successful\r\n"),
        (b"AUTH PLAIN AGFsaWNlAGFsaWNlLXB3", b"503 5.5.1 Already authenticated\r\n"),
        (b"QUIT now", b"501 5.5.4 Syntax: QUIT\r\n"),
        (b"QUIT", b"221 2.0.0 Bye\r\n"),
    ])
    w.close()
    wait_for(lambda: small.mail_of("alice"), what="the message that fitted")


def test_relay_refusal_from_outside_mynetworks_carries_its_code(small):
    w = Wire(small.smtp_port, source="127.0.0.2")
    w.say(b"EHLO client.test")
    w.walk([
        (b"MAIL FROM:<a@outside.test>", b"250 2.1.0 Ok\r\n"),
        (b"RCPT TO:<victim@elsewhere.test>", b"554 5.7.1 Relay access denied\r\n"),
    ])
    w.close()


def test_a_non_ascii_address_needs_the_smtputf8_parameter_on_mail(small):
    # RFC 6531 §3.4: without SMTPUTF8 on MAIL a non-ASCII address is refused with 553 5.6.7;
    # with it, the recipient is taken and the message queued for the smarthost as it is.
    w = Wire(small.smtp_port)
    w.say(b"EHLO client.test")
    w.walk([
        ("MAIL FROM:<jörg@bücher.example>".encode(),
         b"553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter on MAIL\r\n"),
        (b"MAIL FROM:<a@outside.test>", b"250 2.1.0 Ok\r\n"),
        ("RCPT TO:<jörg@bücher.example>".encode(),
         b"553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter on MAIL\r\n"),
        (b"RSET", b"250 2.0.0 Ok\r\n"),
        ("MAIL FROM:<jörg@bücher.example> SMTPUTF8".encode(), b"250 2.1.0 Ok\r\n"),
        ("RCPT TO:<jörg@bücher.example>".encode(), b"250 2.1.5 Ok\r\n"),
        (b"DATA", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
    ])
    w.sock.sendall("Subject: Grüße\r\n\r\nhallo\r\n.\r\n".encode())
    assert w.reply().startswith(b"250 2.0.0 Ok: queued as ")
    w.close()
    listing = small.cli("queue", "list").stdout.decode()
    assert "jörg@bücher.example [relay] queued" in listing
