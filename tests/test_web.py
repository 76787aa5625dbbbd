"""The web console over plain HTTP against the real daemon: who may open what, CSRF on
every POST, the cookie, the shared login lockout, and that the console's changes are the
CLI's changes (both read the same spool).  tests/test_web_browser.py drives it in Chromium."""
import asyncio
import html
import os
import poplib
import re
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import aiosmtplib
import pytest

from gateway.config import loads
from gateway.web import autoconfig
from tests.harness import wait_for
from tests.peers import PeerStartError, free_port, make_self_signed_cert
from tests.test_session import submit
from tests.web_console import ADMIN, ADMIN_PW, USER, USER_PW, Client, start_console

pytestmark = pytest.mark.timeout(120)

CONSOLE_SOURCE = (Path(__file__).resolve().parent.parent / "gateway" / "web" / "console.py").read_text()
ADMIN_PAGES = ["/sessions", "/queue", "/quarantine", "/users"]
SAMPLE_PARAMS = {"{sid:int}": "1", "{qid}": "ABC", "{action}": "hold", "{name}": USER, "{key}": "k"}


def _routes(method: str) -> list[str]:
    """Every path the console answers for ``method``, its parameters filled in."""
    paths = re.findall(r'Route\("([^"]+)", self\.\w+, methods=\["' + method + r'"\]\)', CONSOLE_SOURCE)
    assert paths, f"no {method} routes found in console.py"
    out = []
    for p in paths:
        for param, value in SAMPLE_PARAMS.items():
            p = p.replace(param, value)
        assert "{" not in p, p
        out.append(p)
    return out


def queued_id(site) -> str:
    """The id of the one message ``dialmail mailq`` lists."""
    out = site.cli("mailq").stdout.decode()
    found = re.findall(r"^(\S+)\s+\d+[smhd]\s", out, re.M)
    assert len(found) == 1, out
    return found[0]


def test_route_listing_sees_every_page():
    assert set(_routes("GET")) >= {"/", "/login", "/sessions", "/queue", "/quarantine", "/users", "/me", "/events"}
    assert "/connect-now" in _routes("POST")


def test_no_page_opens_without_login_except_login_and_static_files(site):
    web = Client(start_console(site))
    for path in _routes("GET"):
        r = web.get(path)
        if path == "/login":
            assert r.status == 200 and 'name="password"' in r.text
            continue
        assert r.status == 303 and r.location.startswith("/login?next="), (path, r.status, r.location)
    for path in _routes("POST"):
        if path in ("/login", "/logout"):  # open to all: logging out of no login changes nothing
            continue
        r = web.post(path, {"mode": "both"})
        assert r.status == 401, (path, r.status)
    for static in ("/static/htmx.min.js", "/static/console.js", "/static/console.css"):
        assert web.get(static).status == 200, static
    assert not site.users.exists("x") and "session 1" not in site.cli("log").stdout.decode()


def test_every_post_without_its_csrf_token_is_refused(site):
    base = start_console(site)
    submit(site.smtp_port, 1)
    qid = queued_id(site)
    web = Client(base)
    assert web.login(ADMIN, ADMIN_PW).status == 303
    posts = [p.replace("ABC", qid) for p in _routes("POST")]
    for path in posts:
        r = web.post(path, {"user": "mallory", "password": "mallory-pw-77", "mode": "both", "enabled": "on",
                            "body": "gone", "new": "x", "old": ADMIN_PW}, csrf=False)
        assert r.status == 403 and "CSRF" in r.text, (path, r.status, r.text[:200])
        # A token from another session is no better than none.
        r = web.post(path, {"csrf": "not-this-sessions-token"}, csrf=False)
        assert r.status == 403, path
    assert not site.users.exists("mallory")
    assert site.users.exists(USER)
    assert qid in site.cli("mailq").stdout.decode() and "(held)" not in site.cli("mailq").stdout.decode()
    assert "session 1" not in site.cli("log").stdout.decode()
    # The login form is a POST like any other: no token, no login.
    fresh = Client(base)
    fresh.get("/login")
    r = fresh.post("/login", {"user": ADMIN, "password": ADMIN_PW}, csrf=False)
    assert r.status == 403 and fresh.get("/").status == 303


