"""Each real-peer fixture of tests/peers.py on its own, driven by stdlib clients only."""

from __future__ import annotations

import email
import imaplib
import poplib
import smtplib
import socket
import ssl
import struct

import psutil
import pytest

from tests.peers import (
    EICAR,
    HOST,
    IS_ROOT,
    Clamd,
    Dovecot,
    PeerStartError,
    PostfixSmarthost,
    SmtpSink,
    _descendants,
    _session_members,
    fetchmail_rc,
    free_port,
    getmail_rc,
    have,
    need,
    run_fetchmail,
    run_getmail,
    run_swaks,
    wait_port,
)

pytestmark = [pytest.mark.peer, pytest.mark.timeout(60)]


def msg(subject: str, body: str = "body", frm: str = "bob@example.com", to: str = "alice@example.com") -> bytes:
    return (f"From: {frm}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{subject.replace(' ', '.')}@test>\r\n"
            f"\r\n{body}\r\n").encode()


# ---------------------------------------------------------------- helpers


def test_free_port_and_wait_port():
    port = free_port()
    assert 1024 < port < 65536
    with pytest.raises(TimeoutError):
        wait_port(HOST, port, timeout=0.2)
    with socket.socket() as s:
        s.bind((HOST, port))
        s.listen()
        wait_port(HOST, port, timeout=2)


def test_have_and_need():
    assert have("sh")
    assert not have("no-such-program-dialmail")
    with pytest.raises(pytest.skip.Exception, match="no-such-program-dialmail"):
        need("no-such-program-dialmail")


# ---------------------------------------------------------------- dovecot


def test_dovecot_starts_empty_per_test(dovecot):
    assert dovecot.users == {}
    assert list(dovecot.mail_root.iterdir()) == []
    dovecot.add_user("leftover", "pw")  # removed again before the next test


def test_dovecot_imap_plain_login_append_fetch(dovecot):
    dovecot.add_user("alice", "secret")
    assert dovecot.save("alice", msg("one")) == 1
    assert dovecot.save("alice", msg("two")) == 2
    m = imaplib.IMAP4(dovecot.host, dovecot.imap_port)
    try:
        m.login("alice", "secret")
        assert m.select("INBOX") == ("OK", [b"2"])
        typ, data = m.uid("FETCH", "1:*", "(RFC822)")
        assert typ == "OK"
        bodies = [part[1] for part in data if isinstance(part, tuple)]
        assert [email.message_from_bytes(b)["Subject"] for b in bodies] == ["one", "two"]
        typ, resp = m.append("INBOX", None, None, msg("three"))
        assert typ == "OK" and b"APPENDUID" in resp[0]
    finally:
        m.logout()
    assert dovecot.list_uids("alice") == [1, 2, 3]
    assert dovecot.message_count("alice") == 3
    assert dovecot.save("alice", msg("archived"), folder="Archive") == 1
    assert dovecot.message_count("alice", "Archive") == 1
    assert set(dovecot.folders("alice")) == {"INBOX", "Archive"}


def test_dovecot_save_many_and_flags(dovecot):
    dovecot.add_user("alice", "secret")
    assert dovecot.save("alice", msg("seen"), flags=[r"\Seen"]) == 1
    assert dovecot.save_many("alice", [msg(f"bulk {i}") for i in range(20)]) == list(range(2, 22))
    m = dovecot.imap("alice")
    m.select("INBOX")
    assert m.uid("SEARCH", "UNSEEN")[1][0].split() == [str(u).encode() for u in range(2, 22)]
    m.logout()


def test_dovecot_imap_wrong_password(dovecot):
    dovecot.add_user("alice", "secret")
    m = imaplib.IMAP4(HOST, dovecot.imap_port)
    with pytest.raises(imaplib.IMAP4.error):
        m.login("alice", "wrong")
    m.logout()


