"""Final delivery by LMTP into a real Dovecot (``[delivery] lmtp``), after dialmail's policy.

Dovecot is started by the test (tests/lmtp_peer.py) with Sieve and dialmail's duplicate
guard; mail is submitted to the real daemon by SMTP and looked for in the Maildirs Dovecot
wrote.  Per-mailbox LMTP replies become the recipient's recorded outcome: 2xx delivered,
4xx deferred and retried, 5xx bounced as a local failure is."""
import email
import random
import signal
import smtplib
import subprocess
import time

import pytest

from tests.harness import wait_for

pytestmark = pytest.mark.timeout(300)


def lmtp_site(site, target: str, more: str = "", doveadm: str = "") -> None:
    check = f'doveadm = "{doveadm}"' if doveadm else ""
    site.write_config(f"""
[delivery]
lmtp = "{target}"
{check}

[queue]
retry_min = "1s"
retry_max = "2s"

[aliases]
team = ["alice", "bob"]
{more}
""")


def send(site, rcpts: list[str], subject: str, body: str = "hello\r\n", mid: str | None = None,
         sender: str = "carol@office.test") -> None:
    mid = mid or f"<{subject.replace(' ', '-')}@office.test>"
    msg = (f"From: {sender}\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\nMessage-ID: {mid}\r\n\r\n{body}")
    with smtplib.SMTP("127.0.0.1", site.smtp_port, timeout=30) as c:
        c.sendmail(sender, rcpts, msg.encode())


def queue_text(site) -> str:
    return site.cli("queue", "list").stdout.decode()


def listing_with(site, text: str) -> str | None:
    listing = queue_text(site)
    return listing if text in listing else None


def queue_empty(site) -> bool:
    return queue_text(site).startswith("queue is empty")


def subjects(messages: list[bytes]) -> list[str]:
    return sorted(str(email.message_from_bytes(m)["Subject"]) for m in messages)


def test_lmtp_over_a_unix_socket_delivers_each_mailbox_of_a_group(site, dovecot_lmtp):
    lmtp_site(site, f"unix:{dovecot_lmtp.socket}")
    site.add_user("carol", "carol-pw")
    site.start()
    send(site, ["alice@office.test", "team@office.test"], "to alice and the team",
         body="..a line that starts with a dot\r\n.\r\nend\r\n")
    wait_for(lambda: len(dovecot_lmtp.messages("alice")) == 2 and len(dovecot_lmtp.messages("bob")) == 1,
             timeout=20, what="Dovecot to store alice's two copies and bob's one")
    wait_for(lambda: queue_empty(site), timeout=10, what="an empty queue")
    assert site.mail_of("alice") == [] and site.mail_of("bob") == []  # nothing in the spool's own Maildirs
    copy = dovecot_lmtp.messages("bob")[0]
    # Dovecot stores Maildir files with LF line ends
    assert b"Delivered-To: team@office.test\n" in copy
    assert b"X-Dialmail-Delivery: " in copy
    assert copy.endswith(b"\n\n..a line that starts with a dot\n.\nend\n")  # stuffed on the wire, not in the box
    assert "mailbox=bob status=delivered (unix:" in site.log()
    assert "2.0.0 <bob> " in site.log() and " Saved)" in site.log()


def test_sieve_fileinto_files_the_message_in_the_users_folder(site, dovecot_lmtp):
    dovecot_lmtp.set_sieve("alice", 'require ["fileinto", "mailbox"];\r\n'
                                    'if header :contains "Subject" "invoice" { fileinto :create "Invoices"; }\r\n')
    lmtp_site(site, f"127.0.0.1:{dovecot_lmtp.port}")  # TCP this time
    site.start()
    send(site, ["alice@office.test"], "your invoice 42")
    send(site, ["alice@office.test"], "lunch")
    wait_for(lambda: dovecot_lmtp.messages("alice", "Invoices") and dovecot_lmtp.messages("alice"),
             timeout=20, what="both messages in alice's mailbox")
    assert subjects(dovecot_lmtp.messages("alice", "Invoices")) == ["your invoice 42"]
    assert subjects(dovecot_lmtp.messages("alice")) == ["lunch"]