def test_admin_pages_answer_403_to_other_users(site):
    web = Client(start_console(site))
    assert web.login(USER, USER_PW).status == 303
    for path in ADMIN_PAGES + ["/queue/ABC", "/sessions/1/transcript"]:
        assert web.get(path).status == 403, path
    for path in ("/users", f"/users/{ADMIN}/password", f"/users/{ADMIN}/delete", f"/users/{ADMIN}/out-of-office",
                 "/queue/flush", "/queue/ABC/delete", "/quarantine/k/delete"):
        assert web.post(path, {"user": "eve", "password": "eve-pw-55", "enabled": "on", "body": "x"}).status == 403
    assert site.users.exists(ADMIN) and not site.users.exists("eve")
    assert site.users.verify(ADMIN, ADMIN_PW)
    me = web.get("/me")
    assert me.status == 200 and f"<h1>{USER}</h1>" in me.text
    home = web.get("/")
    assert home.status == 200 and 'href="/queue"' not in home.text and "Connect now" in home.text


def test_users_may_connect_false_keeps_the_button_for_admins(site):
    web = Client(start_console(site, web_extra="users_may_connect = false"))
    web.login(USER, USER_PW)
    assert "Connect now" not in web.get("/").text
    assert web.post("/connect-now", {"mode": "both"}).status == 403
    assert "session 1" not in site.cli("log").stdout.decode()


def test_cookie_is_signed_httponly_samesite_and_its_key_is_private(site):
    base = start_console(site)
    web = Client(base)
    web.get("/login")
    r = web.post("/login", {"user": ADMIN, "password": ADMIN_PW, "next": "/"})
    cookie = r.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert "secure" not in cookie.lower()  # no TLS on this console: a Secure cookie would never come back
    assert ADMIN_PW not in cookie
    secret = site.spool / "console.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    # A cookie whose value was changed is no login.
    for c in web.jar:
        c.value = c.value[:-3] + ("AAA" if not c.value.endswith("AAA") else "BBB")
    assert web.get("/").status == 303
    site.stop()
    os.chmod(secret, 0o640)
    with pytest.raises(PeerStartError):
        site.start()
        wait_for(lambda: site.proc.poll() is not None, timeout=20, what="the daemon to refuse the key")
        raise PeerStartError("exited")
    assert "console.key" in site.log() and "chmod 600" in site.log()


def test_web_logins_share_the_smtp_lockout(site):
    base = start_console(site, smtp_extra='max_auth_failures = 3\nauth_lockout = "1h"')

    async def wrong_smtp_auth():
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=site.smtp_port) as c:
            with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                await c.auth_plain(ADMIN, "wrong-guess-1")  # one try; login() tries every mechanism
    asyncio.run(wrong_smtp_auth())
    asyncio.run(wrong_smtp_auth())
    web = Client(base)
    web.get("/login")
    assert web.post("/login", {"user": ADMIN, "password": "wrong-guess-2"}).status == 401
    locked = web.post("/login", {"user": ADMIN, "password": ADMIN_PW})
    assert locked.status == 429 and "too many failed logins" in locked.text
    assert web.get("/").status == 303


def test_failed_web_logins_lock_pop3_too(site):
    base = start_console(site, smtp_extra='max_auth_failures = 10\nauth_lockout = "1h"',
                         pop3_extra='max_failures = 3\nlockout = "1h"')
    web = Client(base)
    web.get("/login")
    for guess in ("wrong-web-guess-1", "wrong-web-guess-2", "wrong-web-guess-3"):
        assert web.post("/login", {"user": USER, "password": guess}).status == 401
    pop = poplib.POP3("127.0.0.1", site.pop3_port, timeout=10)
    pop.user(USER)
    with pytest.raises(poplib.error_proto) as refused:
        pop.pass_(USER_PW)  # the right password, from a locked-out address
    assert refused.value.args[0] == b"-ERR [AUTH] Too many failed logins from your address, try again later"
    pop.quit()


def _outbound_to(site, rcpt: str) -> bool:
    return rcpt in site.cli("mailq").stdout.decode()


