"""OAuth2 logins at the ISP: XOAUTH2 and OAUTHBEARER against a real Dovecot and an SMTP
smarthost, both checking every token with a local authorization server (tests/oauth_server.py),
plus the token store, the refresh rules and the interactive flows of `dialmail oauth login`."""
from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from gateway import config as config_mod
from gateway.mail.errors import ConfigError
from spool.queue import Catalogue, Queue
from spool.tokens import REFUSED, TokenRecord, TokenStore, TokenStoreError
from tests.harness import PASSWORDS, Site
from tests.oauth_server import CLIENT_ID, OAuthServer
from tests.peers import Dovecot, free_port, need

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- configuration (no peers)

BASE = """
[server]
domains = ["office.test"]
spool_dir = "/tmp/unused"
[[fetch]]
name = "m365"
host = "outlook.office365.com"
username = "office@contoso.example"
deliver_to = "alice"
"""


def test_microsoft_defaults_fill_in_endpoints_and_imap_scopes():
    cfg = config_mod.loads(BASE + 'auth = "xoauth2"\n[fetch.oauth]\nprovider = "microsoft"\n'
                                  'client_id = "11111111-2222-3333-4444-555555555555"\ntenant = "contoso.example"\n')
    o = cfg.fetch[0].oauth
    assert cfg.fetch[0].auth == "xoauth2" and cfg.fetch[0].password_file is None
    assert o.token_url == "https://login.microsoftonline.com/contoso.example/oauth2/v2.0/token"
    assert o.device_url == "https://login.microsoftonline.com/contoso.example/oauth2/v2.0/devicecode"
    assert o.scopes == ("https://outlook.office.com/IMAP.AccessAsUser.All", "offline_access")


def test_smarthost_gets_the_smtp_scope_and_needs_a_username(tmp_path):
    sh = ('[smarthost]\nhost = "smtp.office365.com"\nport = 587\nauth = "xoauth2"\n'
          '[smarthost.oauth]\nprovider = "microsoft"\nclient_id = "abc"\n')
    with pytest.raises(ConfigError, match="smarthost.username"):
        config_mod.loads(BASE + sh)
    cfg = config_mod.loads(BASE + sh.replace('auth = ', 'username = "office@contoso.example"\nauth = '))
    assert cfg.smarthost.oauth.scopes == ("https://outlook.office.com/SMTP.Send", "offline_access")
    assert cfg.smarthost.oauth.key == "smarthost" and cfg.fetch[0].auth == "password"


@pytest.mark.parametrize("table, error", [
    ('auth = "xoauth2"\n', "needs an oauth table"),
    ('auth = "xoauth3"\n', "must be one of 'password', 'xoauth2', 'oauthbearer'"),
    ('password_file = "/x"\n[fetch.oauth]\nprovider = "generic"\n', r"<config>:11: fetch\[m365\]\.oauth: is read only with auth"),
    ('auth = "xoauth2"\npassword_file = "/x"\n[fetch.oauth]\nprovider = "microsoft"\nclient_id = "a"\n',
     "password_file: is not used"),
    ('auth = "xoauth2"\n[fetch.oauth]\nprovider = "yahoo"\nclient_id = "a"\n', "provider: must be one of"),
    ('auth = "xoauth2"\n[fetch.oauth]\nprovider = "microsoft"\n', "client_id: is required"),
    ('auth = "xoauth2"\n[fetch.oauth]\nprovider = "google"\nclient_id = "a"\n', "client_secret_file"),
    ('auth = "xoauth2"\n[fetch.oauth]\nprovider = "google"\nclient_id = "a"\nclient_secret_file = "/s"\n'
     'device_url = "https://oauth2.googleapis.com/device/code"\n', "refuses|does not issue Gmail"),
    ('auth = "oauthbearer"\n[fetch.oauth]\nprovider = "generic"\nclient_id = "a"\nscopes = ["mail"]\n',
     "token_url"),
    ('auth = "oauthbearer"\n[fetch.oauth]\nprovider = "generic"\nclient_id = "a"\ntoken_url = "https://t/"\n',
     "scopes"),
    ('auth = "oauthbearer"\n[fetch.oauth]\nprovider = "generic"\nclient_id = "a"\ntoken_url = "ftp://t/"\n'
     'scopes = ["m"]\n', "not an http"),
    ('auth = "xoauth2"\n[fetch.oauth]\nprovider = "microsoft"\nclient_id = "a"\ntennant = "x"\n',
     "did you mean 'tenant'"),
])
def test_bad_oauth_settings_are_refused_naming_the_key(table, error):
    with pytest.raises(ConfigError, match=error):
        config_mod.loads(BASE + table)


