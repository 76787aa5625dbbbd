"""SMTP submission against a real `dialmail run`, with swaks and aiosmtplib as clients."""
import asyncio
import re
import shutil
import subprocess

import aiosmtplib
import pytest

from tests.harness import wait_for

pytestmark = pytest.mark.timeout(60)


def swaks(site, *args, outside=False):
    """Run swaks; ``outside`` connects from 127.0.0.2, which is not in this site's mynetworks."""
    if not shutil.which("swaks"):
        pytest.skip("swaks (Debian package swaks) is not installed")
    where = ["--server", f"127.0.0.2:{site.smtp_port}", "--local-interface", "127.0.0.2"] if outside else \
        ["--server", f"127.0.0.1:{site.smtp_port}"]
    return subprocess.run(["swaks", *where, "--timeout", "20", *args],
                          capture_output=True, text=True, timeout=60)


def code_of(reply: str) -> int:
    return int(reply.split()[0])


def test_swaks_to_local_user_lands_in_maildir(running):
    r = swaks(running, "--to", "alice@office.test", "--from", "someone@outside.test",
              "--header", "Subject: for alice", "--body", "hello alice")
    assert r.returncode == 0, r.stdout + r.stderr
    mail = wait_for(lambda: running.mail_of("alice"), what="alice's mail")
    assert len(mail) == 1
    assert b"Subject: for alice" in mail[0] and b"hello alice" in mail[0]
    assert mail[0].startswith(b"Return-Path: <someone@outside.test>\r\nDelivered-To: alice@office.test\r\n")
    assert b"by mail.office.test (dialmail)" in mail[0]
    assert (running.maildir("alice").path / "new").iterdir()


def test_mail_for_outside_waits_in_queue_list(running):
    r = swaks(running, "--to", "friend@elsewhere.test", "--from", "alice@office.test",
              "--header", "Subject: out")
    assert r.returncode == 0, r.stdout
    out = running.cli("queue", "list").stdout.decode()
    assert "friend@elsewhere.test [relay] queued" in out and "<alice@office.test>" in out
    ages = re.compile(r" +\d+[smhd] ")
    assert ages.sub(" ", running.cli("mailq").stdout.decode()) == ages.sub(" ", out)


def test_relay_refused_from_outside_mynetworks_without_auth(running):
    # 127.0.0.2 is not in mynetworks (127.0.0.1/32) for this site.
    r = swaks(running, "--to", "victim@elsewhere.test", "--from", "spammer@elsewhere.test",
              "--quit-after", "RCPT", outside=True)
    assert r.returncode != 0
    assert "554 5.7.1 Relay access denied" in r.stdout
    # Local recipients are still accepted from outside.
    r = swaks(running, "--to", "bob@office.test", "--from", "friend@elsewhere.test", outside=True)
    assert r.returncode == 0, r.stdout
    assert "relay access denied" in running.log()


def test_auth_then_relay_allowed_from_outside(running):
    r = swaks(running, "--to", "friend@elsewhere.test", "--from", "alice@office.test",
              "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "alice-pw", outside=True)
    assert r.returncode == 0, r.stdout
    assert "friend@elsewhere.test" in running.cli("queue", "list").stdout.decode()
    bad = swaks(running, "--to", "friend@elsewhere.test", "--from", "alice@office.test",
                "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "wrong", outside=True)
    assert bad.returncode != 0 and "535" in bad.stdout
    assert "alice-pw" not in running.log() and "wrong" not in running.log().replace("wrong", "", 0)


def test_unknown_local_user_is_550(running):
    async def go():
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=running.smtp_port) as c:
            await c.ehlo()
            await c.mail("x@outside.test")
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as exc:
                await c.rcpt("nobody@office.test")
            return exc.value
    err = asyncio.run(go())
    assert err.code == 550


def test_ehlo_advertises_size_8bitmime_pipelining_and_auth_on_loopback(running):
    async def go():
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=running.smtp_port) as c:
            await c.ehlo()
            return c.esmtp_extensions
    ext = asyncio.run(go())
    for name in ("size", "8bitmime", "pipelining", "auth"):
        assert name in ext, ext
    assert ext["size"] == str(30_000_000)


