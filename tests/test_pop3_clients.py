"""Local mailboxes over POP3, proved with real mail clients against a real daemon.

Mail goes in through the daemon's SMTP port (or ``dialmail sendmail``) and comes out
through poplib, fetchmail, getmail6 and curl; each must get exactly the expected
messages, byte-identical to the Maildir files after CRLF normalisation.
"""
from __future__ import annotations

import base64
import os
import poplib
import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from gateway.pop3.maildrop import uid_of
from tests.harness import RssSampler, Site, wait_for
from tests.peers import (
    getmail_rc,
    have,
    make_self_signed_cert,
    need,
    run_fetchmail,
    run_getmail,
    wait_port,
)

pytestmark = pytest.mark.peer

PASSWORD = "alice-pw"


# ---------------------------------------------------------------- helpers


def message(n: int, extra: bytes = b"") -> bytes:
    # Date and Message-ID of its own: mail from the LAN without them gets them added
    return (b"From: sender@example.com\r\nTo: alice@office.test\r\nSubject: message %d\r\n"
            b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nMessage-ID: <m%d@example.com>\r\n\r\n"
            b"Hello %d.\r\n.leading dot\r\n.\r\n..two dots\r\n" % (n, n, n) + extra + b"last line\r\n")


def smtp_send(site: Site, *bodies: bytes, rcpt: str = "alice@office.test") -> None:
    """Submit over the daemon's SMTP port and wait until local delivery has stored them."""
    before = len(site.mail_of(rcpt.split("@")[0]))
    with smtplib.SMTP("127.0.0.1", site.smtp_port, timeout=30) as smtp:
        for body in bodies:
            smtp.sendmail("sender@example.com", [rcpt], body)
    wait_for(lambda: len(site.mail_of(rcpt.split("@")[0])) >= before + len(bodies), what="local delivery")


def stored(site: Site, user: str = "alice") -> dict[str, bytes]:
    """UIDL -> file contents of everything in the user's Maildir."""
    md = site.maildir(user)
    return {uid_of(p.name): p.read_bytes() for p in md.messages()} if md.exists() else {}


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def login(site: Site, user: str = "alice", password: str = PASSWORD) -> poplib.POP3:
    pop = poplib.POP3("127.0.0.1", site.pop3_port, timeout=30)
    pop.user(user)
    pop.pass_(password)
    return pop


def retr(pop: poplib.POP3, n: int) -> bytes:
    _, lines, _ = pop.retr(n)
    return b"".join(line + b"\r\n" for line in lines)


def start(site: Site) -> Site:
    site.start()
    wait_port("127.0.0.1", site.pop3_port, proc=site.proc)
    return site


@pytest.fixture
def pop3(running):
    """The running daemon, with its POP3 port ready."""
    wait_port("127.0.0.1", running.pop3_port, proc=running.proc)
    return running


def files_in(directory: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()]


# ---------------------------------------------------------------- poplib


def test_poplib_gets_every_message_byte_identical_with_exact_octet_counts(pop3):
    smtp_send(pop3, message(1), message(2, b"x" * 900 + b"\r\n"))
    # A message written by another program with bare LF line ends (as Dovecot or a hand copy leaves them).
    md = pop3.maildir("alice")
    (md.path / "new" / "1900000000.M1P1.elsewhere").write_bytes(b"Subject: lf only\n\nbody\n.\n")
    files = stored(pop3)
    pop = login(pop3)
    uidls = dict(line.split() for line in pop.uidl()[1])  # number -> UIDL
    assert set(uidls.values()) == {u.encode() for u in files}
    count, octets = pop.stat()
    crlf = {u: lf(d).replace(b"\n", b"\r\n") for u, d in files.items()}
    assert (count, octets) == (3, sum(len(d) for d in crlf.values()))
    for entry in pop.list()[1]:
        n, size = entry.split()
        assert int(size) == len(crlf[uidls[n].decode()])
        assert retr(pop, int(n)) == crlf[uidls[n].decode()]
    _, top, _ = pop.top(1, 0)
    assert b"".join(line + b"\r\n" for line in top) == crlf[uidls[b"1"].decode()].split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert pop.quit().startswith(b"+OK")
    # Maildir readers' convention: seen mail lives in cur/ with an info part.
    assert os.listdir(md.path / "new") == []
    assert all(name.endswith(":2,") for name in os.listdir(md.path / "cur"))
    assert stored(pop3) == files  # nothing deleted, nothing changed