def test_dovecot_imap_starttls_and_implicit_tls(dovecot):
    dovecot.add_user("alice", "secret")
    dovecot.save("alice", msg("tls"))
    ctx = ssl.create_default_context(cafile=str(dovecot.cert))
    m = imaplib.IMAP4(HOST, dovecot.imap_port)
    assert "STARTTLS" in m.capabilities
    m.starttls(ssl_context=ctx)  # verifies the certificate and the 127.0.0.1 SAN
    assert m.sock.version().startswith("TLSv1.")
    m.login("alice", "secret")
    assert m.select("INBOX")[0] == "OK"
    typ, data = m.fetch("1", "(BODY[HEADER.FIELDS (SUBJECT)])")
    assert b"Subject: tls" in data[0][1]
    m.logout()

    m = imaplib.IMAP4_SSL(HOST, dovecot.imaps_port, ssl_context=ctx)
    m.login("alice", "secret")
    assert m.select("INBOX") == ("OK", [b"1"])
    m.logout()


def test_dovecot_pop3_plain_and_stls(dovecot):
    dovecot.add_user("alice", "secret")
    dovecot.save("alice", msg("pop one"))
    dovecot.save("alice", msg("pop two"))
    p = poplib.POP3(HOST, dovecot.pop3_port)
    p.user("alice")
    p.pass_("secret")
    assert p.stat()[0] == 2
    assert len(p.uidl()[1]) == 2
    lines = p.retr(2)[1]
    assert b"Subject: pop two" in lines
    p.quit()

    p = poplib.POP3(HOST, dovecot.pop3_port)
    assert "STLS" in p.capa()
    p.stls(context=dovecot.ssl_context())
    p.user("alice")
    p.pass_("secret")
    assert p.stat()[0] == 2
    p.quit()


def test_dovecot_notls_offers_no_starttls(dovecot_notls):
    dovecot_notls.add_user("carol", "pw")
    assert dovecot_notls.cert is None and dovecot_notls.imaps_port is None
    m = imaplib.IMAP4(HOST, dovecot_notls.imap_port)
    assert "STARTTLS" not in m.capabilities
    m.login("carol", "pw")
    m.logout()


def test_dovecot_localhost_counts_as_secured(dovecot):
    # Dovecot treats remote IP == local IP as a secured connection, which is why
    # the helpers offer no "TLS required" server: plaintext login always works here.
    dovecot.add_user("dave", "pw")
    m = imaplib.IMAP4(HOST, dovecot.imap_port)
    assert "LOGINDISABLED" not in m.capabilities
    m.login("dave", "pw")
    m.logout()
    assert "secured" in dovecot.log()


def test_dovecot_reset_uidvalidity(dovecot):
    dovecot.add_user("alice", "secret")
    for s in ("a", "b", "c"):
        dovecot.save("alice", msg(s))
    m = dovecot.imap("alice")
    m.select("INBOX")
    m.uid("STORE", "1", "+FLAGS", r"(\Deleted)")
    m.expunge()
    m.logout()
    assert dovecot.list_uids("alice") == [2, 3]
    old = dovecot.uidvalidity("alice")

    new = dovecot.reset_uidvalidity("alice")  # renumbered: same messages, UIDs from 1
    assert new != old
    assert dovecot.list_uids("alice") == [1, 2]
    m = dovecot.imap("alice")
    m.select("INBOX")
    assert m.response("UIDVALIDITY")[1] == [str(new).encode()]
    typ, data = m.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert [part[1].strip() for part in data if isinstance(part, tuple)] == [b"Subject: b", b"Subject: c"]
    m.logout()

    newer = dovecot.reset_uidvalidity("alice", renumber=False)
    assert newer != new and dovecot.list_uids("alice") == [1, 2]


# ---------------------------------------------------------------- smtp-sink


def test_smtp_sink_stores_message_with_envelope(smtp_sink):
    with smtplib.SMTP(HOST, smtp_sink.port) as c:
        c.ehlo("client.test")
        assert "auth" not in c.esmtp_features
        c.sendmail("bob@example.com", ["alice@example.com", "carol@example.com"], msg("sink", ".leading dot"))
    (m,) = smtp_sink.messages()
    assert m.mail_from == "bob@example.com"
    assert m.rcpts == ["alice@example.com", "carol@example.com"]
    assert m.helo == "client.test" and m.client_addr == HOST
    assert m.data == msg("sink", ".leading dot").replace(b"\r\n", b"\n")
    assert m.message["Subject"] == "sink"
    assert m.raw.startswith(b"X-Client-Addr: 127.0.0.1\n")


