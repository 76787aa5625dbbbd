"""ETRN against a real Postfix that holds the office's mail, as an ISP's backup MX does
(``relay_domains``, ``fast_flush_domains``, ``defer_transports``): the session asks once
the link is up, and the held mail arrives before the line is hung up."""
from __future__ import annotations

import asyncio
import re

import aiosmtplib
import pytest

from tests.harness import wait_for
from tests.peers import IS_ROOT, PostfixSmarthost, need

pytestmark = [pytest.mark.peer, pytest.mark.timeout(180)]


class HoldingIsp(PostfixSmarthost):
    """The ISP's Postfix: smarthost for the office's outbound mail (delivered into the
    catch-all), and backup MX holding mail for office.test until the office says ETRN."""

    def __init__(self, office_smtp_port: int):
        super().__init__(recipient_rules="", params={
            "virtual_mailbox_domains": "elsewhere.test",
            "relay_domains": "office.test",
            "fast_flush_domains": "$relay_domains",
            "transport_maps": f"inline:{{ office.test=smtp:[127.0.0.1]:{office_smtp_port} }}",
            "relay_transport": "smtp",
            "defer_transports": "smtp",
            "smtpd_etrn_restrictions": "permit_mynetworks, reject",
            "smtp_helo_name": "mx2.isp.test",
            "myhostname": "mx2.isp.test",
        })

    def held(self) -> int:
        return sum(1 for f in (self.dir / "queue" / "deferred").rglob("*") if f.is_file())


def send_to_isp(port: int, n: int) -> list[str]:
    async def go():
        subjects = []
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as c:
            for i in range(n):
                subjects.append(f"held {i}")
                await c.sendmail("partner@elsewhere.test", ["alice@office.test"],
                                 f"From: partner@elsewhere.test\r\nTo: alice@office.test\r\nSubject: held {i}\r\n"
                                 f"Message-ID: <held{i}@elsewhere.test>\r\n\r\nwaiting at the ISP\r\n".encode())
        return subjects
    return asyncio.run(go())


@pytest.fixture
def isp(site):
    need("postfix", "postconf", "postsuper", "postqueue")
    if not IS_ROOT:
        pytest.skip("Postfix needs root")
    with HoldingIsp(site.smtp_port) as server:
        yield server


def config(isp, extra: str = "") -> str:
    return f"""
        [smarthost]
        host = "127.0.0.1"
        port = {isp.port}
        starttls = "off"

        [link]
        type = "always-on"

        [session]
        etrn_domains = ["office.test"]
        {extra}
        """


def test_held_mail_arrives_in_the_session_that_sent_etrn(site, isp):
    site.write_config(config(isp))
    site.start()
    subjects = send_to_isp(isp.port, 3)
    wait_for(lambda: isp.held() == 3, timeout=30, what="the ISP to hold the office's mail")
    r = site.cli("connect-now", timeout=120)
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert re.search(r"ETRN office\.test: 250 ", out), out
    # Everything the ISP held was taken before the session ended, not whenever the link is next up.
    assert isp.held() == 0, isp.queue()
    wait_for(lambda: len(site.mail_of("alice")) == 3, timeout=30, what="local delivery")
    got = sorted(re.search(rb"Subject: (held \d)", m).group(1).decode() for m in site.mail_of("alice"))
    assert got == sorted(subjects)
    assert re.search(r"3 message\(s\) arrived after ETRN", out), out


def test_with_nothing_held_the_line_waits_only_etrn_wait(site, isp):
    site.write_config(config(isp, 'etrn_wait = "2s"'))
    site.start()
    r = site.cli("connect-now", timeout=120)
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert re.search(r"ETRN office\.test: 250 ", out) and "0 message(s) arrived after ETRN" in out, out
    online = float(re.search(r"connected ([\d.]+)s", out).group(1))
    assert 2.0 <= online < 4.0, out