def test_dele_then_quit_deletes_but_a_dropped_connection_deletes_nothing(pop3):
    smtp_send(pop3, message(1), message(2))
    before = stored(pop3)
    pop = login(pop3)
    pop.dele(1)
    pop.dele(2)
    pop.sock.shutdown(socket.SHUT_RDWR)  # connection dropped without QUIT
    pop.close()
    wait_for(lambda: "retrieved=0 deleted=0 left=2 (disconnected)" in pop3.log(), what="logout")
    assert stored(pop3) == before
    pop = login(pop3)
    first = pop.uidl(1).split()[2].decode()
    pop.dele(1)
    assert b"1 deleted, 1 left" in pop.quit()
    assert set(stored(pop3)) == set(before) - {first}


def test_second_session_for_the_same_user_gets_in_use(pop3):
    smtp_send(pop3, message(1))
    first = login(pop3)
    second = poplib.POP3("127.0.0.1", pop3.pop3_port, timeout=30)
    second.user("alice")
    with pytest.raises(poplib.error_proto) as refused:
        second.pass_(PASSWORD)
    assert refused.value.args[0] == b"-ERR [IN-USE] Mailbox is already in use by another session"
    assert login(pop3, "bob", "bob-pw").stat() == (0, 0)  # other users are not affected
    first.quit()
    second.user("alice")
    assert second.pass_(PASSWORD).startswith(b"+OK")
    second.quit()


def test_mail_arriving_during_a_session_shows_up_at_the_next_login(pop3):
    smtp_send(pop3, message(1))
    pop = login(pop3)
    smtp_send(pop3, message(2))
    assert pop.stat()[0] == 1
    assert len(pop.uidl()[1]) == 1
    pop.quit()
    pop = login(pop3)
    assert pop.stat()[0] == 2
    pop.quit()


def test_uidls_are_stable_across_a_daemon_restart(pop3):
    smtp_send(pop3, message(1), message(2))
    pop = login(pop3)
    before = pop.uidl()[1]
    pop.quit()
    pop3.stop()
    start(pop3)
    smtp_send(pop3, message(3))
    pop = login(pop3)
    after = pop.uidl()[1]
    pop.quit()
    assert after[:2] == before and len(after) == 3


def test_auth_plain_logs_in(pop3):
    smtp_send(pop3, message(1))
    pop = poplib.POP3("127.0.0.1", pop3.pop3_port, timeout=30)
    token = base64.b64encode(b"\0alice\0" + PASSWORD.encode()).decode()
    assert pop._shortcmd(f"AUTH PLAIN {token}").startswith(b"+OK Logged in: 1 messages")
    assert retr(pop, 1) == next(iter(stored(pop3).values()))
    pop.quit()
    assert "mechanism=PLAIN" in pop3.log()


def test_pipelined_commands_are_answered_in_order(pop3):
    smtp_send(pop3, message(1))
    with socket.create_connection(("127.0.0.1", pop3.pop3_port), timeout=30) as s:
        s.sendall(f"USER alice\r\nPASS {PASSWORD}\r\nSTAT\r\nRETR 1\r\nNOOP\r\nQUIT\r\n".encode())
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    body = next(iter(stored(pop3).values()))
    assert got.index(b"+OK Logged in") < got.index(b"\r\n+OK 1 ") < got.index(b"last line\r\n.\r\n") \
        < got.index(b"\r\n+OK\r\n") < got.index(b"signing off")
    assert body.replace(b"\r\n.", b"\r\n..") in got


def test_repeated_failed_logins_lock_the_address_out_and_no_password_is_logged(tmp_path):
    # Keys appended after the harness's [pop3] listen line belong to [pop3].
    site = Site(tmp_path, extra='max_failures = 3\nlockout = "1m"\n')
    site.add_user("alice", PASSWORD)
    start(site)
    try:
        replies = []
        pop = poplib.POP3("127.0.0.1", site.pop3_port, timeout=30)
        for guess in ("guess-one", "guess-two", "guess-three"):
            pop.user("alice")
            with pytest.raises(poplib.error_proto) as refused:
                pop.pass_(guess)
            replies.append(refused.value.args[0])
        assert replies == [b"-ERR [AUTH] Authentication failed"] * 2 + [b"-ERR [AUTH] Too many failed logins from your address, try again later"]
        assert all(b"[AUTH]" in r for r in replies)
        # Locked out: even the right password is refused, also on a new connection.
        again = poplib.POP3("127.0.0.1", site.pop3_port, timeout=30)
        again.user("alice")
        with pytest.raises(poplib.error_proto) as refused:
            again.pass_(PASSWORD)
        assert refused.value.args[0] == b"-ERR [AUTH] Too many failed logins from your address, try again later"
        token = base64.b64encode(b"\0alice\0" + PASSWORD.encode()).decode()
        with pytest.raises(poplib.error_proto):
            again._shortcmd(f"AUTH PLAIN {token}")
        log = site.log()
        assert log.count("POP3 login failed user=alice from=127.0.0.1") == 3
        assert "locked out" in log
        for secret in ("guess-one", "guess-two", "guess-three", PASSWORD, token):
            assert secret not in log
    finally:
        site.stop()


