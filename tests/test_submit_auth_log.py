"""AUTH against the real daemon leaves no deprecation warning of aiosmtpd in the log."""
import asyncio

import aiosmtplib

from tests.harness import wait_for


def test_auth_logs_no_login_data_deprecation(running):
    async def login():
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=running.smtp_port, start_tls=False) as c:
            reply = await c.login("alice", "alice-pw")
            return reply.code
    assert asyncio.run(login()) == 235
    # The daemon logs the AUTH before aiosmtpd finishes it: once that line is there, so
    # is anything logged during the AUTH.
    log = wait_for(lambda: "auth ok user=alice" in running.log() and running.log(), what="the AUTH in the log")
    assert "deprecated" not in log, log
    assert "Session.login_data" not in log, log