def test_a_temporary_refusal_of_one_mailbox_is_retried_for_that_mailbox_only(site, dovecot_lmtp):
    lmtp_site(site, f"unix:{dovecot_lmtp.socket}")
    site.start()
    send(site, ["alice@office.test"], "make the homes")  # Dovecot creates its home dirs
    wait_for(lambda: dovecot_lmtp.messages("alice"), timeout=20, what="the first message")
    bob = dovecot_lmtp.home("bob")
    bob.mkdir(exist_ok=True)
    from tests.peers import IS_ROOT, _chown
    if IS_ROOT:
        _chown(bob, "dovecot")
    bob.chmod(0)  # Dovecot cannot write bob's mail: a temporary failure for bob alone
    try:
        send(site, ["team@office.test"], "for the team")
        wait_for(lambda: "for the team" in subjects(dovecot_lmtp.messages("alice")), timeout=20,
                 what="alice's copy")
        listing = wait_for(lambda: listing_with(site, "team@office.test"), timeout=20,
                           what="the deferred recipient in the queue list")
        # the recorded outcome is Dovecot's own reply for bob, as a relay outcome would be
        assert (f"deferred: 451 4.2.0 LMTP unix:{dovecot_lmtp.socket} said after the final dot, waiting for "
                f"<bob>'s reply: 451 4.2.0 <bob> Internal error occurred.") in listing, listing
        assert len(dovecot_lmtp.messages("alice")) == 2
    finally:
        bob.chmod(0o700)
    wait_for(lambda: dovecot_lmtp.messages("bob"), timeout=20, what="bob's copy after the retry")
    wait_for(lambda: queue_empty(site), timeout=10, what="an empty queue")
    assert subjects(dovecot_lmtp.messages("bob")) == ["for the team"]
    assert subjects(dovecot_lmtp.messages("alice")) == ["for the team", "make the homes"]  # not twice


def test_a_permanent_refusal_bounces_to_the_sender_with_dovecots_reply(site, dovecot_lmtp):
    lmtp_site(site, f"unix:{dovecot_lmtp.socket}")
    site.add_user("carol", "carol-pw")
    site.add_user("dave", "dave-pw")  # a dialmail user Dovecot does not know
    site.start()
    send(site, ["dave@office.test"], "hello dave")
    wait_for(lambda: dovecot_lmtp.messages("carol"), timeout=30, what="the bounce in carol's mailbox")
    wait_for(lambda: queue_empty(site), timeout=10, what="an empty queue")
    [bounce] = dovecot_lmtp.messages("carol")
    assert b'Content-Type: multipart/report; report-type="delivery-status"' in bounce
    assert b"Final-Recipient: rfc822; dave@office.test\nAction: failed\nStatus: 5.1.1\n" in bounce
    assert (f"<dave@office.test>: 550 5.1.1 LMTP unix:{dovecot_lmtp.socket} said after RCPT TO:<dave>: "
            f"550 5.1.1 <dave> User doesn't exist: dave\n").encode() in bounce
    assert dovecot_lmtp.messages("dave") == []


def test_a_permanent_refusal_of_mail_nobody_can_get_back_is_kept_for_review(site, dovecot_lmtp):
    """A bounce (null sender) that Dovecot refuses cannot be bounced again: it is kept in
    the postmaster's review Maildir in the spool, with Dovecot's reply, as a local failure is."""
    lmtp_site(site, f"unix:{dovecot_lmtp.socket}")
    site.add_user("dave", "dave-pw")  # a dialmail user Dovecot does not know
    site.start()
    send(site, ["dave@office.test"], "a bounce for dave", sender="")
    wait_for(lambda: queue_empty(site), timeout=30, what="an empty queue")
    [kept] = site.mail_of("postmaster")
    assert (f"X-Dialmail-Review: mailbox dave: 5.1.1 LMTP unix:{dovecot_lmtp.socket} said after "
            f"RCPT TO:<dave>: 550 5.1.1 <dave> User doesn't exist: dave\r\n").encode() in kept
    assert b"X-Dialmail-Original-Recipient: dave@office.test\r\n" in kept
    assert dovecot_lmtp.messages("dave") == []


