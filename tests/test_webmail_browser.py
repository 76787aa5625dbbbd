"""Webmail in Chromium: Debian's Roundcube on the configuration ``dialmail webmail config``
writes, over the Dovecot dialmail runs ([imap] managed) and dialmail's submission port.

A user logs in, reads a message dialmail fetched from the ISP, and replies; the reply
lands in dialmail's outbound queue.  TLS on both IMAP and submission is verified against
the office's own certificate.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.harness import ROOT, wait_for
from tests.peers import Roundcube, make_self_signed_cert, need
from tests.test_imap_dovecot import ALICE_PW, ImapSite
from tests.test_web_browser import WAIT, browser, chrome  # noqa: F401,F811 (fixtures)
from tests.test_webmail import need_roundcube

pytestmark = pytest.mark.peer


@pytest.fixture
def webmail_site(peer_tmp):
    need("dovecot", "doveconf", "doveadm")
    need_roundcube()
    cert, key = make_self_signed_cert(peer_tmp)
    os.chmod(key, 0o600)
    site = ImapSite(peer_tmp)
    site.add_user("alice", ALICE_PW)
    site.tls = f'tls_cert = "{cert}"\ntls_key = "{key}"\n'  # the office's certificate, for IMAP and 587
    yield site
    site.stop()


def test_webmail_config_needs_imap(tmp_path):
    from tests.harness import Site
    site = Site(tmp_path)
    r = site.cli("webmail", "config")
    assert r.returncode == 78
    assert b"add an [imap] section first" in r.stderr + r.stdout


def test_roundcube_reads_fetched_mail_and_the_reply_lands_in_the_queue(webmail_site, isp, chrome):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.peers import free_port
    from tests.test_fetch_dovecot import ISP_PASSWORD
    site = webmail_site
    letter = (b"From: Partner <partner@isp.example>\r\nTo: office@isp.example\r\n"
              b"Subject: prices for 2027\r\nMessage-ID: <prices-2027@isp.example>\r\n"
              b"Date: Sat, 28 Nov 2026 09:00:00 +0000\r\n\r\nthe new price list is attached in spirit\r\n")
    isp.save("office", letter)
    submission = free_port()
    site.write_config(site.imap_section + site.tls
                      + site.fetch_account(isp.imap_port, "office", ISP_PASSWORD, tls="starttls",
                                           ca_file=f'"{isp.cert}"', deliver_to='"alice"')
                      + f'\n[submission]\nlisten = ["127.0.0.1:{submission}"]\n' + site.tls)
    site.start()
    r = site.cli("connect-now", timeout=120)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()

    config_dir = site.spool / "webmail"
    r = subprocess.run([sys.executable, "-m", "gateway", "-c", str(site.config_path), "webmail", "config",
                        "--peer-name", "localhost"], cwd=ROOT, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    assert f"IMAP tls://127.0.0.1:{site.imap_port}, sending tls://127.0.0.1:{submission}".encode() in r.stdout

    with Roundcube(config_dir) as webmail:
        chrome.get(webmail.url)
        wait = WebDriverWait(chrome, WAIT)
        wait.until(ready.presence_of_element_located((By.ID, "rcmloginuser"))).send_keys("alice")
        chrome.find_element(By.ID, "rcmloginpwd").send_keys(ALICE_PW)
        chrome.find_element(By.ID, "rcmloginsubmit").click()
        row = wait.until(ready.presence_of_element_located(
            (By.XPATH, "//table[@id='messagelist']//*[contains(text(), 'prices for 2027')]")))
        assert row, webmail.log()
        chrome.get(webmail.url + "?_task=mail&_mbox=INBOX&_uid=1&_action=show")
        body = wait.until(ready.presence_of_element_located((By.ID, "messagebody")))
        assert "the new price list is attached in spirit" in body.text

        chrome.get(webmail.url + "?_task=mail&_mbox=INBOX&_reply_uid=1&_action=compose")
        text = wait.until(ready.presence_of_element_located((By.ID, "composebody")))
        wait.until(lambda d: d.execute_script("return !!(window.rcmail && rcmail.busy === false)"))
        text.send_keys("Thank you, we will order in January.\n")
        chrome.find_element(By.CSS_SELECTOR, "button.btn.send").click()
        listed = wait_for(lambda: (lambda out: out if "partner@isp.example" in out else None)(
            site.cli("queue", "list").stdout.decode()), timeout=WAIT, what="the reply in dialmail's queue")
    assert "<alice@office.test>" in listed, listed
    queued = list((site.spool / "queue").rglob("*"))
    bodies = [p.read_bytes() for p in queued if p.is_file() and b"Thank you, we will order in January." in
              p.read_bytes()]
    assert bodies, "the reply's text is not in the queue"
    assert b"In-Reply-To: <prices-2027@isp.example>" in bodies[0]
    assert b"ESMTPSA" in bodies[0]  # sent by AUTH over TLS on the submission port
