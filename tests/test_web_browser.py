"""The web console in a real browser: Debian's chromium driven by Selenium through
chromium-driver (no downloaded browser build), against the real daemon, a simulated
modem and a simulated ISP (smarthost and pymap IMAP) on 127.0.0.1."""
import asyncio
import email
import os
import poplib
import re
import threading
import time
from pathlib import Path

import pytest

from gateway.demo.simisp import SimulatedISP
from tests.harness import PASSWORDS, wait_for
from tests.peers import free_port, need
from tests.test_session import submit
from tests.web_console import ADMIN, ADMIN_PW, USER, USER_PW, start_console

pytestmark = pytest.mark.timeout(180)

# The README's screenshots are taken here; set DIALMAIL_SCREENSHOTS=docs to refresh them
# (a plain run leaves the source tree as it was).
SCREENSHOTS = os.environ.get("DIALMAIL_SCREENSHOTS")
TYPED = {"erin-pw-2024x", "mallory-pw-99"}  # typed into the console here: looked for in the logs afterwards
PASSWORDS.update(TYPED)
WAIT = 30  # seconds a page gets to show what the test waits for


@pytest.fixture(scope="module")
def browser():
    need("chromium", "chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                "--disable-gpu", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


@pytest.fixture
def chrome(browser):
    """The browser with no cookies from the test before."""
    browser.delete_all_cookies()
    return browser


@pytest.fixture
def isp(tmp_path):
    """The simulated ISP, its asyncio servers on a loop in a thread of their own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    sim = asyncio.run_coroutine_threadsafe(SimulatedISP(tmp_path / "isp").start(), loop).result(30)
    yield sim
    asyncio.run_coroutine_threadsafe(sim.stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def sim_line(site, isp) -> str:
    """A simulated modem (2 s to dial, 33.6 kbit/s) whose line leads to the simulated ISP;
    what the ISP holds is fetched into bob's mailbox."""
    relay, imap = free_port(), free_port()
    return site.fetch_account(imap, isp.user, isp.password, deliver_to='"bob"') + f"""
[smarthost]
host = "127.0.0.1"
port = {relay}
starttls = "off"

[link]
type = "sim"
rate = 33600
dial_delay = "2s"
latency_ms = 20
forward = ["127.0.0.1:{relay}->127.0.0.1:{isp.smtp_port}", "127.0.0.1:{imap}->127.0.0.1:{isp.imap_port}"]

[session]
idle_timeout = "20s"
cost_per_call = 0.10
cost_per_minute = 0.03
currency = "EUR"
"""


def outside_mail(subject: str, to: str = "bob@office.test", sender: str = "kim@partner.example") -> bytes:
    return (f"Return-Path: <{sender}>\r\nFrom: Kim <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}.{time.time()}@partner.example>\r\n"
            f"Date: {email.utils.formatdate()}\r\n\r\nHello from outside.\r\n").encode()


def shows(driver, css: str, text: str, timeout: float = WAIT) -> str:
    """The text of ``css`` once it contains ``text``.  htmx replaces the dashboard's figures
    when a session ends, so an element found a moment ago may be gone: look it up again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    found: list[str] = []

    def current(d) -> bool:
        said = d.find_element(By.CSS_SELECTOR, css).text
        found[:] = [said]
        return text in said
    WebDriverWait(driver, timeout, poll_frequency=0.05, ignored_exceptions=(StaleElementReferenceException,)).until(
        current)
    return found[0]


def page_says(driver, text: str, timeout: float = WAIT) -> None:
    """Wait for ``text`` in the page (a form's answer arrives after the click returns)."""
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: text in d.page_source)


def log_in(driver, base: str, user: str, password: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver.get(base + "/login")
    driver.find_element(By.ID, "user").send_keys(user)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
    WebDriverWait(driver, WAIT).until(lambda d: "/login" not in d.current_url)
    shows(driver, "#who", user)


def click(driver, css: str) -> None:
    from selenium.webdriver.common.by import By
    driver.find_element(By.CSS_SELECTOR, css).click()


def fill(driver, css: str, text: str) -> None:
    from selenium.webdriver.common.by import By
    field = driver.find_element(By.CSS_SELECTOR, css)
    field.clear()
    field.send_keys(text)


def test_admin_logs_in_and_the_dashboard_shows_mail_just_submitted(site, chrome):
    base = start_console(site)
    submit(site.smtp_port, 2)
    chrome.get(base + "/queue")
    assert "/login?next=/queue" in chrome.current_url  # no page without a login
    assert chrome.execute_script("return typeof htmx") == "object"  # static files open to all
    log_in(chrome, base, ADMIN, ADMIN_PW)
    assert shows(chrome, "#queue-waiting", "2") == "2"
    assert shows(chrome, "#who", "admin")
    for path, marker in (("/sessions", "#sessions"), ("/queue", "#queue"), ("/quarantine", "#quarantine-empty"),
                         ("/users", "#users"), ("/me", "#change-password")):
        chrome.get(base + path)
        assert chrome.find_elements("css selector", marker), path
    assert ADMIN_PW not in chrome.page_source


def test_connect_now_shows_live_progress_and_the_session_in_the_table_and_charts(site, chrome, isp, tmp_path):
    shots = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    base = start_console(site, extra=sim_line(site, isp))
    submit(site.smtp_port, 2)
    isp.deliver_to_mailbox(outside_mail("Quote for the new printer"))
    log_in(chrome, base, ADMIN, ADMIN_PW)
    click(chrome, "#connect-now")
    # Live: the dial is on the page while the line is still coming up (2 s), before any end.
    shows(chrome, "#progress-lines", "bringing the link up (sim)")
    assert chrome.find_element("css selector", "#progress-end").text == ""
    shows(chrome, "#progress-end", "session ok", timeout=90)
    lines = chrome.find_element("css selector", "#progress-lines").text
    for said in ("session 1 (manual, both)", "CONNECTED", "→ sent [2/2]", "← fetched [1/1]",
                 "session 1 ok: sent 2, deferred 0, bounced 0, fetched 1"):
        assert said in lines, lines
    # The figures follow without a reload.
    shows(chrome, "#last-session", "#1 ok (manual)")
    shows(chrome, "#queue-waiting", "0")
    assert "session 1 ok" in chrome.find_element("css selector", "#progress-lines").text
    shots.mkdir(exist_ok=True)
    assert chrome.save_screenshot(str(shots / "console-dashboard.png"))
    wait_for(lambda: len(isp.received()) == 2, timeout=10, what="the smarthost to hold both messages")
    click(chrome, 'a[href="/sessions"]')
    row = shows(chrome, "#session-1", "ok")
    assert "manual" in row and "33600" in row
    for chart in ("#chart-line-time", "#chart-bytes", "#chart-efficiency"):
        svg = chrome.find_element("css selector", f"{chart} svg")
        assert svg.find_elements("css selector", ".rect, rect.reactive"), chart
    bytes_chart = chrome.find_element("css selector", "#chart-bytes").get_attribute("innerHTML")
    assert re.search(r">1</text>", bytes_chart), "session 1 is not on the bytes chart's axis"
    assert chrome.save_screenshot(str(shots / "console-sessions.png"))
    click(chrome, '#session-1 a[href="/sessions/1/transcript"]')
    page_says(chrome, "CONNECT")


def test_hold_and_release_a_message(site, chrome):
    base = start_console(site)
    submit(site.smtp_port, 1)
    log_in(chrome, base, ADMIN, ADMIN_PW)
    chrome.get(base + "/queue")
    click(chrome, "#queue button.hold")
    shows(chrome, "#notice", ": held")
    assert "held" in chrome.find_element("css selector", "#queue tr.held").text
    assert "(held)" in site.cli("mailq").stdout.decode()
    click(chrome, "#queue button.release")
    shows(chrome, "#notice", ": released")
    assert not chrome.find_elements("css selector", "#queue tr.held")
    assert "(held)" not in site.cli("mailq").stdout.decode()


def test_a_user_added_in_the_browser_logs_in_to_pop3(site, chrome):
    base = start_console(site)
    log_in(chrome, base, ADMIN, ADMIN_PW)
    chrome.get(base + "/users")
    fill(chrome, "#new-user", "erin")
    fill(chrome, "#new-password", "erin-pw-2024x")
    click(chrome, "#add-user button")
    shows(chrome, "#notice", "user erin added")
    assert chrome.find_elements("css selector", "#user-erin")
    pop = poplib.POP3("127.0.0.1", site.pop3_port, timeout=10)
    pop.user("erin")
    assert pop.pass_("erin-pw-2024x").startswith(b"+OK")
    pop.quit()


def test_out_of_office_set_in_the_browser_answers_an_outside_sender_once(site, chrome, isp):
    base = start_console(site, extra=sim_line(site, isp))
    log_in(chrome, base, USER, USER_PW)
    chrome.get(base + "/me")
    click(chrome, ".ooo input[name=enabled]")
    fill(chrome, ".ooo input[name=subject]", "Away until Monday")
    fill(chrome, ".ooo textarea[name=body]", "I read mail again on Monday.")
    click(chrome, ".ooo button")
    shows(chrome, "#ooo-state", "on: Away until Monday")
    isp.deliver_to_mailbox(outside_mail("First question"))
    isp.deliver_to_mailbox(outside_mail("Second question"))
    chrome.get(base + "/")
    click(chrome, "#fetch-only")
    shows(chrome, "#progress-end", "session ok", timeout=90)
    wait_for(lambda: len(site.mail_of(USER)) == 2, timeout=20, what="both messages in bob's mailbox")

    def replies() -> list[str]:
        out = site.cli("mailq").stdout.decode()
        return re.findall(r"kim@partner\.example", out)
    wait_for(replies, timeout=20, what="the automatic reply in the queue")
    assert len(replies()) == 1, site.cli("mailq").stdout.decode()  # one reply per sender (RFC 3834)
    qid = re.findall(r"^(\S+)\s+\d+[smhd]\s", site.cli("mailq").stdout.decode(), re.M)[0]
    shown = site.cli("queue", "show", qid).stdout.decode()
    assert "Auto-Submitted: auto-replied" in shown and "Away until Monday" in shown


def test_forwarding_set_in_the_browser_sends_the_next_message_out_and_keeps_a_copy(site, chrome):
    base = start_console(site)
    log_in(chrome, base, USER, USER_PW)
    chrome.get(base + "/me")
    click(chrome, ".forward input[name=enabled]")
    fill(chrome, ".forward input[name=to]", "bob.home@elsewhere.test")
    click(chrome, ".forward input[name=keep]")
    click(chrome, ".forward button")
    shows(chrome, "#forwarding", "to bob.home@elsewhere.test, keeping a copy here")
    assert site.cli("users", "forward", USER, "--show").stdout.decode() == \
        "bob: to bob.home@elsewhere.test, keeping a copy\n"
    submit(site.smtp_port, 1, to=f"{USER}@office.test")
    wait_for(lambda: "bob.home@elsewhere.test" in site.cli("mailq").stdout.decode(), what="the copy queued out")
    wait_for(lambda: len(site.mail_of(USER)) == 1, what="bob's own copy")


def test_a_user_gets_403_on_admin_pages_and_cannot_change_another_user(site, chrome):
    base = start_console(site)
    log_in(chrome, base, USER, USER_PW)
    assert not chrome.find_elements("css selector", 'a[href="/users"]')
    for path in ("/sessions", "/queue", "/quarantine", "/users"):
        chrome.get(base + path)  # get() returns once the page has loaded
        assert "this page is for the administrators" in chrome.page_source, path
    # A form aimed at another user's settings, posted from this user's page with a good token.
    chrome.get(base + "/me")
    chrome.execute_script("document.querySelector('.ooo').action = '/users/alice/out-of-office'")
    click(chrome, ".ooo input[name=enabled]")
    fill(chrome, ".ooo textarea[name=body]", "hijacked")
    click(chrome, ".ooo button")
    page_says(chrome, "this page is for the administrators")
    assert f"{ADMIN}: off" in site.cli("users", "vacation", ADMIN, "--show").stdout.decode()


def test_a_post_without_its_csrf_token_is_refused(site, chrome):
    base = start_console(site)
    log_in(chrome, base, ADMIN, ADMIN_PW)
    chrome.get(base + "/users")
    chrome.execute_script("document.querySelector('#add-user input[name=csrf]').remove()")
    fill(chrome, "#new-user", "mallory")
    fill(chrome, "#new-password", "mallory-pw-99")
    click(chrome, "#add-user button")
    page_says(chrome, "CSRF token is missing")
    assert not site.users.exists("mallory")
    # And a script on another page cannot borrow the cookie: the token is not in it.
    status = chrome.execute_script(
        "const r = await fetch('/connect-now', {method: 'POST', body: new URLSearchParams({mode: 'both'})});"
        "return r.status;")
    assert status == 403
    assert "session 1" not in site.cli("log").stdout.decode()