@pytest.mark.parametrize("line", [
    "C: AUTH XOAUTH2 dXNlcj1vZmZpY2UBYXV0aD1CZWFyZXIgc2VjcmV0AQE=",
    "a1 AUTHENTICATE OAUTHBEARER bixhPW9mZmljZSwBYXV0aD1CZWFyZXIgc2VjcmV0AQE=",
    "Authorization: Bearer access-SECRET-abcdef",
    '{"access_token": "access-SECRET-abcdef", "refresh_token": "refresh-SECRET-ghijkl"}',
    "grant_type=refresh_token&refresh_token=refresh-SECRET-ghijkl&client_id=x",
    "GET /?code=code-SECRET-mnopqr&state=xyz HTTP/1.1",
])
def test_transcript_masks_oauth_tokens(line):
    from gateway.session.transcript import mask
    masked = mask(line)
    assert "SECRET" not in masked and "dXNlcj1" not in masked and "bixhPW9" not in masked
    assert "********" in masked


def test_transcript_keeps_reply_codes_and_words_about_tokens():
    from gateway.session.events import Etrn
    from gateway.session.transcript import describe, mask
    assert mask(describe(Etrn("office.test", 250, "OK"))) == "[etrn] domain=office.test code=250 reply=OK"
    line = "fetch: the provider refused the OAuth2 refresh token of isp (invalid_grant: revoked)"
    assert mask(line) == line


# ---------------------------------------------------------------- the token store


def test_token_file_is_0600_and_refused_when_others_can_read_it(tmp_path):
    store = TokenStore(tmp_path)
    store.save("fetch.isp", TokenRecord(refresh_token="refresh-SECRET-store-test", stored_at=1.0))
    path = tmp_path / "oauth" / "fetch.isp.token"
    assert oct(path.stat().st_mode & 0o777) == "0o600" and oct(path.parent.stat().st_mode & 0o777) == "0o700"
    assert store.load("fetch.isp").refresh_token == "refresh-SECRET-store-test"
    path.chmod(0o640)
    with pytest.raises(TokenStoreError, match="readable by group or others.*chmod 600"):
        store.load("fetch.isp")


def test_with_a_key_the_token_is_encrypted_at_rest(tmp_path):
    from cryptography.fernet import Fernet
    key = Fernet.generate_key()
    TokenStore(tmp_path, key).save("smarthost", TokenRecord(refresh_token="refresh-SECRET-encrypted"))
    raw = (tmp_path / "oauth" / "smarthost.token").read_bytes()
    assert b"refresh-SECRET-encrypted" not in raw and b"refresh_token" not in raw
    assert TokenStore(tmp_path, key).load("smarthost").refresh_token == "refresh-SECRET-encrypted"
    with pytest.raises(TokenStoreError, match="encrypted: set \\[server\\] token_key_file"):
        TokenStore(tmp_path).load("smarthost")
    with pytest.raises(TokenStoreError, match="another key"):
        TokenStore(tmp_path, Fernet.generate_key()).load("smarthost")


# ---------------------------------------------------------------- the peers


@pytest.fixture(scope="module")
def provider():
    with OAuthServer() as server:
        yield server


