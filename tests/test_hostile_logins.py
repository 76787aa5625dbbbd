"""Password guessing in parallel, from an address outside mynetworks (127.0.0.2).

A limit that holds for one client at a time must hold for 300 at once: an attempt is
reserved before its password is checked, so a burst checks at most ``max_failures``
passwords per lockout window, the right password sent last is refused once the address
is locked out, and the argon2 checks stay off the event loop (a bystander's POP3 is
answered at once).
"""
from __future__ import annotations

import asyncio
import base64
import re
import time

import pytest

from tests.harness import Site

pytestmark = pytest.mark.timeout(180)

GUESSERS = 300
OUTSIDE = "127.0.0.2"


def auth_plain(user: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()) + b"\r\n"


async def smtp_guess(port: int, password: str, started: asyncio.Event | None = None) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(OUTSIDE, 0))
    try:
        await r.readline()  # greeting
        w.write(b"EHLO guesser.test\r\n")
        while not (await r.readline()).startswith(b"250 "):
            pass
        if started is not None:
            await started.wait()
        w.write(auth_plain("alice", password))
        return await r.readline()
    finally:
        w.close()


async def pop3_guess(port: int, password: str) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(OUTSIDE, 0))
    try:
        await r.readline()
        w.write(b"USER alice\r\n")
        await r.readline()
        w.write(b"PASS " + password.encode() + b"\r\n")
        return await r.readline()
    finally:
        w.close()


async def bystander_latency(port: int, until: asyncio.Event) -> list[float]:
    """POP3 CAPA round trips from 127.0.0.1 while the burst runs."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    await r.readline()
    times = []
    while not until.is_set() and len(times) < 400:
        t = time.monotonic()
        w.write(b"CAPA\r\n")
        while await r.readline() != b".\r\n":
            pass
        times.append(time.monotonic() - t)
        await asyncio.sleep(0.01)
    w.close()
    return times


@pytest.fixture
def guarded(tmp_path):
    # connection caps above the burst: what is tested here is the login throttle
    caps = "max_connections = 400\nmax_connections_per_client = 400\n"
    site = Site(tmp_path, extra='max_failures = 5\nlockout = "10m"\n' + caps)
    text = site.config_path.read_text().replace(
        '[smtp]\n', '[smtp]\nmax_auth_failures = 5\nauth_lockout = "10m"\n' + caps)
    site.config_path.write_text(text)
    site.add_user("alice", "alice-pw")
    site.start()
    yield site
    site.stop()


def checked(site: Site, what: str) -> int:
    return len(re.findall(what, site.log()))


def test_300_parallel_smtp_auth_guesses_check_at_most_max_failures_passwords(guarded, figure):
    async def burst():
        go = asyncio.Event()
        done = asyncio.Event()
        bystander = asyncio.create_task(bystander_latency(guarded.pop3_port, done))
        guesses = [asyncio.create_task(smtp_guess(guarded.smtp_port, f"guess{i}", go)) for i in range(GUESSERS)]
        right = asyncio.create_task(smtp_guess(guarded.smtp_port, "alice-pw", go))
        await asyncio.sleep(0)
        go.set()
        replies = await asyncio.gather(*guesses, right)
        done.set()
        return replies, await bystander
    replies, latency = asyncio.run(burst())
    codes = [r[:3] for r in replies]
    assert codes[-1] != b"235"  # the right password, sent with the burst: refused
    assert codes.count(b"535") <= 5 and codes.count(b"454") >= GUESSERS - 5, sorted(set(codes))
    smtp_checked = checked(guarded, r"auth failed user=alice from=127.0.0.2 mechanism=PLAIN")
    assert smtp_checked <= 5
    assert max(latency) < 0.25, f"a bystander's POP3 CAPA took {max(latency):.3f} s"
    figure(f"{GUESSERS} parallel SMTP AUTH PLAIN guesses + the right password",
           f"{smtp_checked} passwords checked, {codes.count(b'454')} locked out, right password refused; "
           f"a bystander's POP3 CAPA at most {max(latency) * 1000:.0f} ms")
    # once locked out, even the right password alone is refused
    assert asyncio.run(smtp_guess(guarded.smtp_port, "alice-pw"))[:3] == b"454"


def test_300_parallel_pop3_guesses_check_at_most_max_failures_passwords(guarded, figure):
    async def burst():
        guesses = [pop3_guess(guarded.pop3_port, f"guess{i}") for i in range(GUESSERS)]
        return await asyncio.gather(*guesses, pop3_guess(guarded.pop3_port, "alice-pw"))
    replies = asyncio.run(burst())
    assert not replies[-1].startswith(b"+OK")
    pop3_checked = checked(guarded, r"POP3 login failed user=alice")
    assert pop3_checked <= 5
    assert sum(1 for r in replies if r.startswith(b"-ERR [AUTH]")) >= GUESSERS - 5
    figure(f"{GUESSERS} parallel POP3 guesses + the right password",
           f"{pop3_checked} passwords checked, right password refused")
    assert asyncio.run(pop3_guess(guarded.pop3_port, "alice-pw")).startswith(b"-ERR [AUTH]")


def test_ehlo_advertises_only_real_mechanisms(guarded):
    """aiosmtpd took the handler's auth_throttle attribute for a mechanism named "throttle"."""
    async def talk():
        r, w = await asyncio.open_connection("127.0.0.1", guarded.smtp_port)
        await r.readline()
        w.write(b"EHLO client.test\r\n")
        lines = []
        while not (line := await r.readline()).startswith(b"250 "):
            lines.append(line)
        w.close()
        return [x for x in lines if x.startswith(b"250-AUTH")]
    assert asyncio.run(talk()) == [b"250-AUTH LOGIN PLAIN\r\n"]


@pytest.mark.parametrize("verb", [b"EHLO", b"HELO"])
@pytest.mark.parametrize("smuggled", [b"evil.example\rX-Injected: spoofed", b"evil.example\tx", b"evil\x00.example"])
def test_helo_with_control_characters_is_refused_and_never_reaches_a_header(guarded, verb, smuggled):
    """``EHLO evil.example\\rX-Injected: spoofed`` was copied into our own Received: header,
    where Python's parser then saw a header the server seemed to have written."""
    async def talk():
        r, w = await asyncio.open_connection("127.0.0.1", guarded.smtp_port, local_addr=(OUTSIDE, 0))
        await r.readline()
        w.write(verb + b" " + smuggled + b"\r\n")
        reply = await r.readline()
        w.write(b"EHLO good.example\r\nMAIL FROM:<x@outside.test>\r\nRCPT TO:<alice@office.test>\r\nDATA\r\n")
        while not (await r.readline()).startswith(b"354"):
            pass
        w.write(b"Subject: after a bad HELO\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        while not (await r.readline()).startswith(b"221"):
            pass
        w.close()
        return reply
    assert asyncio.run(talk()) == b"501 5.5.4 Invalid HELO/EHLO argument: control characters are not allowed\r\n"
    from tests.harness import wait_for
    [raw] = wait_for(lambda: guarded.mail_of("alice"), what="the message after the refused HELO")
    assert b"X-Injected" not in raw and b"Received: from good.example" in raw