def test_mail_waits_while_the_lmtp_server_is_down_and_goes_when_it_is_back(site, dovecot_lmtp):
    lmtp_site(site, f"unix:{dovecot_lmtp.socket}")
    dovecot_lmtp.kill_9()
    site.start()
    send(site, ["alice@office.test"], "while dovecot is down")
    listing = wait_for(lambda: listing_with(site, "cannot connect"), timeout=20,
                       what="the deferral in the queue list")
    assert f"cannot connect to the mail server: LMTP unix:{dovecot_lmtp.socket}" in listing
    dovecot_lmtp.start_again()
    wait_for(lambda: dovecot_lmtp.messages("alice"), timeout=20, what="delivery once Dovecot is back")
    wait_for(lambda: queue_empty(site), timeout=10, what="an empty queue")


def test_check_rejects_a_bad_lmtp_setting_and_warns_when_the_server_does_not_answer(site, tmp_path):
    site.write_config('[delivery]\nlmtp = "/run/dovecot/lmtp"\n')
    r = site.cli("check")
    out = (r.stdout + r.stderr).decode()
    assert r.returncode != 0
    assert "delivery.lmtp" in out and 'write a socket as "unix:/run/dovecot/lmtp"' in out
    site.write_config('[delivery]\nlmtp = "localhost"\n')
    out = (lambda r: (r.stdout + r.stderr).decode())(site.cli("check"))
    assert "neither \"unix:/path/to/socket\" nor \"host:port\"" in out
    site.write_config(f'[delivery]\nlmtp = "unix:{tmp_path}/no-such-socket"\n')
    out = (lambda r: (r.stdout + r.stderr).decode())(site.cli("check"))
    assert f"cannot connect to the LMTP server unix:{tmp_path}/no-such-socket" in out
    assert "mail for local mailboxes waits in the queue until it answers" in out
    site.write_config('[delivery]\ndoveadm = "doveadm"\n')
    out = (lambda r: (r.stdout + r.stderr).decode())(site.cli("check"))
    assert "delivery.doveadm: only used with lmtp" in out
    site.write_config(f'[delivery]\nlmtp = "127.0.0.1:24"\ndoveadm = "{tmp_path}/no-doveadm -c x"\n')
    out = (lambda r: (r.stdout + r.stderr).decode())(site.cli("check"))
    assert f"'{tmp_path}/no-doveadm' is not an executable program here" in out


@pytest.mark.parametrize("dovecot_lmtp", [False], indirect=True)  # doveadm alone, no Sieve guard
def test_kill_9_of_dialmail_and_of_dovecot_loses_and_duplicates_nothing(site, dovecot_lmtp):
    """Batches of mail for alice and the team; while they are being handed over, kill -9
    dialmail or every Dovecot process, then start it again.  Every message taken with 250
    must end up once in each mailbox it was for."""
    seed = int(time.time())
    rnd = random.Random(seed)
    lmtp_site(site, f"unix:{dovecot_lmtp.socket}", doveadm=dovecot_lmtp.doveadm())
    site.start()
    expected: dict[str, set[str]] = {"alice": set(), "bob": set()}
    kills = {"dialmail": 0, "dovecot": 0}
    for round_ in range(12):
        for i in range(rnd.randint(4, 10)):
            mid = f"<r{round_}-{i}@office.test>"
            to_team = rnd.random() < 0.5
            rcpt = "team@office.test" if to_team else "alice@office.test"
            send(site, [rcpt], f"round {round_} message {i}", body="x" * rnd.randint(100, 60000) + "\r\n", mid=mid)
            expected["alice"].add(mid)
            if to_team:
                expected["bob"].add(mid)
        time.sleep(rnd.uniform(0.0, 0.25))
        if round_ % 2:
            site.stop(signal.SIGKILL)
            kills["dialmail"] += 1
            site.start()
        else:
            dovecot_lmtp.kill_9()
            kills["dovecot"] += 1
            time.sleep(rnd.uniform(0.0, 0.5))
            dovecot_lmtp.start_again()
    try:
        wait_for(lambda: queue_empty(site), timeout=90, what="an empty queue")
    except TimeoutError:
        raise AssertionError(f"seed {seed}: the queue did not drain:\n{queue_text(site)}\n{site.log()[-4000:]}") \
            from None
    for user, mids in expected.items():
        got = [str(email.message_from_bytes(m)["Message-ID"]) for m in dovecot_lmtp.messages(user)]
        lost = mids - set(got)
        twice = sorted({m for m in got if got.count(m) > 1})
        assert not lost and not twice, f"seed {seed}: {user} lost {sorted(lost)}, got twice {twice}"
        assert len(got) == len(mids)
    found = site.log().count("the copy sent before was stored (its reply was lost)")
    print(f"\nLMTP kill -9: seed {seed}, kills {kills}, messages alice {len(expected['alice'])} bob "
          f"{len(expected['bob'])}; copies found stored without a reply (not sent again): {found}")
    assert kills == {"dialmail": 6, "dovecot": 6}