def test_oversize_message_gets_552(running):
    async def go():
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=running.smtp_port) as c:
            big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 31_000
            with pytest.raises(aiosmtplib.SMTPResponseException) as exc:
                await c.sendmail("x@outside.test", ["alice@office.test"], big)
            return exc.value.code
    assert asyncio.run(go()) == 552
    assert running.mail_of("alice") == []


def test_aiosmtplib_mixed_local_and_remote(running):
    async def go():
        msg = b"From: alice@office.test\r\nSubject: both\r\nMessage-ID: <m1@office.test>\r\n\r\nhi\r\n"
        return await aiosmtplib.send(msg, sender="alice@office.test", recipients=["bob@office.test",
                                     "far@elsewhere.test"], hostname="127.0.0.1", port=running.smtp_port)
    errors, reply = asyncio.run(go())
    assert errors == {} and "queued as" in reply
    mail = wait_for(lambda: running.mail_of("bob"), what="bob's mail")
    assert b"Message-ID: <m1@office.test>" in mail[0]
    out = running.cli("queue", "list").stdout.decode()
    assert "far@elsewhere.test [relay] queued" in out and "bob@office.test [local] delivered" in out


@pytest.mark.timeout(90)
def test_disk_full_gives_452_and_keeps_nothing(site, tmp_path):
    """A 3 MB tmpfs as spool: a message that does not fit is refused with 452, and the spool stays clean."""
    import os
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    site.spool.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(site.spool)], check=True)
    try:
        site.add_user("alice", "pw")
        site.write_config("")
        site.config_path.write_text(site.config_path.read_text().replace('min_free_space = "1MB"',
                                                                          'min_free_space = "0"'))
        site.start()

        async def go():
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=site.smtp_port) as c:
                small = b"Subject: fits\r\n\r\nsmall\r\n"
                await c.sendmail("x@outside.test", ["alice@office.test"], small)
                big = b"Subject: too big for the disk\r\n\r\n" + (b"y" * 998 + b"\r\n") * 4000
                with pytest.raises(aiosmtplib.SMTPResponseException) as exc:
                    await c.sendmail("x@outside.test", ["alice@office.test"], big)
                return exc.value.code
        assert asyncio.run(go()) == 452
        mail = wait_for(lambda: site.mail_of("alice"), what="the small message")
        assert len(mail) == 1 and b"fits" in mail[0]
        assert os.listdir(site.spool / "queue" / "tmp") == []
        assert "disk full" in site.log() or "Insufficient" in site.log() or "bytes free" in site.log()
    finally:
        site.stop()
        subprocess.run(["umount", "-l", str(site.spool)])


def test_sigterm_stops_cleanly(running):
    assert running.stop() == 0
    assert "dialmail stopped" in running.log()


def test_second_daemon_on_same_spool_is_refused(running):
    r = running.cli("run", timeout=20)
    assert r.returncode == 75
    assert b"already running" in r.stderr


def test_null_sender_is_accepted_for_local_recipients(running):
    """Bounces and auto-replies come from <>: MAIL FROM:<> must be followed by a working RCPT."""
    async def go():
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=running.smtp_port) as c:
            await c.ehlo()
            await c.mail("")
            code, _ = await c.rcpt("alice@office.test")
            assert code == 250
            code, reply = await c.data(b"Subject: a bounce\r\n\r\nreturned mail\r\n")
            return code
    assert asyncio.run(go()) == 250
    mail = wait_for(lambda: running.mail_of("alice"), what="the null-sender message")
    assert mail[0].startswith(b"Return-Path: <>\r\n")