def test_stls_when_a_certificate_is_configured(tmp_path):
    cert, key = make_self_signed_cert(tmp_path)
    site = Site(tmp_path, extra=f'tls_cert = "{cert}"\ntls_key = "{key}"\n')
    site.add_user("alice", PASSWORD)
    start(site)
    try:
        smtp_send(site, message(1))
        pop = poplib.POP3("127.0.0.1", site.pop3_port, timeout=30)
        assert "STLS" in pop.capa()
        pop.stls(context=ssl.create_default_context(cafile=str(cert)))
        assert "STLS" not in pop.capa()
        pop.user("alice")
        pop.pass_(PASSWORD)
        assert retr(pop, 1) == next(iter(stored(site).values()))
        pop.quit()
        assert "mechanism=USER tls=yes" in site.log()
    finally:
        site.stop()


def test_daemon_stopping_mid_session_deletes_nothing(pop3):
    smtp_send(pop3, message(1), message(2))
    before = stored(pop3)
    pop = login(pop3)
    pop.dele(1)
    pop3.stop()
    assert pop.sock.recv(1024) in (b"-ERR [SYS/TEMP] Server shutting down, try again later\r\n", b"")
    assert stored(pop3) == before
    start(pop3)
    pop = login(pop3)
    assert pop.stat()[0] == 2
    pop.quit()


# ---------------------------------------------------------------- fetchmail


def fetchmail(site: Site, home: Path, out: Path, keep: bool, cert: Path | None = None):
    """One fetchmail poll over POP3 (UIDL tracking), each message written to a file in ``out``.

    With ``cert`` fetchmail must use STLS and verify the server's certificate.
    """
    need("fetchmail")
    out.mkdir(exist_ok=True)
    tls = f"sslproto 'TLS1.2+' sslcertck sslcertfile '{cert}' sslcommonname 'localhost'" if cert else "sslproto '' no sslcertck"
    rc = (f"set no syslog\n"
          f"poll 127.0.0.1 with proto POP3 port {site.pop3_port} uidl\n"
          f'  user "alice" there with password "{PASSWORD}" is "alice" here\n'
          f"  options {'keep' if keep else 'nokeep'} no rewrite {tls}\n"
          f"  mda \"sh -c 'cat > $(mktemp {out}/msg.XXXXXX)'\"\n")
    # --invisible: no Received line of fetchmail's own, so the bytes can be compared;
    # --pidfile: as root the lock is otherwise system-wide and other fetchmail runs collide.
    return run_fetchmail(rc, home, args=["--invisible", "--pidfile", str(home / "fetchmail.pid")])