def test_user_sets_own_forwarding_and_mail_follows_it_keeping_a_copy(site):
    base = start_console(site)
    bob = Client(base)
    bob.login(USER, USER_PW)
    bob.get("/me")
    assert bob.post("/me/forwarding", {"enabled": "on", "to": "bob.home@elsewhere.test",
                                       "keep": "on"}).status == 303
    assert "mail to bob goes to bob.home@elsewhere.test, keeping a copy" in bob.get("/me").text
    shown = site.cli("users", "forward", USER, "--show").stdout.decode()
    assert shown == "bob: to bob.home@elsewhere.test, keeping a copy\n"
    assert "bob.home@elsewhere.test (keeps a copy) [set in the spool]" in site.cli("aliases", "list").stdout.decode()
    submit(site.smtp_port, 1, to=f"{USER}@office.test")
    wait_for(lambda: _outbound_to(site, "bob.home@elsewhere.test"), what="the forwarded copy queued out")
    wait_for(lambda: len(site.mail_of(USER)) == 1, what="bob's own copy")

    # Without keep, the next message only goes out; the CLI's change is what the console shows.
    site.cli("users", "forward", USER, "--to", "bob.away@elsewhere.test", check=True)
    assert "to bob.away@elsewhere.test" in bob.get("/me").text
    submit(site.smtp_port, 1, to=f"{USER}@office.test")
    wait_for(lambda: _outbound_to(site, "bob.away@elsewhere.test"), what="the second copy queued out")
    assert len(site.mail_of(USER)) == 1
    bob.post("/me/forwarding", {})
    assert site.cli("users", "forward", USER, "--show").stdout.decode() == "bob: not forwarded\n"


def test_forwarding_is_checked_and_only_ones_own(site):
    base = start_console(site)
    bob = Client(base)
    bob.login(USER, USER_PW)
    bob.get("/me")
    assert bob.post(f"/users/{ADMIN}/forwarding", {"enabled": "on", "to": "x@elsewhere.test"}).status == 403
    # The name comes from the session: a "user" field in the form changes nothing.
    bob.post("/me/forwarding", {"enabled": "on", "to": "bob.home@elsewhere.test", "user": ADMIN})
    assert site.cli("users", "forward", ADMIN, "--show").stdout.decode() == "alice: not forwarded\n"
    bob.post("/me/forwarding", {"enabled": "on", "to": "nobody-here@office.test"})
    page = html.unescape(bob.get("/me").text)
    assert "forwarding not changed: 'nobody-here@office.test' is nobody here" in page
    bad = site.cli("users", "forward", USER, "--to", "not an address@x")
    assert bad.returncode != 0 and b"is not a valid mail address" in bad.stderr
    assert site.cli("users", "forward", USER, "--show").stdout.decode() == "bob: to bob.home@elsewhere.test\n"
    admin = Client(base)
    admin.login(ADMIN, ADMIN_PW)
    admin.get("/users")
    admin.post(f"/users/{USER}/forwarding", {"enabled": "on", "to": ADMIN, "keep": "on"})
    assert "mail to bob goes to alice, keeping a copy" in admin.get("/users").text
    assert site.cli("users", "forward", USER, "--show").stdout.decode() == "bob: to alice, keeping a copy\n"


def test_queue_changes_in_the_console_are_the_clis(site):
    base = start_console(site)
    submit(site.smtp_port, 1)
    qid = queued_id(site)
    web = Client(base)
    web.login(ADMIN, ADMIN_PW)
    page = web.get("/queue")
    assert qid in page.text and "partner@elsewhere.test" in page.text
    assert "Subject: outbound 0" in web.get(f"/queue/{qid}").text
    assert web.post(f"/queue/{qid}/hold").status == 303
    assert "(held)" in site.cli("mailq").stdout.decode()
    assert f"{qid}: held" in web.get("/queue").text
    web.post(f"/queue/{qid}/release")
    assert "(held)" not in site.cli("mailq").stdout.decode()
    site.cli("queue", "hold", qid, check=True)
    assert 'class="held"' in web.get("/queue").text
    web.post(f"/queue/{qid}/delete")
    assert "queue is empty" in site.cli("mailq").stdout.decode()


def test_user_added_in_the_console_logs_in_to_pop3_and_changes_own_password(site):
    base = start_console(site)
    web = Client(base)
    web.login(ADMIN, ADMIN_PW)
    web.get("/users")
    assert web.post("/users", {"user": "dora", "password": "dora-pw-31"}).status == 303
    assert "user dora added" in web.get("/users").text
    pop = poplib.POP3("127.0.0.1", site.pop3_port, timeout=10)
    pop.user("dora")
    assert pop.pass_("dora-pw-31").startswith(b"+OK")
    pop.quit()
    dora = Client(base)
    dora.login("dora", "dora-pw-31")
    dora.get("/me")
    dora.post("/me/password", {"old": "wrong-old-pw", "new": "dora-pw-32"})
    assert "the old password is wrong" in dora.get("/me").text
    assert site.users.verify("dora", "dora-pw-31")
    dora.post("/me/password", {"old": "dora-pw-31", "new": "dora-pw-32"})
    assert site.users.verify("dora", "dora-pw-32")
    for page in (web.get("/users").text, dora.get("/me").text):
        assert "dora-pw" not in page
    assert "dora-pw" not in site.log()