def test_sigterm_lets_a_transaction_in_progress_finish(running):
    """SIGTERM during DATA: the client still gets its 250 and the message is kept; then the daemon exits."""
    import signal
    async def go():
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=running.smtp_port)
        await c.connect()
        await c.ehlo()
        await c.mail("x@outside.test")
        await c.rcpt("alice@office.test")
        running.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)  # the daemon is shutting down while our transaction is open
        code, _ = await c.data(b"Subject: sent during shutdown\r\n\r\nstill accepted\r\n")
        c.close()
        return code
    assert asyncio.run(go()) == 250
    try:
        assert running.proc.wait(30) == 0
    except subprocess.TimeoutExpired:
        raise AssertionError("daemon still running 30 s after SIGTERM:\n" + running.log()) from None
    running.start()
    mail = wait_for(lambda: running.mail_of("alice"), what="the message accepted during shutdown")
    assert b"sent during shutdown" in mail[0]


def test_sendmail_t_takes_recipients_from_headers_and_removes_bcc(running):
    msg = (b"From: alice@office.test\nTo: bob@office.test\nBcc: friend@elsewhere.test\n"
           b"Subject: from a script\n\nbody\n.\nafter a lone dot\n")
    r = running.cli("sendmail", "-t", "-i", input=msg)
    assert r.returncode == 0, r.stderr
    mail = wait_for(lambda: running.mail_of("bob"), what="bob's mail")
    assert b"Bcc:" not in mail[0] and b"after a lone dot" in mail[0]
    assert b"Message-ID:" in mail[0] and b"Date:" in mail[0]
    assert "friend@elsewhere.test" in running.cli("queue", "list").stdout.decode()


def test_sendmail_headerless_input_from_cron_keeps_its_text_in_the_body(running):
    """``echo "disk is full" | sendmail bob``: the added From/Date/Message-ID used to follow
    the first body line with no empty line between, so they became body text."""
    r = running.cli("sendmail", "bob", input=b"disk is full\non /var\n")
    assert r.returncode == 0, r.stderr
    [raw] = wait_for(lambda: running.mail_of("bob"), what="bob's mail")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert body == b"disk is full\r\non /var\r\n"
    for name in (b"From:", b"Date:", b"Message-ID:", b"Received:"):
        assert name in head
    # a header block cut short by a line that is no header ends there too
    r = running.cli("sendmail", "bob", input=b"Subject: report\nthis line is no header\nX: y\n")
    assert r.returncode == 0, r.stderr
    raws = wait_for(lambda: [m for m in running.mail_of("bob") if b"Subject: report" in m], what="second mail")
    head, _, body = raws[0].partition(b"\r\n\r\n")
    assert b"Subject: report\r\n" in head and body == b"this line is no header\r\nX: y\r\n"


@pytest.mark.parametrize("name,user", [("bob", "bob"), ("root", "postmaster")])
def test_sendmail_bare_names_are_local_users_not_the_smarthost(running, name, user):
    """``sendmail alice`` and ``sendmail root`` (cron) used to queue the bare name for the
    smarthost; they are qualified with the first local domain, as Postfix's myorigin."""
    r = running.cli("sendmail", name, input=b"Subject: from cron\n\ncron output\n")
    assert r.returncode == 0, r.stderr
    [raw] = wait_for(lambda: running.mail_of(user), what=f"{user}'s mail")
    assert f"Delivered-To: {name}@office.test\r\n".encode() in raw
    assert b"[relay]" not in running.cli("queue", "list").stdout
    # the sender is qualified too: a reply goes back to a local user
    assert re.search(rb"Return-Path: <[^@>]+@office\.test>", raw)


def test_a_listen_address_in_use_is_one_line_not_a_traceback(site):
    import socket
    taken = socket.socket()
    taken.bind(("127.0.0.2", site.smtp_port))
    taken.listen()
    try:
        r = site.cli("run", timeout=30)
    finally:
        taken.close()
    err = r.stderr.decode()
    assert r.returncode == 78, err
    assert f"smtp.listen: cannot listen on 127.0.0.2:{site.smtp_port}: " in err and "Traceback" not in err


def test_the_test_site_moves_to_new_ports_when_one_is_taken_meanwhile(site):
    import socket
    taken = socket.socket()
    taken.bind(("127.0.0.2", site.smtp_port))
    taken.listen()
    first = site.smtp_port
    try:
        site.start()
    finally:
        taken.close()
    assert site.smtp_port != first and f":{site.smtp_port}\"" in site.config_path.read_text()