def test_fetchmail_keep_tracks_uidls_across_runs(pop3, tmp_path):
    smtp_send(pop3, message(1), message(2))
    first = stored(pop3)
    out = tmp_path / "out"
    run = fetchmail(pop3, tmp_path / "fm", out, keep=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(files_in(out)) == sorted(lf(d) for d in first.values())
    run = fetchmail(pop3, tmp_path / "fm", out, keep=True)
    assert run.returncode == 1, run.stdout + run.stderr  # 1 = no new mail
    assert len(files_in(out)) == 2
    smtp_send(pop3, message(3))
    (new_uid,) = set(stored(pop3)) - set(first)
    run = fetchmail(pop3, tmp_path / "fm", out, keep=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(files_in(out)) == sorted(lf(d) for d in stored(pop3).values())
    assert len(stored(pop3)) == 3  # all left on the server
    assert new_uid in (tmp_path / "fm" / ".fetchids").read_text()


def test_fetchmail_without_keep_deletes_what_it_fetched(pop3, tmp_path):
    smtp_send(pop3, message(1), message(2), message(3))
    before = stored(pop3)
    out = tmp_path / "out"
    run = fetchmail(pop3, tmp_path / "fm", out, keep=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(files_in(out)) == sorted(lf(d) for d in before.values())
    assert stored(pop3) == {}


def test_fetchmail_over_stls_with_certificate_check(tmp_path):
    cert, key = make_self_signed_cert(tmp_path)
    site = Site(tmp_path, extra=f'tls_cert = "{cert}"\ntls_key = "{key}"\n')
    site.add_user("alice", PASSWORD)
    start(site)
    try:
        smtp_send(site, message(1), message(2))
        out = tmp_path / "out"
        run = fetchmail(site, tmp_path / "fm", out, keep=False, cert=cert)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "POP3> STLS" in run.stdout
        assert len(files_in(out)) == 2 and stored(site) == {}
        assert "mechanism=USER tls=yes" in site.log()
    finally:
        site.stop()


# ---------------------------------------------------------------- getmail6


def getmail(site: Site, gdir: Path, maildir: Path, delete: bool):
    need("getmail")
    rc = getmail_rc("alice", PASSWORD, port=site.pop3_port, maildir=maildir, proto="POP3",
                    delete=delete, read_all=False)
    return run_getmail(rc, gdir, maildir=maildir)


def test_getmail_leaves_mail_on_the_server_and_fetches_only_new_mail(pop3, peer_tmp):
    smtp_send(pop3, message(1), message(2))
    first = stored(pop3)
    got = peer_tmp / "Maildir"
    run = getmail(pop3, peer_tmp / "g", got, delete=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(files_in(got / "new")) == sorted(lf(d) for d in first.values())
    run = getmail(pop3, peer_tmp / "g", got, delete=False)
    assert run.returncode == 0 and "0 messages" in run.stdout + run.stderr or \
        "Retrieved" not in run.stdout, run.stdout
    assert len(files_in(got / "new")) == 2
    smtp_send(pop3, message(3))
    run = getmail(pop3, peer_tmp / "g", got, delete=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(files_in(got / "new")) == sorted(lf(d) for d in stored(pop3).values())
    assert len(stored(pop3)) == 3


def test_getmail_with_delete_empties_the_maildrop(pop3, peer_tmp):
    smtp_send(pop3, message(1), message(2))
    before = stored(pop3)
    got = peer_tmp / "Maildir"
    run = getmail(pop3, peer_tmp / "g", got, delete=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(files_in(got / "new")) == sorted(lf(d) for d in before.values())
    assert stored(pop3) == {}


# ---------------------------------------------------------------- curl


def test_curl_pop3_lists_and_retrieves_byte_identical(pop3):
    if not have("curl"):
        pytest.skip("curl not installed")
    smtp_send(pop3, message(1), message(2))
    files = stored(pop3)
    url = f"pop3://127.0.0.1:{pop3.pop3_port}/"
    listing = subprocess.run(["curl", "-sS", "-u", f"alice:{PASSWORD}", url], capture_output=True, timeout=30, check=False)
    assert listing.returncode == 0, listing.stderr
    sizes = [int(line.split()[1]) for line in listing.stdout.splitlines()]
    assert sorted(sizes) == sorted(len(d) for d in files.values())
    got = [subprocess.run(["curl", "-sS", "-u", f"alice:{PASSWORD}", f"{url}{n}"], capture_output=True,
                          timeout=30, check=False).stdout for n in (1, 2)]
    assert sorted(got) == sorted(files.values())


# ---------------------------------------------------------------- a 20 MB message


@pytest.mark.timeout(180)
def test_20mb_message_is_streamed_with_flat_server_memory(pop3, capsys):
    line = b"0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789\n"
    body = b"".join((b"." if i % 50 == 0 else b"") + line for i in range(20 * 1024 * 1024 // len(line)))
    big = b"From: sender@example.com\nTo: alice@office.test\nSubject: twenty megabytes\n\n" + body
    run = pop3.cli("sendmail", "-i", "alice@office.test", input=big, timeout=120)
    assert run.returncode == 0, run.stderr
    (data,) = stored(pop3).values()
    assert len(data) > 20 * 1024 * 1024
    daemon = psutil.Process(pop3.proc.pid)
    login(pop3).quit()  # warm up: code paths, worker threads, the size of the message
    idle = daemon.memory_info().rss
    # The password check (argon2, 64 MiB of memory cost) inflates the RSS while it runs;
    # measure from when that memory is returned, so only the retrieval is counted.
    pop = login(pop3)
    baseline = wait_for(lambda: (rss := daemon.memory_info().rss) < idle + 4 * 2**20 and rss,
                        what="the password check's memory to be released")
    began = time.monotonic()
    with RssSampler(pop3.proc.pid, interval=0.002) as sampler:
        got = retr(pop, 1)
    took = time.monotonic() - began
    pop.quit()
    assert got == data
    assert lf(data).endswith(lf(body))
    growth = sampler.peak - baseline
    with capsys.disabled():  # the figure belongs in every run's output
        print(f"\n20 MB POP3 RETR ({len(data)} octets): daemon RSS baseline {baseline / 2**20:.1f} MiB, "
              f"peak {sampler.peak / 2**20:.1f} MiB, growth {growth / 2**20:.2f} MiB "
              f"({sampler.samples} samples over {took:.2f}s)")
    assert growth < 8 * 2**20, f"server memory grew by {growth / 2**20:.1f} MiB while sending 20 MB"