def test_out_of_office_from_the_console_is_what_the_cli_shows(site):
    base = start_console(site)
    web = Client(base)
    web.login(USER, USER_PW)
    web.get("/me")
    web.post("/me/out-of-office", {"enabled": "on", "start": "2026-01-01", "end": "2099-12-31",
                                   "subject": "Away until spring", "body": "Back in March."})
    shown = site.cli("users", "vacation", USER, "--show").stdout.decode()
    assert "on from 2026-01-01" in shown and "Away until spring" in shown
    assert "on: Away until spring" in web.get("/me").text
    web.post("/me/out-of-office", {"enabled": "on", "start": "2026-05-01", "end": "2026-04-01", "body": "x"})
    assert "the end is before the start" in web.get("/me").text
    assert "Away until spring" in site.cli("users", "vacation", USER, "--show").stdout.decode()
    web.post("/me/out-of-office", {})
    assert f"{USER}: off" in site.cli("users", "vacation", USER, "--show").stdout.decode()


def test_connect_now_streams_the_sessions_lines_as_server_sent_events(site):
    closed = free_port()
    base = start_console(site, extra=f'[link]\ntype = "always-on"\n[smarthost]\nhost = "127.0.0.1"\n'
                                     f'port = {closed}\nstarttls = "off"\n')
    submit(site.smtp_port, 1)
    web = Client(base)
    web.login(ADMIN, ADMIN_PW)
    r = web.post("/connect-now", {"mode": "send"}, headers={"HX-Request": "true"})
    assert r.status == 200 and 'data-events="/events?after=0"' in r.text
    stream = web.get("/events?after=0")
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = re.findall(r"event: (\w+)\ndata: (.*)\n\n", stream.text)
    lines = [text for kind, text in events if kind == "line"]
    assert "session 1 (manual, send)" in lines[0]
    assert any("sending done: 0 sent, 1 deferred" in ln and f"127.0.0.1:{closed}" in ln for ln in lines), lines
    assert events[-1] == ("end", "partial")
    # The same words as `dialmail log` and the dashboard's last session.
    assert "partial" in site.cli("log").stdout.decode()
    assert "#1 partial (manual)" in web.get("/").text


def test_no_web_section_no_console_and_loopback_by_default():
    base = '[server]\nhostname = "m.office.test"\ndomains = ["office.test"]\nspool_dir = "/tmp/x"\n'
    assert loads(base).web.listen == ()
    cfg = loads(base + "[web]\nadmins = [\"Alice\"]\n")
    assert [str(x) for x in cfg.web.listen] == ["127.0.0.1:8025"] and cfg.web.admins == ("alice",)
    assert cfg.web.users_may_connect is True


def test_demo_stay_keeps_the_console_up_and_prints_its_login(tmp_path):
    out = tmp_path / "demo.out"
    with open(out, "wb") as f:
        demo = subprocess.Popen([sys.executable, "-m", "gateway", "demo", "--stay"], stdout=f, stderr=f,
                                cwd=Path(__file__).resolve().parent.parent)
    try:
        wait_for(lambda: "Ctrl-C ends the demo" in out.read_text(errors="replace") or demo.poll() is not None,
                 timeout=90, what="the demo to finish its session")
        text = out.read_text(errors="replace")
        assert "every message arrived where it should" in text, text[-3000:]
        url = re.search(r"web console: (http://127\.0\.0\.1:\d+/)\s+\(log in as alice, password alice-pw\)",
                        text).group(1)
        web = Client(url.rstrip("/"))
        assert web.login("alice", "alice-pw").status == 303
        assert "#1 ok (manual)" in web.get("/").text
        demo.send_signal(signal.SIGINT)
        assert demo.wait(30) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()