@pytest.fixture(scope="module")
def oauth_dovecot_server(provider):
    need("dovecot", "doveadm", "doveconf")
    with Dovecot(tls="none", introspection_url=f"{provider.url}/introspect") as server:
        yield server


@pytest.fixture
def oauth_dovecot(oauth_dovecot_server):
    oauth_dovecot_server.reset()
    oauth_dovecot_server.add_user("office", "office-password-unused")
    yield oauth_dovecot_server
    oauth_dovecot_server.reset()


def oauth_table(provider: OAuthServer, section: str) -> str:
    return (f'[{section}.oauth]\nprovider = "generic"\nclient_id = "{CLIENT_ID}"\n'
            f'token_url = "{provider.url}/token"\ndevice_url = "{provider.url}/devicecode"\n'
            f'authorization_url = "{provider.url}/authorize"\nscopes = ["mail"]\n')


def fetch_account(provider, port: int, auth: str = "xoauth2", name: str = "isp") -> str:
    return (f'\n[[fetch]]\nname = "{name}"\nhost = "127.0.0.1"\nport = {port}\ntls = "off"\n'
            f'username = "office"\ndeliver_to = "alice"\nauth = "{auth}"\n' + oauth_table(provider, "fetch"))


def mail(n: int) -> bytes:
    return (f"From: <s{n}@outside.test>\r\nTo: office@isp.test\r\nSubject: oauth {n}\r\n"
            f"Message-ID: <oauth{n}.{time.monotonic_ns()}@outside.test>\r\n\r\nbody {n}\r\n").encode()


def fetch(site: Site):
    from gateway.delivery.worker import LocalDelivery
    from gateway.fetch.imap import fetch_all
    from gateway.office.directory import Directory
    cfg = config_mod.load(site.config_path)
    cat = Catalogue(cfg.spool_dir)
    try:
        queue = Queue(cat)
        directory = Directory(cfg, site.users)
        result = asyncio.run(fetch_all(cfg, queue, cat, directory))
        delivery = LocalDelivery(cfg, queue, directory)
        while delivery.run_once():
            pass
        return result
    finally:
        cat.close()


def cli(site: Site, *args: str, **kw) -> subprocess.CompletedProcess:
    r = site.cli(*args, **kw)
    r.stdout, r.stderr = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    return r


def store_of(site: Site) -> TokenStore:
    return TokenStore(site.spool)


@pytest.fixture
def oauth_site(tmp_path):
    s = Site(tmp_path)
    s.add_user("alice", "alice-oauth-pw")
    yield s
    s.stop()


@pytest.mark.parametrize("auth", ["xoauth2", "oauthbearer"])
def test_fetch_logs_in_by_token_refreshing_it_once_the_line_is_up(provider, oauth_dovecot, oauth_site, auth):
    oauth_dovecot.save("office", mail(1))
    oauth_site.write_config(fetch_account(provider, oauth_dovecot.imap_port, auth))
    refresh, _ = provider.issue()
    r = cli(oauth_site, "oauth", "login", "isp", "--refresh-token-stdin", input=refresh.encode() + b"\n")
    assert r.returncode == 0, r.stderr
    before = provider.count("/token", "refresh_token")
    result = fetch(oauth_site)
    assert result.errors == [] and result.fetched == 1
    assert [m.split(b"Subject: ")[1][:7] for m in oauth_site.mail_of("alice")] == [b"oauth 1"]
    assert provider.count("/token", "refresh_token") == before + 1  # no access token yet: one refresh
    oauth_dovecot.save("office", mail(2))
    assert fetch(oauth_site).fetched == 1
    assert provider.count("/token", "refresh_token") == before + 1  # the stored access token still works
    status = cli(oauth_site, "oauth", "status")
    assert status.returncode == 0 and "access token valid until" in status.stdout
    assert refresh not in status.stdout + status.stderr


