"""Webmail: Debian's Roundcube on the configuration dialmail writes for it.

Roundcube is run as the tests run every peer: PHP's built-in server on 127.0.0.1, here
over a Dovecot that offers STARTTLS with a self-signed certificate.  What is proven is
that the configuration is complete: Roundcube logs in over verified TLS and lists mail.
"""

import http.cookiejar
import json
import re
import urllib.error
import urllib.parse
import urllib.request

import pytest

from gateway.webmail import roundcube
from tests.peers import Roundcube, need

pytestmark = pytest.mark.peer


def need_roundcube() -> None:
    need("php")
    if not (roundcube.DEBIAN_DOCROOT / "index.php").exists():
        pytest.skip("needs Roundcube (Debian: apt-get install roundcube-core roundcube-sqlite3 php-cgi; "
                    "see tests/peers-debian.txt)")


class Browser:
    """Roundcube's login form and its JSON list request, as a browser sends them."""

    def __init__(self, base: str):
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        self.token = ""

    def get(self, query: str = "", headers: dict | None = None) -> str:
        request = urllib.request.Request(self.base + query, headers=headers or {})
        return self.opener.open(request, timeout=30).read().decode()

    def login(self, user: str, password: str) -> str:
        page = self.get()
        token = re.search(r'name="_token" value="([^"]+)"', page)
        assert token, page[:2000]
        form = {"_token": token.group(1), "_task": "login", "_action": "login", "_timezone": "UTC",
                "_url": "", "_user": user, "_pass": password}
        reply = self.opener.open(self.base + "?_task=login", urllib.parse.urlencode(form).encode(), timeout=30)
        page = reply.read().decode()
        found = re.search(r'"request_token":"([^"]+)"', page)
        self.token = found.group(1) if found else ""
        return reply.geturl()

    def inbox(self) -> dict:
        text = self.get("?_task=mail&_action=list&_mbox=INBOX&_remote=1",
                        headers={"X-Roundcube-Request": self.token, "X-Requested-With": "XMLHttpRequest"})
        return json.loads(text)


@pytest.fixture
def webmail(dovecot, tmp_path):
    need_roundcube()
    settings = roundcube.Webmail(
        imap=roundcube.Endpoint("127.0.0.1", dovecot.imap_port, "starttls"),
        smtp=roundcube.Endpoint("127.0.0.1", 25, "none"),
        mail_domain="office.test", product_name="Office mail",
        ca_file=dovecot.cert, peer_name="localhost")
    roundcube.write(settings, tmp_path / "roundcube")
    with Roundcube(tmp_path / "roundcube") as server:
        yield server


def test_roundcube_logs_in_over_verified_starttls_and_lists_the_inbox(dovecot, webmail):
    dovecot.add_user("alice", "alice-webmail-pw")
    dovecot.save("alice", b"From: bob@example.org\r\nSubject: quarterly figures\r\n\r\nsee attached\r\n")
    browser = Browser(webmail.url)
    assert "_task=mail" in browser.login("alice", "alice-webmail-pw"), webmail.log()
    listing = browser.inbox()
    assert "quarterly figures" in json.dumps(listing), (listing, webmail.log())
    # Roundcube made its database at the first request, private as the rest of the directory
    assert (webmail.config_dir / "roundcube.db").stat().st_mode & 0o077 == 0


def test_a_wrong_password_is_refused(dovecot, webmail):
    dovecot.add_user("alice", "alice-webmail-pw")
    with pytest.raises(urllib.error.HTTPError) as refused:
        Browser(webmail.url).login("alice", "not-alices-webmail-pw")
    assert refused.value.code == 401


def test_configuration_is_private_and_keeps_its_key(tmp_path):
    settings = roundcube.Webmail(
        imap=roundcube.Endpoint("mail.office.test", 143, "starttls"),
        smtp=roundcube.Endpoint("mail.office.test", 587, "starttls"),
        mail_domain="office.test", product_name="it's mail", ca_file=None, peer_name="mail.office.test")
    config = roundcube.write(settings, tmp_path / "rc")
    first = config.read_text()
    assert config.stat().st_mode & 0o077 == 0
    assert (tmp_path / "rc" / "des_key").stat().st_mode & 0o077 == 0
    assert "$config['imap_host'] = 'tls://mail.office.test:143';" in first
    assert "$config['smtp_host'] = 'tls://mail.office.test:587';" in first
    assert "$config['product_name'] = 'it\\'s mail';" in first
    roundcube.write(settings, tmp_path / "rc")
    assert config.read_text() == first  # same key: sessions survive a rewrite