def test_check_names_the_console_and_an_admin_who_is_no_user(site):
    port = free_port()
    site.write_config(f'[web]\nlisten = ["127.0.0.1:{port}"]\nadmins = ["alice", "zoe"]\n')
    r = site.cli("check")
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, out + err
    assert f"web console   http://127.0.0.1:{port}/  admins alice, zoe" in out
    assert "'zoe' is not a local user" in err and "dialmail users add zoe" in err
    assert "'alice'" not in err


def test_console_speaks_https_with_the_smtp_certificate_and_its_cookie_is_secure(site, tmp_path):
    import ssl
    cert, key = make_self_signed_cert(tmp_path, cn="127.0.0.1")
    base = start_console(site, smtp_extra=f'tls_cert = "{cert}"\ntls_key = "{key}"').replace("http:", "https:")
    web = Client(base, tls=ssl.create_default_context(cafile=str(cert)))
    web.get("/login")
    r = web.post("/login", {"user": ADMIN, "password": ADMIN_PW, "next": "/"})
    assert r.status == 303
    assert "; secure" in r.headers["set-cookie"].lower()
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP on the TLS port gets no page
        urllib.request.urlopen(base.replace("https:", "http:") + "/login", timeout=10)


def test_quarantine_lists_the_reason_releases_to_the_recipient_and_deletes(site):
    base = start_console(site, extra='[blocklist]\nsenders = ["spam.example"]\n')
    for n in (1, 2):
        msg = f"From: x@spam.example\r\nTo: bob@office.test\r\nSubject: offer {n}\r\n\r\nbuy now\r\n".encode()
        site.cli("sendmail", "-f", "x@spam.example", "bob@office.test", input=msg, check=True)
    md = site.spool / "mail" / "quarantine"
    wait_for(lambda: md.is_dir() and len(list((md / "new").iterdir())) == 2, timeout=20,
             what="both messages in the quarantine")
    assert site.mail_of(USER) == []
    web = Client(base)
    web.login(ADMIN, ADMIN_PW)
    page = web.get("/quarantine").text
    for said in ("x@spam.example", "offer 1", "offer 2", "bob@office.test", "block"):
        assert said in page, said
    keys = {re.search(rb"Subject: (offer \d)", p.read_bytes()).group(1).decode(): p.name
            for p in (md / "new").iterdir()}
    listed = site.cli("quarantine", "list").stdout.decode()
    assert keys["offer 1"] in listed and keys["offer 2"] in listed and "x@spam.example" in listed
    assert web.post("/quarantine/no-such-key/delete").status == 303
    assert "no-such-key is not in the quarantine" in web.get("/quarantine").text
    assert len(list((md / "new").iterdir())) == 2
    web.post(f"/quarantine/{keys['offer 1']}/release")
    assert "released as" in web.get("/quarantine").text
    got = wait_for(lambda: site.mail_of(USER), timeout=20, what="the released message in bob's mailbox")
    assert len(got) == 1 and b"Subject: offer 1" in got[0]
    assert b"X-Dialmail-Quarantine" not in got[0] and b"Delivered-To: quarantine" not in got[0]
    assert b"Return-Path: <x@spam.example>" in got[0]
    web.post(f"/quarantine/{keys['offer 2']}/delete")
    assert list((md / "new").iterdir()) == [] and "The quarantine is empty" in web.get("/quarantine").text
    assert site.cli("quarantine", "list").stdout.decode().strip() == "the quarantine is empty"
    assert len(site.mail_of(USER)) == 1


def test_admin_resets_a_password_sets_an_out_of_office_and_deletes_a_user(site):
    base = start_console(site)
    web = Client(base)
    web.login(ADMIN, ADMIN_PW)
    web.get("/users")
    web.post(f"/users/{USER}/password", {"password": "bob-new-pw-8"})
    assert site.users.verify(USER, "bob-new-pw-8") and not site.users.verify(USER, USER_PW)
    web.post(f"/users/{USER}/out-of-office", {"enabled": "on", "subject": "Parental leave", "body": "Ask alice."})
    assert "Parental leave" in site.cli("users", "vacation", USER, "--show").stdout.decode()
    assert "ON: Parental leave" in web.get("/users").text
    web.post("/users/nobody-here/out-of-office", {"enabled": "on", "body": "x"})
    assert "no such user: nobody-here" in web.get("/users").text
    bob = Client(base)
    bob.login(USER, "bob-new-pw-8")
    assert bob.get("/me").status == 200
    web.post(f"/users/{USER}/delete")
    assert not site.users.exists(USER)
    assert bob.get("/me").status == 303  # logged in before the delete: out now
    assert f"user {USER} deleted (mailbox kept)" in web.get("/users").text
    assert USER not in site.cli("users", "list").stdout.decode().split()
    web.post("/users", {"user": "zed@other.example", "password": "zed-pw-4"})
    assert "other.example is not a local domain" in web.get("/users").text


