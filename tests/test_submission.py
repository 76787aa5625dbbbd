"""Port 587 for mail clients: STARTTLS first, AUTH before MAIL, then relay to the smarthost.

The daemon runs for real with a ``[submission]`` listener; the smarthost is Postfix's
smtp-sink.  The dialogue is checked byte for byte on a raw socket, and with swaks as a
client would speak it."""
import base64
import resource
import socket
import ssl
import subprocess
import sys

import pytest

from tests.harness import ROOT
from tests.peers import free_port, make_self_signed_cert, run_swaks, wait_port

pytestmark = pytest.mark.timeout(120)

PASSWORD = "alice-pw"  # the site fixture's password for alice


def with_submission(site, tmp_path, sink_port: int) -> int:
    cert, key = make_self_signed_cert(tmp_path)
    port = free_port()
    site.write_config(f"""
[submission]
listen = ["127.0.0.1:{port}"]
tls_cert = "{cert}"
tls_key = "{key}"

[smarthost]
host = "127.0.0.1"
port = {sink_port}
starttls = "off"

[link]
type = "always-on"
""")
    site.start()
    wait_port("127.0.0.1", port, proc=site.proc)
    return port


class Wire:
    """A line-at-a-time SMTP client that returns each reply as the bytes received."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def reply(self) -> bytes:
        out = b""
        while True:
            line = self.file.readline()
            assert line, f"connection closed after {out!r}"
            out += line
            if line[3:4] != b"-":
                return out

    def say(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def starttls(self) -> None:
        assert self.say(b"STARTTLS") == b"220 2.0.0 Ready to start TLS\r\n"
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.sock.close()


def plain(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


def test_submission_refuses_auth_and_mail_before_tls_and_mail_before_auth(site, tmp_path, smtp_sink):
    port = with_submission(site, tmp_path, smtp_sink.port)
    c = Wire(port)
    try:
        assert c.reply() == b"220 mail.office.test dialmail\r\n"
        ehlo = c.say(b"EHLO client.test")
        assert b"250-STARTTLS\r\n" in ehlo and b"AUTH" not in ehlo  # no password in the clear, even on loopback
        assert c.say(b"AUTH PLAIN " + plain("alice", PASSWORD)) == b"530 5.7.0 Must issue a STARTTLS command first\r\n"
        assert c.say(b"MAIL FROM:<alice@office.test>") == b"530 5.7.0 Must issue a STARTTLS command first\r\n"
        c.starttls()
        ehlo = c.say(b"EHLO client.test")
        assert b"250-AUTH LOGIN PLAIN\r\n" in ehlo
        assert c.say(b"MAIL FROM:<alice@office.test>") == b"530 5.7.0 Authentication required\r\n"
        assert c.say(b"RCPT TO:<bob@office.test>") == b"530 5.7.0 Authentication required\r\n"
        assert c.say(b"AUTH PLAIN " + plain("alice", "not-the-Pw-4711")) == \
            b"535 5.7.8 Authentication credentials invalid\r\n"
        assert c.say(b"AUTH PLAIN " + plain("alice", PASSWORD)) == b"235 2.7.0 Authentication successful\r\n"
        assert c.say(b"MAIL FROM:<alice@office.test>") == b"250 2.1.0 Ok\r\n"
        assert c.say(b"RCPT TO:<partner@elsewhere.test>") == b"250 2.1.5 Ok\r\n"
        assert c.say(b"DATA") == b"354 End data with <CR><LF>.<CR><LF>\r\n"
        done = c.say(b"From: alice@office.test\r\nSubject: over 587\r\n\r\nhello\r\n.")
        assert done.startswith(b"250 2.0.0 Ok: queued as ")
        assert c.say(b"QUIT") == b"221 2.0.0 Bye\r\n"
    finally:
        c.close()
    assert site.cli("connect-now", "--send-only").returncode == 0
    [got] = smtp_sink.wait_messages(1)
    assert got.rcpt_args == ["<partner@elsewhere.test>"]
    assert b"Subject: over 587" in got.data
    assert b"with ESMTPSA" in got.data  # the Received: line says TLS and AUTH were used


def test_swaks_without_tls_is_refused_and_with_tls_relays(site, tmp_path, smtp_sink):
    port = with_submission(site, tmp_path, smtp_sink.port)
    common = ["--server", f"127.0.0.1:{port}", "--from", "alice@office.test", "--to", "partner@elsewhere.test",
              "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", PASSWORD, "--header", "Subject: swaks 587"]
    clear = run_swaks(common)
    assert clear.returncode != 0
    # swaks gives up before sending a password: the server offered no AUTH without TLS
    assert "Host did not advertise authentication" in clear.stdout + clear.stderr
    assert "AUTH PLAIN" not in clear.stdout
    secured = run_swaks(common + ["--tls"])
    assert secured.returncode == 0, secured.stdout + secured.stderr
    assert "<~  235 2.7.0 Authentication successful" in secured.stdout
    assert site.cli("connect-now", "--send-only").returncode == 0
    [got] = smtp_sink.wait_messages(1)
    assert b"Subject: swaks 587" in got.data


def test_swaks_without_auth_is_refused_at_mail(site, tmp_path, smtp_sink):
    port = with_submission(site, tmp_path, smtp_sink.port)
    r = run_swaks(["--server", f"127.0.0.1:{port}", "--tls", "--from", "alice@office.test",
                   "--to", "bob@office.test"])
    assert r.returncode != 0
    assert "<~* 530 5.7.0 Authentication required" in r.stdout + r.stderr
    assert site.mail_of("bob") == []


def test_submission_shares_port_25_lockout(site, tmp_path, smtp_sink):
    """Failed logins on port 25 count on 587: a guesser gains nothing by switching ports."""
    port = with_submission(site, tmp_path, smtp_sink.port)
    s25 = Wire(site.smtp_port)
    try:
        s25.reply()
        s25.say(b"EHLO guesser.test")
        for _ in range(5):  # [smtp] max_auth_failures, on loopback AUTH is allowed in the clear on 25
            assert s25.say(b"AUTH PLAIN " + plain("alice", "wrong-guess-8812")).startswith(b"535 ")
    finally:
        s25.close()
    c = Wire(port)
    try:
        c.reply()
        c.say(b"EHLO client.test")
        c.starttls()
        c.say(b"EHLO client.test")
        assert c.say(b"AUTH PLAIN " + plain("alice", PASSWORD)) == \
            b"454 4.7.0 Too many failed logins from your address, try again later\r\n"
    finally:
        c.close()


def test_submission_without_a_certificate_is_a_config_error(site):
    site.write_config("""