def test_debug_logging_of_a_token_login_shows_no_token(provider, oauth_dovecot, oauth_site):
    """`dialmail -v fetch` logs the IMAP dialogue and the HTTP requests, never the tokens."""
    oauth_dovecot.save("office", mail(15))
    oauth_site.write_config(fetch_account(provider, oauth_dovecot.imap_port, "oauthbearer"))
    refresh, access = provider.issue()
    store_of(oauth_site).save("fetch.isp", TokenRecord(refresh_token=refresh, access_token=access,
                                                       expires_at=time.time() + 3600, stored_at=time.time()))
    provider.expire_access_tokens()  # the stored one is refused, a refresh follows
    r = cli(oauth_site, "-v", "fetch")
    assert r.returncode == 0, r.stderr
    assert "AUTHENTICATE" in r.stderr and "/token" in r.stderr  # the dialogue was logged
    issued = [t for t in PASSWORDS if t.startswith(("refresh-", "access-"))]
    assert not [t for t in issued if t in r.stdout + r.stderr]
    for token in (access, store_of(oauth_site).load("fetch.isp").access_token):
        sasl = base64.b64encode(f"n,a=office,\x01auth=Bearer {token}\x01\x01".encode()).decode()
        assert sasl not in r.stderr


def test_an_access_token_the_server_calls_expired_is_refreshed_transparently(provider, oauth_dovecot,
                                                                            oauth_site):
    oauth_site.write_config(fetch_account(provider, oauth_dovecot.imap_port))
    refresh, access = provider.issue()
    # dialmail believes the token good for an hour; the provider has already expired it
    store_of(oauth_site).save("fetch.isp", TokenRecord(refresh_token=refresh, access_token=access,
                                                       expires_at=time.time() + 3600, stored_at=time.time()))
    provider.expire_access_tokens()
    oauth_dovecot.save("office", mail(3))
    before = provider.count("/token", "refresh_token")
    result = fetch(oauth_site)
    assert result.errors == [] and result.fetched == 1
    assert provider.count("/token", "refresh_token") == before + 1
    assert store_of(oauth_site).load("fetch.isp").access_token != access
    # and one that dialmail knows expired is refreshed before the login
    rec = store_of(oauth_site).load("fetch.isp")
    rec.expires_at = time.time() - 1
    store_of(oauth_site).save("fetch.isp", rec)
    oauth_dovecot.save("office", mail(4))
    assert fetch(oauth_site).fetched == 1 and provider.count("/token", "refresh_token") == before + 2


def test_a_provider_that_rotates_refresh_tokens_gets_the_new_one_back_each_time(provider, oauth_dovecot,
                                                                                oauth_site):
    oauth_site.write_config(fetch_account(provider, oauth_dovecot.imap_port))
    refresh, _ = provider.issue()
    store_of(oauth_site).save("fetch.isp", TokenRecord(refresh_token=refresh, stored_at=time.time()))
    provider.rotate = True
    try:
        for n in (12, 13, 14):
            oauth_dovecot.save("office", mail(n))
            provider.expire_access_tokens()  # each session has to refresh
            result = fetch(oauth_site)
            assert result.errors == [] and result.fetched == 1
            current = store_of(oauth_site).load("fetch.isp").refresh_token
            assert current != refresh and not provider.grants[current].revoked
            refresh = current
    finally:
        provider.rotate = False