def test_users_page_shows_aliases_and_groups_as_the_cli_lists_them(site):
    base = start_console(site, extra='[aliases]\nsales = ["alice", "bob"]\n'
                                     '[groups.support]\nmembers = ["alice", "bob"]\nmode = "round-robin"\n')
    web = Client(base)
    web.login(ADMIN, ADMIN_PW)
    page = web.get("/users").text
    shown = html.unescape(re.search(r'<pre id="aliases">(.*?)</pre>', page, re.S).group(1))
    assert shown == site.cli("aliases", "list").stdout.decode().rstrip("\n")
    assert "sales@office.test" in shown and "support@office.test" in shown


def test_mail_text_is_escaped_and_login_goes_back_only_to_this_console(site):
    base = start_console(site)

    async def hostile():
        msg = (b"From: alice@office.test\r\nTo: x@elsewhere.test\r\n"
               b"Subject: <script>alert(1)</script>\r\n\r\nbody\r\n")
        await aiosmtplib.send(msg, sender="alice@office.test", recipients=["x@elsewhere.test"],
                              hostname="127.0.0.1", port=site.smtp_port)
    asyncio.run(hostile())
    for target, lands in (("/queue", "/queue"), ("//evil.example/", "/"), ("/\\evil.example", "/"),
                          ("https://evil.example/", "/")):
        web = Client(base)
        web.get("/login")
        r = web.post("/login", {"user": ADMIN, "password": ADMIN_PW, "next": target})
        assert r.status == 303 and r.location == lands, (target, r.location)
    page = web.get("/queue").text
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_bounce_returns_the_message_to_its_local_sender_and_flush_starts_a_send_session(site):
    closed = free_port()
    base = start_console(site, extra=f'[link]\ntype = "always-on"\n[smarthost]\nhost = "127.0.0.1"\n'
                                     f'port = {closed}\nstarttls = "off"\n')
    submit(site.smtp_port, 1)
    qid = queued_id(site)
    web = Client(base)
    web.login(ADMIN, ADMIN_PW)
    web.get("/queue")
    web.post(f"/queue/{qid}/bounce")
    assert f"{qid}: bounced to <alice@office.test>" in html.unescape(web.get("/queue").text)
    bounce = wait_for(lambda: site.mail_of(ADMIN), timeout=20, what="the bounce in alice's mailbox")
    assert b"outbound 0" in bounce[0] and b"multipart/report" in bounce[0]
    assert qid not in site.cli("mailq").stdout.decode()
    submit(site.smtp_port, 1)
    web.get("/queue")
    assert web.post("/queue/flush").status == 303
    assert "flush: 1 message(s) go now" in web.get("/").text
    log = wait_for(lambda: "flush" in (out := site.cli("log").stdout.decode()) and "partial" in out and out,
                   timeout=30, what="the flush session in the log")
    assert "connection refused" in " ".join(log.split())


def test_line_efficiency_weighs_the_busier_direction_against_the_connect_rate():
    from gateway.web.charts import efficiency
    from spool.sessions import SessionRecord
    # 10 s at 33600 bit/s carry 42000 bytes each way at once (full duplex).
    rec = SessionRecord("manual", connect_rate=33600, connected_at=100.0, hung_up_at=110.0, online_seconds=10.0,
                        bytes_up=21000, bytes_down=4200)
    assert efficiency(rec) == 50.0
    assert efficiency(SessionRecord("manual", connect_rate=None, bytes_up=1)) is None


# ------------------------------------------------------------ mail client auto-configuration

AUTODISCOVER_REQUEST = (
    '<?xml version="1.0" encoding="utf-8"?>\n'
    '<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">'
    "<Request><EMailAddress>{address}</EMailAddress><AcceptableResponseSchema>"
    "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
    "</AcceptableResponseSchema></Request></Autodiscover>")
OUTLOOK = "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}"