[submission]
listen = ["127.0.0.1:1587"]
""")
    r = site.cli("check")
    assert r.returncode != 0
    out = (r.stdout + r.stderr).decode()
    assert "submission.tls_cert" in out and "submission needs TLS" in out


def test_port_587_connections_count_when_caps_are_fitted_to_the_descriptor_limit(site, tmp_path):
    """With an open file limit of 300 (172 past the reserve), caps of 100 for [smtp] (on
    ports 25 and 587 each) and 100 for [pop3] are lowered so all three fit together."""
    cert, key = make_self_signed_cert(tmp_path)
    site.write_config(f"""
[submission]
listen = ["127.0.0.1:1587"]
tls_cert = "{cert}"
tls_key = "{key}"
""")
    text = site.config_path.read_text().replace("[smtp]\n", "[smtp]\nmax_connections = 100\n", 1)
    site.config_path.write_text(text.replace("[pop3]\n", "[pop3]\nmax_connections = 100\n", 1))
    code = ("from gateway.config import load; from gateway.daemon import fit_connections_to_descriptors as fit; "
            f"c = fit(load({str(site.config_path)!r})); print(c.smtp.max_connections, c.pop3.max_connections)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300)))
    assert r.returncode == 0, r.stderr
    smtp, pop3 = map(int, r.stdout.split())
    assert (smtp, pop3) == (57, 58)
    assert 2 * smtp + pop3 <= 300 - 128