def test_a_revoked_refresh_token_fails_that_account_only_and_tells_the_postmaster_once(
        provider, oauth_dovecot, oauth_site):
    oauth_dovecot.add_user("second", "second-isp-password")
    oauth_dovecot.save("second", mail(5))
    oauth_dovecot.save("office", mail(6))
    oauth_site.server_extra = 'postmaster = "alice@office.test"'
    oauth_site.write_config(fetch_account(provider, oauth_dovecot.imap_port)
                            + oauth_site.fetch_account(oauth_dovecot.imap_port, "second", "second-isp-password",
                                                       name="plain", deliver_to='"alice"'))
    refresh, _ = provider.issue()
    store_of(oauth_site).save("fetch.isp", TokenRecord(refresh_token=refresh, stored_at=time.time()))
    provider.revoke(refresh)
    result = fetch(oauth_site)
    (err,) = result.errors
    assert "isp" in err and "refused the OAuth2 refresh token" in err and "dialmail oauth login isp" in err
    assert "invalid_grant" in err and result.fetched == 1  # the password account went on
    notices = [m for m in oauth_site.mail_of("alice") if b"OAuth2 login of isp refused" in m]
    assert len(notices) == 1 and b"dialmail oauth login isp" in notices[0].replace(b"=\n", b"")
    before = provider.count("/token")
    result = fetch(oauth_site)  # the next session: no hammering, no second notice
    assert provider.count("/token") == before and "refused" in result.errors[0]
    assert len([m for m in oauth_site.mail_of("alice") if b"OAuth2 login of isp refused" in m]) == 1
    status = cli(oauth_site, "oauth", "status")
    assert status.returncode == 1 and "refused by the provider (invalid_grant" in status.stdout
    assert store_of(oauth_site).load("fetch.isp").state == REFUSED
    check = cli(oauth_site, "check")
    assert "refused the OAuth2 refresh token" in check.stdout + check.stderr
    status = cli(oauth_site, "status")
    assert "oauth: isp: the provider refused the OAuth2 refresh token of isp (invalid_grant" in status.stdout


# ---------------------------------------------------------------- the smarthost


class TokenSmarthost:
    """aiosmtpd on 127.0.0.1 offering AUTH XOAUTH2 and OAUTHBEARER only, each token checked
    at the provider's introspection endpoint before the 235.  A refused token gets what
    Gmail and Microsoft send: a 334 with the error as base64 JSON, then, after the client's
    empty line (XOAUTH2) or ^A (OAUTHBEARER, RFC 7628), the 535."""

    def __init__(self, provider: OAuthServer):
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import MISSING, AuthResult
        self.received: list[tuple[str, list[str], bytes]] = []
        self.logins: list[tuple[str, bool]] = []
        self.aborts: list[bytes] = []  # what the client answered to each error challenge
        self.responses: list[str] = []  # each AUTH's initial response, decoded
        outer = self

        async def check(server, mech: str, blob: str) -> AuthResult:
            try:
                text = base64.b64decode(blob).decode()
            except ValueError:
                return AuthResult(success=False, handled=False)
            outer.responses.append(text)
            token = text.split("auth=Bearer ", 1)[-1].split("\x01", 1)[0]
            answer = await asyncio.to_thread(requests.post, f"{provider.url}/introspect",
                                             data={"token": token}, timeout=10)
            ok = answer.json().get("active") is True
            outer.logins.append((mech, ok))
            if ok:
                return AuthResult(success=True, handled=False)
            reply = await server.challenge_auth('{"status":"401","schemes":"bearer","scope":"mail"}')
            if reply is MISSING:
                return AuthResult(success=False, handled=True)
            outer.aborts.append(reply)
            return AuthResult(success=False, handled=False)

        class Handler:
            async def auth_XOAUTH2(self, server, args):  # noqa: N802 - aiosmtpd's naming
                return await check(server, "XOAUTH2", args[1] if len(args) > 1 else "")

            async def auth_OAUTHBEARER(self, server, args):  # noqa: N802
                return await check(server, "OAUTHBEARER", args[1] if len(args) > 1 else "")

            async def handle_DATA(self, server, session, envelope):
                outer.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
                return "250 2.0.0 queued"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port, auth_required=True,
                                     auth_require_tls=False, auth_exclude_mechanism=["LOGIN", "PLAIN"])

    def __enter__(self):
        self.controller.start()
        return self

    def __exit__(self, *exc):
        self.controller.stop()