def _raw(base: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(base + path, body, headers={"Content-Type": "text/xml"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _client_settings_lines(site, name: str) -> dict[str, tuple[str, int, str]]:
    """``dialmail users add``'s client settings: protocol -> (host, port, security word)."""
    r = site.cli("users", "add", name, "--password-stdin", input=b"carol-autoconf-pw-31\n")
    assert r.returncode == 0, r.stderr
    found = re.findall(r"^\s+(?:incoming|outgoing) \((\w+)\)\s+(\S+)\s+port (\d+)\s+security (\w+)",
                       r.stdout.decode(), re.M)
    return {proto: (host, int(port), security) for proto, host, port, security in found}


def test_autoconfig_and_autodiscover_open_without_login_and_agree_with_users_add(site):
    base = start_console(site)
    printed = _client_settings_lines(site, "carol")
    assert set(printed) == {"POP3", "SMTP"}  # the test site runs no IMAP
    host = "mail.office.test"

    for path in autoconfig.THUNDERBIRD_PATHS:
        status, body = _raw(base, path + "?emailaddress=carol%40office.test")
        assert status == 200, (path, body[:200])
        root = ET.fromstring(body)
        provider = root.find("emailProvider")
        assert root.tag == "clientConfig" and provider.get("id") == "office.test"
        assert [d.text for d in provider.findall("domain")] == ["office.test"]
        pop3 = provider.find("incomingServer")
        assert pop3.get("type") == "pop3"
        assert [(c.tag, c.text) for c in pop3] == [
            ("hostname", host), ("port", str(site.pop3_port)), ("socketType", "plain"),
            ("authentication", "password-cleartext"), ("username", "%EMAILLOCALPART%")]
        smtp = provider.find("outgoingServer")
        assert smtp.get("type") == "smtp"
        assert [(c.tag, c.text) for c in smtp] == [
            ("hostname", host), ("port", str(site.smtp_port)), ("socketType", "plain"), ("authentication", "none")]
        assert printed["POP3"] == (host, site.pop3_port, "none") and printed["SMTP"] == (host, site.smtp_port, "none")
    assert _raw(base, autoconfig.THUNDERBIRD_PATHS[0] + "?emailaddress=x%40elsewhere.example")[0] == 404

    for path in autoconfig.AUTODISCOVER_PATHS:
        # No login, no cookie, no CSRF token: a public, read-only answer.
        status, body = _raw(base, path, AUTODISCOVER_REQUEST.format(address="Carol@office.test").encode())
        assert status == 200, (path, body[:200])
        account = ET.fromstring(body).find(f"{OUTLOOK}Response/{OUTLOOK}Account")
        assert account.findtext(f"{OUTLOOK}AccountType") == "email"
        protocols = {p.findtext(f"{OUTLOOK}Type"): {c.tag.removeprefix(OUTLOOK): c.text for c in p}
                     for p in account.findall(f"{OUTLOOK}Protocol")}
        assert protocols == {
            "POP3": {"Type": "POP3", "Server": host, "Port": str(site.pop3_port), "DomainRequired": "off",
                     "LoginName": "carol", "SPA": "off", "SSL": "off", "Encryption": "None", "AuthRequired": "on"},
            "SMTP": {"Type": "SMTP", "Server": host, "Port": str(site.smtp_port), "DomainRequired": "off",
                     "LoginName": "carol", "SPA": "off", "SSL": "off", "Encryption": "None", "AuthRequired": "off"}}
    # Escaped, never echoed: an address that is markup names no local domain and gets a 404.
    status, body = _raw(base, autoconfig.AUTODISCOVER_PATHS[0],
                        AUTODISCOVER_REQUEST.format(address="a&lt;b&gt;@evil.example").encode())
    assert status == 404 and b"<b>" not in body
    # Only the autodiscover paths answer a POST without a token; their neighbours do not.
    for other in ("/AUTODISCOVER/AUTODISCOVER.XML", "/autodiscover/autodiscover.xml/x", "/mail/config-v1.1.xml"):
        status, _ = _raw(base, other, AUTODISCOVER_REQUEST.format(address="carol@office.test").encode())
        assert status in (404, 405), (other, status)


def test_autodiscover_refuses_oversized_and_entity_laden_requests(site):
    base = start_console(site)
    path = autoconfig.AUTODISCOVER_PATHS[0]
    padding = "<!--" + "x" * (autoconfig.MAX_REQUEST + 10) + "-->"
    status, body = _raw(base, path, AUTODISCOVER_REQUEST.format(address="carol@office.test").encode() + padding.encode())
    assert status == 400 and b"too large" in body
    laughs = ('<?xml version="1.0"?>\n<!DOCTYPE r [<!ENTITY a "aaaaaaaaaa">'
              '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>'
              '<Autodiscover><Request><EMailAddress>&c;@office.test</EMailAddress></Request></Autodiscover>')
    status, body = _raw(base, path, laughs.encode())
    assert status == 400 and b"DTD" in body
    external = ('<?xml version="1.0"?>\n<!DOCTYPE r SYSTEM "file:///etc/passwd">'
                '<Autodiscover><Request><EMailAddress>x@office.test</EMailAddress></Request></Autodiscover>')
    assert _raw(base, path, external.encode())[0] == 400
    assert _raw(base, path, b"not xml at all")[0] == 400
    assert _raw(base, path, b"<Autodiscover/>")[0] == 400
    assert site.proc.poll() is None  # the daemon is still up


# ------------------------------------------------------------ OAuth2 sign-in on the dashboard

def test_dashboard_names_the_oauth_account_that_needs_a_sign_in(site):
    fetch = ('\n[[fetch]]\nname = "isp"\nhost = "127.0.0.1"\nport = 9\ntls = "off"\nusername = "office"\n'
             'deliver_to = "alice"\nauth = "xoauth2"\n[fetch.oauth]\nprovider = "generic"\n'
             'client_id = "dialmail-test-client"\ntoken_url = "http://127.0.0.1:9/token"\n'
             'device_url = "http://127.0.0.1:9/devicecode"\nauthorization_url = "http://127.0.0.1:9/authorize"\n'
             'scopes = ["mail"]\n')
    base = start_console(site, extra=fetch)
    status = site.cli("status").stdout.decode()
    assert "oauth: isp: no token: run `dialmail oauth login isp`" in status
    admin = Client(base)
    assert admin.login(ADMIN, ADMIN_PW).status == 303
    page = html.unescape(admin.get("/").text)
    assert 'id="oauth-sign-ins"' in page and "isp: no token: run `dialmail oauth login isp`" in page
    user = Client(base)
    assert user.login(USER, USER_PW).status == 303
    assert "oauth-sign-ins" not in user.get("/").text  # the admins' business


def test_dashboard_has_no_sign_in_card_without_oauth(site):
    admin = Client(start_console(site))
    assert admin.login(ADMIN, ADMIN_PW).status == 303
    assert "oauth-sign-ins" not in admin.get("/").text


def test_autoconfig_names_imap_with_starttls_and_submission_when_configured(tmp_path):
    cert, key = make_self_signed_cert(tmp_path)
    cfg = loads(f'[server]\nhostname = "m.office.test"\ndomains = ["office.test", "branch.test"]\n'
                f'spool_dir = "{tmp_path}"\n[smtp]\nlisten = ["127.0.0.1:2525"]\n'
                f'[pop3]\nlisten = ["127.0.0.1:1110"]\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
                f'[imap]\ndovecot = "external"\nlisten = ["127.0.0.1:1143"]\n'
                f'[submission]\nlisten = ["127.0.0.1:1587"]\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    provider = ET.fromstring(autoconfig.thunderbird(cfg, "dora@branch.test")).find("emailProvider")
    assert provider.get("id") == "branch.test"
    assert [d.text for d in provider.findall("domain")] == ["office.test", "branch.test"]
    servers = [(s.tag, s.get("type"), s.findtext("port"), s.findtext("socketType"), s.findtext("authentication"))
               for s in provider if s.tag.endswith("Server")]
    assert servers == [("incomingServer", "imap", "1143", "STARTTLS", "password-cleartext"),
                       ("incomingServer", "pop3", "1110", "STARTTLS", "password-cleartext"),
                       ("outgoingServer", "smtp", "1587", "STARTTLS", "password-cleartext")]
    root = ET.fromstring(autoconfig.outlook(cfg, "dora@branch.test", "dora"))
    kinds = [(p.findtext(f"{OUTLOOK}Type"), p.findtext(f"{OUTLOOK}Port"), p.findtext(f"{OUTLOOK}Encryption"))
             for p in root.iter(f"{OUTLOOK}Protocol")]
    assert kinds == [("IMAP", "1143", "TLS"), ("POP3", "1110", "TLS"), ("SMTP", "1587", "TLS")]