def test_smtp_sink_null_sender_two_transactions(smtp_sink):
    with smtplib.SMTP(HOST, smtp_sink.port) as c:
        c.sendmail("", ["postmaster@example.com"], msg("bounce"))
        c.sendmail("a@example.com", ["b@example.com"], msg("second"))
    got = {m.message["Subject"]: m for m in smtp_sink.wait_messages(2)}
    assert got["bounce"].mail_from == "" and got["bounce"].rcpts == ["postmaster@example.com"]
    assert got["second"].mail_from == "a@example.com"


@pytest.mark.parametrize("option, code", [("hard_reject", 500), ("soft_reject", 450)])
def test_smtp_sink_rejects_rcpt(smtp_sink_factory, option, code):
    sink = smtp_sink_factory(**{option: ["rcpt"]})
    with smtplib.SMTP(HOST, sink.port) as c:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as exc:
            c.sendmail("a@example.com", ["b@example.com"], msg("x"))
    assert exc.value.recipients["b@example.com"][0] == code
    assert sink.messages() == []


def test_smtp_sink_disconnect_on_data(smtp_sink_factory):
    sink = smtp_sink_factory(disconnect=["data"])
    c = smtplib.SMTP(HOST, sink.port)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        c.sendmail("a@example.com", ["b@example.com"], msg("x"))


def test_swaks_into_smtp_sink(smtp_sink):
    need("swaks")
    r = run_swaks(["--server", HOST, "--port", str(smtp_sink.port), "--from", "sw@example.com",
                   "--to", "alice@example.com", "--header", "Subject: swaks test", "--body", "swaks body"],
                  timeout=20)
    assert r.returncode == 0, r.stdout + r.stderr
    (m,) = smtp_sink.messages()
    assert m.mail_from == "sw@example.com" and m.message["Subject"] == "swaks test"


# ---------------------------------------------------------------- postfix


def test_postfix_smarthost_per_recipient_replies(postfix_smarthost):
    pf = postfix_smarthost
    with smtplib.SMTP(HOST, pf.port) as c:
        refused = c.sendmail("bob@sender.example",
                             ["alice@example.com", "temp1@example.com", "bad1@example.com"], msg("pf"))
    assert refused["temp1@example.com"][0] == 450
    assert refused["bad1@example.com"][0] == 550
    assert "alice@example.com" not in refused
    (d,) = pf.wait_delivered(1)
    assert d.original_to == "alice@example.com" == d.delivered_to
    assert d.return_path == "bob@sender.example"
    assert d.message["Subject"] == "pf"


def test_postfix_smarthost_custom_rules_and_size_limit(postfix_smarthost):
    pf = postfix_smarthost
    pf.set_recipient_rules("/^carol@/ 452 4.2.2 mailbox full\n")
    pf.set_params(message_size_limit=2000)
    with smtplib.SMTP(HOST, pf.port) as c:
        refused = c.sendmail("a@example.com", ["carol@example.com", "temp@example.com"], msg("ok"))
        assert refused == {"carol@example.com": (452, refused["carol@example.com"][1])}
        # 552 at MAIL (SIZE= announced by smtplib) or after DATA
        with pytest.raises((smtplib.SMTPSenderRefused, smtplib.SMTPDataError)) as exc:
            c.sendmail("a@example.com", ["dan@example.com"], msg("big", "x" * 5000))
        assert exc.value.smtp_code == 552
    assert sorted(d.original_to for d in pf.wait_delivered(1)) == ["temp@example.com"]


# ---------------------------------------------------------------- clamd


