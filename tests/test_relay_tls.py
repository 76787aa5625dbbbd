"""STARTTLS with certificate verification and AUTH towards the smarthost.

The smarthost is an aiosmtpd server in the test's loop, with a self-signed certificate
made by openssl (SAN 127.0.0.1) and an authenticator; STARTTLS is required before
AUTH and before mail, like a real ISP submission port.
"""
from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from gateway.relay.flush import flush
from spool.queue import DEFERRED
from tests.peers import make_self_signed_cert, need
from tests.test_relay import Office, message

USER, PASSWORD = "office@isp.example", "s3cret pass"


class IspHandler:
    def __init__(self):
        self.received = []

    async def handle_DATA(self, server, session, envelope):
        self.received.append({"tls": session.ssl is not None, "user": session.auth_data,
                              "helo": session.host_name, "from": envelope.mail_from,
                              "rcpts": list(envelope.rcpt_tos), "data": envelope.content})
        return "250 2.0.0 Ok: queued"


def authenticate(server, session, envelope, mechanism, auth_data):
    if isinstance(auth_data, LoginPassword) and auth_data.login.decode() == USER \
            and auth_data.password.decode() == PASSWORD:
        return AuthResult(success=True, auth_data=USER)
    return AuthResult(success=False, handled=False)


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    need("openssl")
    return make_self_signed_cert(tmp_path_factory.mktemp("isp-cert"))


def tls_office(tmp: Path, port: int, cert: Path, *, password: str = PASSWORD, ca: bool = True,
               starttls: str = "required") -> Office:
    tmp.mkdir(parents=True, exist_ok=True)
    pw = tmp / "smarthost.password"
    pw.write_text(password + "\n")
    pw.chmod(0o600)
    lines = [f'username = "{USER}"', f'password_file = "{pw}"']
    if ca:
        lines.append(f'ca_file = "{cert}"')
    return Office(tmp, port, starttls=starttls, smarthost="\n".join(lines))


async def with_isp(cert_key, office_for, *, require_starttls=True):
    cert, key = cert_key
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    handler = IspHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="smtp.isp.test", tls_context=ctx, require_starttls=require_starttls,
                     authenticator=authenticate, auth_required=True, auth_require_tls=True),
        "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        office = office_for(port)
        result = await flush(office.cfg, office.queue)
        return office, handler, result
    finally:
        server.close()
        await server.wait_closed()


def test_starttls_with_verified_certificate_and_auth(tmp_path, cert):
    box = {}

    def make(port):
        o = tls_office(tmp_path / "o", port, cert[0])
        box["qid"] = o.send("alice@office.test", ["friend@example.com"], message("over tls"))
        box["qid2"] = o.send("bob@office.test", ["friend@example.com"], message("second", sender="bob@office.test"))
        return o

    office, isp, result = asyncio.run(with_isp(cert, make))
    assert (result.sent, result.deferred, result.error) == (2, 0, None)
    assert [(r["tls"], r["user"], r["helo"], r["from"]) for r in isp.received] == [
        (True, USER, "mail.office.test", "alice@office.test"), (True, USER, "mail.office.test", "bob@office.test")]
    assert office.queue.messages() == []


def test_wrong_password_defers_and_never_bounces(tmp_path, cert):
    def make(port):
        o = tls_office(tmp_path / "o", port, cert[0], password="not-the-password-7")
        o.send("alice@office.test", ["friend@example.com"], message("bad auth"))
        return o

    office, isp, result = asyncio.run(with_isp(cert, make))
    assert isp.received == []
    assert result.error is not None and result.error.dsn == "4.7.8" and result.bounced == 0
    [m] = office.queue.messages()
    assert m.recipients[0].status == DEFERRED and "authentication" in m.recipients[0].last_reply
    assert m.recipients[0].attempts == 0  # the office's password says nothing about the message
    assert PASSWORD not in (m.recipients[0].last_reply or "") and "not-the-password-7" not in m.recipients[0].last_reply


def test_unverifiable_certificate_defers(tmp_path, cert):
    def make(port):
        o = tls_office(tmp_path / "o", port, cert[0], ca=False)
        o.send("alice@office.test", ["friend@example.com"], message("untrusted"))
        return o

    office, isp, result = asyncio.run(with_isp(cert, make))
    assert isp.received == []
    assert result.error is not None and result.error.dsn == "4.7.5"
    assert "certificate verify failed" in result.error.reason
    assert office.queue.messages()[0].recipients[0].status == DEFERRED


def test_opportunistic_tls_is_used_when_offered(tmp_path, cert):
    def make(port):
        o = tls_office(tmp_path / "o", port, cert[0], starttls="opportunistic")
        o.send("alice@office.test", ["friend@example.com"], message("opportunistic"))
        return o

    _office, isp, result = asyncio.run(with_isp(cert, make))
    assert result.sent == 1 and isp.received[0]["tls"] is True