def test_the_dedupe_script_discards_a_copy_handed_over_again(dovecot_lmtp):
    """The Sieve guard against the real Dovecot: the same delivery name twice, one copy
    kept; another name, another copy."""
    import smtplib as lmtp_client

    def hand_over(name: str) -> tuple[int, bytes]:
        c = lmtp_client.LMTP()
        c.connect(str(dovecot_lmtp.socket))
        try:
            c.ehlo("test")
            assert c.docmd("MAIL FROM:<carol@office.test>")[0] == 250
            assert c.docmd("RCPT TO:<alice>")[0] == 250
            assert c.docmd("DATA")[0] == 354
            c.send(f"X-Dialmail-Delivery: {name}\r\nSubject: {name}\r\n\r\nbody\r\n.\r\n".encode())
            return c.getreply()
        finally:
            c.quit()
    for name in ("Q1.aaaa", "Q1.aaaa", "Q1.bbbb"):
        code, text = hand_over(name)
        assert code == 250 and text.endswith(b" Saved"), text  # a discarded copy is still taken
    assert subjects(dovecot_lmtp.messages("alice")) == ["Q1.aaaa", "Q1.bbbb"]


def test_shipped_dedupe_script_compiles(tmp_path):
    from tests.lmtp_peer import DEDUPE, need_lmtp
    need_lmtp()
    out = tmp_path / "dedupe.svbin"
    r = subprocess.run(["sievec", str(DEDUPE), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert out.stat().st_size > 0


def test_an_lmtp_server_that_answers_nonsense_defers_the_mail_and_breaks_nothing(site, tmp_path):
    """A hostile or broken LMTP server: a 10,000-byte reply line after the final dot.
    The recipient is deferred as a lost connection, and no traceback is logged."""
    import socketserver
    import threading

    seen: list[bytes] = []

    class Broken(socketserver.StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"220 broken LMTP\r\n")
            while line := self.rfile.readline():
                seen.append(line)
                verb = line[:4].upper()
                if verb == b"LHLO":
                    self.wfile.write(b"250-broken\r\n250 PIPELINING\r\n")
                elif verb in (b"MAIL", b"RCPT"):
                    self.wfile.write(b"250 2.1.0 OK\r\n")
                elif verb == b"DATA":
                    self.wfile.write(b"354 go\r\n")
                    while self.rfile.readline() not in (b".\r\n", b""):
                        pass
                    self.wfile.write(b"250 " + b"x" * 10000 + b"\r\n")
                elif verb == b"QUIT":
                    self.wfile.write(b"221 bye\r\n")
                    return

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Broken)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        site.write_config(f'[delivery]\nlmtp = "127.0.0.1:{server.server_address[1]}"\n'
                          '[queue]\nretry_min = "1h"\nretry_max = "2h"\n')
        site.start()
        send(site, ["alice@office.test"], "to a broken server")
        listing = wait_for(lambda: listing_with(site, "Line too long"), timeout=20, what="the deferral")
        assert ("deferred: 4.4.2 lost connection with the mail server LMTP 127.0.0.1:"
                f"{server.server_address[1]} after the final dot, waiting for <alice>'s reply "
                "((500, 'Line too long.'))") in listing
        assert "Traceback" not in site.log()
        assert any(line.startswith(b"RCPT TO:<alice>") for line in seen)
    finally:
        server.shutdown()
        server.server_close()