def _instream(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(b"zINSTREAM\0" + struct.pack("!L", len(data)) + data + struct.pack("!L", 0))
    reply = b""
    while not reply.endswith(b"\0"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
    return reply


def test_clamd_finds_eicar(clamd):
    with socket.create_connection((HOST, clamd.port)) as s:
        assert _instream(s, b"Subject: x\r\n\r\n" + EICAR + b"\r\n") == (
            f"stream: {clamd.signature_name} FOUND\0".encode())
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(clamd.socket_path))
        assert _instream(s, b"harmless") == b"stream: OK\0"
    assert clamd.scan_bytes(EICAR).endswith("FOUND")


# ---------------------------------------------------------------- clients


def test_fetchmail_imap_from_dovecot_to_smtp_sink(dovecot, smtp_sink, tmp_path):
    need("fetchmail")
    dovecot.add_user("alice", "secret")
    dovecot.save("alice", msg("fetched one", frm="x@example.com"))
    dovecot.save("alice", msg("fetched two", frm="x@example.com"))
    rc = fetchmail_rc("alice", "secret", port=dovecot.imap_port, smtp_port=smtp_sink.port,
                      deliver_to="alice@example.com", ssl_mode="starttls", sslcertfile=dovecot.cert)
    r = run_fetchmail(rc, tmp_path / "fm", timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    got = smtp_sink.wait_messages(2)
    assert sorted(m.message["Subject"] for m in got) == ["fetched one", "fetched two"]
    assert all(m.rcpts == ["alice@example.com"] for m in got)
    # keep: the messages stay on the server
    assert dovecot.message_count("alice") == 2


def test_getmail_imap_from_dovecot_into_maildir(dovecot, peer_tmp):
    need("getmail")
    dovecot.add_user("alice", "secret")
    dovecot.save("alice", msg("got"))
    maildir = peer_tmp / "Maildir"
    rc = getmail_rc("alice", "secret", port=dovecot.imap_port, maildir=maildir)
    r = run_getmail(rc, peer_tmp / "getmail", maildir=maildir, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    (f,) = list((maildir / "new").iterdir())
    assert email.message_from_bytes(f.read_bytes())["Subject"] == "got"


# ---------------------------------------------------------------- teardown


PEER_CLASSES = [
    pytest.param(Dovecot, id="dovecot"),
    pytest.param(SmtpSink, id="smtp-sink"),
    pytest.param(Clamd, id="clamd"),
    pytest.param(PostfixSmarthost, id="postfix", marks=pytest.mark.skipif(not IS_ROOT, reason="postfix needs root")),
]


@pytest.mark.parametrize("make", PEER_CLASSES)
def test_stop_leaves_no_process(make):
    peer = make()
    need({"dovecot": "dovecot", "smtp-sink": "smtp-sink", "clamd": "clamd", "postfix": "postfix"}[peer.name])
    peer.start()
    directory = peer.dir
    pid = peer.pid
    tree = [psutil.Process(pid)] + _descendants(pid)
    peer.stop()
    assert [p for p in tree if p.is_running()] == []  # no zombies either (same pid and start time)
    assert _session_members(pid) == []
    assert not directory.exists()


def test_start_retries_when_the_port_got_taken(monkeypatch):
    need("clamd")
    from tests import peers

    blocker = socket.socket()
    blocker.bind((HOST, 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    ports = iter([taken])
    monkeypatch.setattr(peers, "free_port", lambda host=HOST: next(ports, None) or free_port())
    try:
        with Clamd() as c:
            assert c.port != taken
            assert c.scan_bytes(b"clean") == "stream: OK"
    finally:
        blocker.close()


def test_failed_start_cleans_up(monkeypatch):
    need("smtp-sink")
    sink = SmtpSink(extra_args=["-Z-no-such-option"])
    directory = sink.dir
    with pytest.raises(PeerStartError, match="invalid option"):
        sink.start()
    assert sink.proc is None and not directory.exists()


def test_restart_keeps_port_and_data(smtp_sink):
    need("dovecot")
    port = smtp_sink.port
    smtp_sink.restart()
    assert smtp_sink.port == port
    with smtplib.SMTP(HOST, port) as c:
        c.sendmail("a@example.com", ["b@example.com"], msg("after restart"))
    assert smtp_sink.wait_messages(1)[0].message["Subject"] == "after restart"

    with Dovecot(tls="none") as d:
        d.add_user("alice", "secret")
        d.save("alice", msg("kept"))
        imap_port = d.imap_port
        d.restart()
        assert d.imap_port == imap_port
        m = d.imap("alice")
        assert m.select("INBOX") == ("OK", [b"1"])
        m.logout()