@pytest.mark.parametrize("auth", ["xoauth2", "oauthbearer"])
def test_a_session_sends_and_fetches_by_token_refreshing_both_while_online(provider, oauth_dovecot, oauth_site,
                                                                          auth):
    oauth_dovecot.save("office", mail(7))
    with TokenSmarthost(provider) as smarthost:
        oauth_site.write_config(f'\n[smarthost]\nhost = "127.0.0.1"\nport = {smarthost.port}\nstarttls = "off"\n'
                                f'username = "office"\nauth = "{auth}"\n' + oauth_table(provider, "smarthost")
                                + fetch_account(provider, oauth_dovecot.imap_port, auth))
        for name in ("isp", "smarthost"):
            refresh, _ = provider.issue()
            r = cli(oauth_site, "oauth", "login", name, "--refresh-token-stdin", input=refresh.encode() + b"\n")
            assert r.returncode == 0, r.stderr
        sent = cli(oauth_site, "sendmail", "-f", "alice@office.test", "friend@example.com",
                              input=b"Subject: out by token\r\n\r\nhello\r\n")
        assert sent.returncode == 0, sent.stderr
        before = provider.count("/token", "refresh_token")
        r = cli(oauth_site, "connect-now", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert provider.count("/token", "refresh_token") == before + 2  # one per account, with the line up
        assert [m for m, ok in smarthost.logins] == [auth.upper()] and smarthost.logins[0][1]
        assert [rcpts for _, rcpts, _ in smarthost.received] == [["friend@example.com"]]
    assert [m.split(b"Subject: ")[1][:7] for m in oauth_site.mail_of("alice")] == [b"oauth 7"]
    transcripts = list((oauth_site.spool / "sessions").glob("*.log"))
    assert transcripts
    for path in transcripts + [oauth_site.log_path]:
        text = path.read_bytes() if path.exists() else b""
        assert not [t for t in PASSWORDS if t.startswith(("refresh-", "access-")) and t.encode() in text]


@pytest.mark.parametrize("auth, abort", [("xoauth2", b""), ("oauthbearer", b"\x01")])
def test_a_smarthost_refusing_a_stale_token_gets_a_fresh_one_in_the_same_flush(provider, oauth_site, auth, abort):
    from gateway.relay.flush import flush
    with TokenSmarthost(provider) as smarthost:
        oauth_site.write_config(f'\n[smarthost]\nhost = "127.0.0.1"\nport = {smarthost.port}\nstarttls = "off"\n'
                                f'username = "office"\nauth = "{auth}"\n' + oauth_table(provider, "smarthost"))
        refresh, access = provider.issue()
        store_of(oauth_site).save("smarthost", TokenRecord(refresh_token=refresh, access_token=access,
                                                           expires_at=time.time() + 3600))
        provider.expire_access_tokens()
        cli(oauth_site, "sendmail", "-f", "alice@office.test", "friend@example.com",
            input=b"Subject: stale token\r\n\r\nhello\r\n")
        cfg = config_mod.load(oauth_site.config_path)
        cat = Catalogue(cfg.spool_dir)
        try:
            result = asyncio.run(flush(cfg, Queue(cat), force=True))
        finally:
            cat.close()
        assert result.error is None and result.sent == 1
        assert smarthost.logins == [(auth.upper(), False), (auth.upper(), True)]
        assert smarthost.aborts == [abort]  # the error challenge ended as the mechanism says
        assert [r for _, r, _ in smarthost.received] == [["friend@example.com"]]
    fresh = store_of(oauth_site).load("smarthost").access_token
    assert fresh != access
    gs2 = "user=office" if auth == "xoauth2" else "n,a=office,"  # RFC 7628's GS2 header for OAUTHBEARER
    assert smarthost.responses == [f"{gs2}\x01auth=Bearer {access}\x01\x01", f"{gs2}\x01auth=Bearer {fresh}\x01\x01"]


def test_a_refused_smarthost_token_defers_the_mail_and_the_fetch_goes_on(provider, oauth_dovecot, oauth_site):
    oauth_dovecot.save("office", mail(8))
    with TokenSmarthost(provider) as smarthost:
        oauth_site.server_extra = 'postmaster = "alice@office.test"'
        oauth_site.write_config(f'\n[smarthost]\nhost = "127.0.0.1"\nport = {smarthost.port}\nstarttls = "off"\n'
                                f'username = "office"\nauth = "xoauth2"\n' + oauth_table(provider, "smarthost")
                                + fetch_account(provider, oauth_dovecot.imap_port))
        fetch_refresh, _ = provider.issue()
        send_refresh, _ = provider.issue()
        store_of(oauth_site).save("fetch.isp", TokenRecord(refresh_token=fetch_refresh))
        store_of(oauth_site).save("smarthost", TokenRecord(refresh_token=send_refresh))
        provider.revoke(send_refresh)
        cli(oauth_site, "sendmail", "-f", "alice@office.test", "friend@example.com",
                       input=b"Subject: waits\r\n\r\nhello\r\n")
        r = cli(oauth_site, "connect-now", timeout=120)
        assert smarthost.received == [] and smarthost.logins == []
    out = r.stdout + r.stderr
    assert "refused the OAuth2 refresh token of smarthost" in out
    subjects = [m.split(b"Subject: ")[1].split(b"\n")[0] for m in oauth_site.mail_of("alice")]
    assert b"oauth 8\r" in subjects or b"oauth 8" in [s.strip() for s in subjects]
    assert any(b"OAuth2 login of smarthost refused" in m for m in oauth_site.mail_of("alice"))
    q = cli(oauth_site, "queue", "list")
    assert "friend@example.com" in q.stdout  # deferred, not bounced


# ---------------------------------------------------------------- the interactive flows


def _login(site: Site, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", DIALMAIL_CONFIG=str(site.config_path))
    return subprocess.Popen([sys.executable, "-m", "gateway", "oauth", "login", "isp", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _line_with(proc: subprocess.Popen, needle: str, deadline: float) -> str:
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if needle in line:
            return line
    proc.kill()
    raise AssertionError(f"no line with {needle!r}; stderr: {proc.stderr.read()}")


def test_device_code_login_end_to_end(provider, oauth_site):
    oauth_site.write_config(fetch_account(provider, 1))
    proc = _login(oauth_site, "--device")
    try:
        line = _line_with(proc, "enter the code", time.monotonic() + 30)
        user_code = line.split("enter the code")[1].strip()
        assert f"{provider.url}/device" in line
        provider.approve(user_code)  # the user, on another machine, approves
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "isp: refresh token signed in" in out
    rec = store_of(oauth_site).load("fetch.isp")
    assert rec.refresh_token in provider.grants and rec.access_token and rec.expires_at > time.time()
    assert rec.refresh_token not in out + err


def test_browser_login_end_to_end_the_test_is_the_browser(provider, oauth_site):
    oauth_site.write_config(fetch_account(provider, 1))
    proc = _login(oauth_site, "--browser", "--no-open")
    try:
        url = _line_with(proc, f"{provider.url}/authorize", time.monotonic() + 30).strip()
        page = requests.get(url, timeout=30)  # sign in, be redirected to dialmail's loopback port
        assert page.status_code == 200 and "dialmail has the sign-in" in page.text
        assert page.url.startswith("http://127.0.0.1:") and "code=" in page.url
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    rec = store_of(oauth_site).load("fetch.isp")
    assert rec.refresh_token in provider.grants and rec.refresh_token not in out + err


def test_an_exposed_key_file_is_refused_by_check_and_by_the_session(provider, oauth_dovecot, oauth_site):
    from cryptography.fernet import Fernet
    key = oauth_site.dir / "token.key"
    key.write_bytes(Fernet.generate_key())
    key.chmod(0o644)
    oauth_site.server_extra = f'token_key_file = "{key}"'
    oauth_site.write_config(fetch_account(provider, oauth_dovecot.imap_port))
    check = cli(oauth_site, "check")
    assert check.returncode != 0 and "token.key is readable by group or others" in check.stdout + check.stderr
    result = fetch(oauth_site)
    assert "token.key is readable by group or others" in result.errors[0]
    key.chmod(0o600)
    refresh, _ = provider.issue()
    assert cli(oauth_site, "oauth", "login", "isp", "--refresh-token-stdin", input=refresh.encode()).returncode == 0
    assert refresh.encode() not in (oauth_site.spool / "oauth" / "fetch.isp.token").read_bytes()
    oauth_dovecot.save("office", mail(9))
    assert fetch(oauth_site).fetched == 1


def test_status_and_check_before_any_login(provider, oauth_site):
    oauth_site.write_config(fetch_account(provider, 1))
    status = cli(oauth_site, "oauth", "status")
    assert status.returncode == 1 and "isp (generic): no token: run `dialmail oauth login isp`" in status.stdout
    check = cli(oauth_site, "check")
    assert "no token stored yet: run `dialmail oauth login isp`" in check.stdout + check.stderr
    assert "password_file" not in check.stdout + check.stderr


def test_the_refresh_goes_over_the_dialled_line_and_counts_in_its_bytes(provider, oauth_dovecot, oauth_site):
    """The token endpoint is reachable only through the simulated line (as the provider is only
    reachable through the modem): offline the refresh fails as the line's problem and the token
    stays good; online it is carried, and counted, by the link."""
    from spool.sessions import SessionLog
    token_port, imap_port = free_port(), free_port()
    account = fetch_account(provider, imap_port).replace(provider.url, f"http://127.0.0.1:{token_port}")
    link = f"""
[link]
type = "sim"
rate = 115200
dial_delay = "0.2s"
forward = ["127.0.0.1:{token_port}->127.0.0.1:{provider.port}",
           "127.0.0.1:{imap_port}->127.0.0.1:{oauth_dovecot.imap_port}"]
[session]
idle_timeout = "20s"
"""
    refresh, _ = provider.issue()
    store_of(oauth_site).save("fetch.isp", TokenRecord(refresh_token=refresh, stored_at=time.time()))
    oauth_dovecot.save("office", mail(10))
    refreshes = provider.count("/token", "refresh_token")
    # the IMAP server reachable without the line, the token endpoint only over it
    oauth_site.write_config(account.replace(f"port = {imap_port}", f"port = {oauth_dovecot.imap_port}") + link)
    offline = fetch(oauth_site)
    assert "could not reach the token endpoint of isp" in offline.errors[0] and "kept" in offline.errors[0]
    assert store_of(oauth_site).load("fetch.isp").state == "valid"
    oauth_site.write_config(account + link)
    offline = fetch(oauth_site)  # both only over the line, which is down: no token request at all
    assert "connection lost" in offline.errors[0] and provider.count("/token", "refresh_token") == refreshes
    first = cli(oauth_site, "connect-now", "--fetch-only", timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    assert provider.count("/token", "refresh_token") == refreshes + 1
    oauth_dovecot.save("office", mail(11))
    second = cli(oauth_site, "connect-now", "--fetch-only", timeout=120)
    assert second.returncode == 0 and provider.count("/token", "refresh_token") == refreshes + 1
    cat = Catalogue(oauth_site.spool)
    try:
        (_, with_refresh), (_, without) = SessionLog(cat).last(2)
    finally:
        cat.close()
    assert with_refresh.fetched == without.fetched == 1
    refresh_body = len(f"grant_type=refresh_token&refresh_token={refresh}&scope=mail&client_id={CLIENT_ID}")
    print(f"\nsession bytes up/down: {with_refresh.bytes_up}/{with_refresh.bytes_down} with the refresh, "
          f"{without.bytes_up}/{without.bytes_down} without")
    assert with_refresh.bytes_up - without.bytes_up >= refresh_body
    assert with_refresh.bytes_down - without.bytes_down >= 100  # the token endpoint's answer
