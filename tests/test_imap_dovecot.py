"""IMAP for the office: Dovecot on dialmail's own Maildirs, run by ``dialmail run`` or by the admin.

Every test starts the real peers it needs: dialmail's daemon (which starts Dovecot in
managed mode), Dovecot as the admin's server in external mode, the ISP's Dovecot, and
the clients (imaplib, curl, mutt).  Sites live in a directory Dovecot's unprivileged
users can reach (``peer_tmp``), as /var/spool is.
"""
from __future__ import annotations

import imaplib
import os
import poplib
import pwd
import re
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from gateway.imap.store import DovecotPaths
from gateway.imap.supervisor import master_pid
from gateway.pop3.maildrop import uid_of
from tests.harness import PASSWORDS, Site, wait_for
from tests.peers import free_port, make_self_signed_cert, need, wait_port
from tests.test_pop3_clients import message, smtp_send

pytestmark = pytest.mark.peer

# Distinctive, so the final scan of every log (tests/torture/test_zz_secrets.py) finds them if leaked.
ALICE_PW = "alice-Imap-Qz81"
BOB_PW = "bob-Imap-Qz81"
CAROL_PW, CAROL_PW2 = "carol-Imap-Qz81", "carol-Imap-Rw55"
PASSWORDS.update({CAROL_PW, CAROL_PW2})  # given through the CLI, not Site.add_user


class ImapSite(Site):
    """A dialmail site with ``[imap]`` on a free port, Dovecot managed unless ``dovecot`` says."""

    def __init__(self, tmp: Path, dovecot: str = "managed", imap_extra: str = "", pop3_extra: str = ""):
        self.imap_port = free_port()
        # Site's configuration ends in [pop3]: more of its keys first, then [imap]
        self.imap_section = (textwrap.dedent(pop3_extra) + f'\n[imap]\ndovecot = "{dovecot}"\n'
                             f'listen = ["127.0.0.1:{self.imap_port}"]\n' + textwrap.dedent(imap_extra))
        super().__init__(tmp, extra=self.imap_section)

    def start(self, wait: bool = True):
        proc = super().start(wait)
        if wait and '"managed"' in self.imap_section:
            wait_port("127.0.0.1", self.imap_port, timeout=20, proc=proc)
            wait_for(self.dovecot_pid, what="Dovecot's pid file")  # written just after it listens
        return proc

    def imap(self, user: str = "alice", password: str = ALICE_PW) -> imaplib.IMAP4:
        m = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=20)
        m.login(user, password)
        return m

    @property
    def dovecot(self) -> DovecotPaths:
        return DovecotPaths(self.spool)

    def dovecot_pid(self) -> int | None:
        """The running Dovecot master with this site's configuration (a pid file may be stale)."""
        return master_pid(self.dovecot)


@pytest.fixture
def imap_site(peer_tmp):
    need("dovecot", "doveconf", "doveadm")
    site = ImapSite(peer_tmp)
    site.add_user("alice", ALICE_PW)
    site.add_user("bob", BOB_PW)
    yield site
    site.stop()


def raw_imap(port: int, *commands: bytes) -> bytes:
    """A dialogue on a plain socket: every command sent, everything up to its tagged reply read."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        f = s.makefile("rb")
        out = f.readline()
        for i, command in enumerate(commands):
            tag = b"t%d" % i
            s.sendall(tag + b" " + command + b"\r\n")
            while True:
                line = f.readline()
                assert line, "connection closed"
                out += line
                if line.startswith(tag + b" "):
                    break
        return out


def fetch_all(m: imaplib.IMAP4, folder: str = "INBOX") -> dict[int, tuple[bytes, bytes]]:
    """UID -> (FLAGS, full message bytes) of every message in ``folder`` (PEEK: flags untouched).

    \\Recent is left out: it says which session saw a message first, not what the mailbox keeps."""
    typ, _ = m.select(folder)
    assert typ == "OK"
    typ, data = m.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[])")
    out = {}
    for item in data:
        if isinstance(item, tuple):
            uid = int(re.search(rb"UID (\d+)", item[0]).group(1))
            flags = re.search(rb"FLAGS \(([^)]*)\)", item[0]).group(1)
            flags = b" ".join(f for f in flags.split() if f != rb"\Recent")
            out[uid] = (flags, item[1])
    return out


def pop3_uidls(port: int, user: str = "alice", password: str = ALICE_PW) -> list[str]:
    p = poplib.POP3("127.0.0.1", port, timeout=20)
    p.user(user)
    p.pass_(password)
    uidls = sorted(line.split()[1].decode() for line in p.uidl()[1])
    p.quit()
    return uidls


# ---------------------------------------------------------------- managed Dovecot


def test_mail_delivered_by_dialmail_is_in_the_imap_inbox_byte_for_byte(imap_site):
    imap_site.start()
    smtp_send(imap_site, message(1), message(2))
    files = sorted(p.read_bytes() for p in imap_site.maildir("alice").messages())
    m = imap_site.imap()
    assert sorted(body for _flags, body in fetch_all(m).values()) == files
    m.logout()


def test_sent_drafts_trash_junk_exist_with_special_use_and_are_subscribed_at_first_login(imap_site):
    imap_site.start()
    said = raw_imap(imap_site.imap_port, b"LOGIN alice " + ALICE_PW.encode(), b'LSUB "" "*"', b'LIST "" "*"',
                    b"SELECT Sent")
    for name, flag in ((b"Sent", b"\\Sent"), (b"Drafts", b"\\Drafts"), (b"Trash", b"\\Trash"), (b"Junk", b"\\Junk")):
        assert b'* LSUB (' + flag + b') "/" ' + name + b"\r\n" in said
        assert b'* LIST (\\HasNoChildren ' + flag + b') "/" ' + name + b"\r\n" in said
    # a folder in use is a Maildir++ dot-folder in the user's own Maildir; Dovecot's files stay out of it
    box = imap_site.maildir("alice").path
    assert (box / ".Sent" / "maildirfolder").exists() and (box / ".Sent" / "cur").is_dir()
    assert not [p for p in box.rglob("dovecot*")]


def test_append_to_sent_and_flags_set_over_imap_survive_a_restart(imap_site):
    imap_site.start()
    smtp_send(imap_site, message(1))
    sent = b"From: alice@office.test\r\nTo: x@example.com\r\nSubject: kept copy\r\n\r\nmy reply\r\n"
    m = imap_site.imap()
    assert m.append("Sent", r"(\Seen)", None, sent)[0] == "OK"
    m.select("INBOX")
    assert m.uid("STORE", "1", "+FLAGS", r"(\Flagged \Answered)")[0] == "OK"
    m.logout()
    imap_site.stop()
    imap_site.start()
    m = imap_site.imap()
    ((flags, body),) = fetch_all(m, "Sent").values()
    assert body == sent and flags == rb"\Seen"
    ((flags, body),) = fetch_all(m, "INBOX").values()
    assert set(flags.split()) == {rb"\Flagged", rb"\Answered"} and body.endswith(message(1))
    m.logout()
    # the flags live in the Maildir names, where dialmail's POP3 and any other reader see them
    (name,) = [p.name for p in imap_site.maildir("alice").messages()]
    assert name.endswith(":2,FR")


def test_user_added_with_the_cli_logs_in_at_once_and_changes_count_from_the_next_login(imap_site):
    imap_site.start()
    r = imap_site.cli("users", "add", "carol", "--password-stdin", input=CAROL_PW.encode() + b"\n")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert f"incoming (IMAP)   mail.office.test  port {imap_site.imap_port}  security" in out
    assert f"incoming (POP3)   mail.office.test  port {imap_site.pop3_port}" in out
    assert f"outgoing (SMTP)   mail.office.test  port {imap_site.smtp_port}" in out
    imap_site.imap("carol", CAROL_PW).logout()  # no retry: at once
    r = imap_site.cli("users", "passwd", "carol", "--password-stdin", input=CAROL_PW2.encode() + b"\n")
    assert r.returncode == 0, r.stderr
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imap_site.imap("carol", CAROL_PW)
    imap_site.imap("carol", CAROL_PW2).logout()
    assert imap_site.cli("users", "del", "carol").returncode == 0
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imap_site.imap("carol", CAROL_PW2)


def test_pop3_and_imap_on_one_mailbox_at_once_with_stable_uidls(imap_site):
    imap_site.start()
    smtp_send(imap_site, message(1), message(2), message(3))
    before = pop3_uidls(imap_site.pop3_port)  # dialmail's POP3 moves the mail to cur/
    assert before == sorted(uid_of(p.name) for p in imap_site.maildir("alice").messages())
    m = imap_site.imap()
    m.select("INBOX")
    uids = sorted(fetch_all(m))
    m.select("INBOX")
    m.uid("STORE", str(uids[0]), "+FLAGS", r"(\Seen)")  # Dovecot renames the file
    assert pop3_uidls(imap_site.pop3_port) == before
    # deleted over IMAP: gone from POP3
    by_uid = {uid: body for uid, (_f, body) in fetch_all(m).items()}
    m.select("INBOX")
    m.uid("STORE", str(uids[1]), "+FLAGS", r"(\Deleted)")
    m.expunge()
    after = pop3_uidls(imap_site.pop3_port)
    assert len(after) == 2 and set(after) < set(before)
    # deleted over POP3 (IMAP session still open): gone from IMAP
    p = poplib.POP3("127.0.0.1", imap_site.pop3_port, timeout=20)
    p.user("alice")
    p.pass_(ALICE_PW)
    listing = {line.split()[1].decode(): int(line.split()[0]) for line in p.uidl()[1]}
    third = by_uid[uids[2]]
    n = next(n for uidl, n in listing.items() if b"".join(x + b"\r\n" for x in p.retr(n)[1]) == third)
    p.dele(n)
    p.quit()
    m.noop()
    assert sorted(fetch_all(m)) == [uids[0]]
    m.logout()


def test_dovecots_own_pop3_on_the_same_tree_gives_dialmails_uidls(imap_site, peer_tmp):
    imap_site.start()
    smtp_send(imap_site, message(1), message(2))
    m = imap_site.imap()
    m.append("INBOX", None, None, message(3).replace(b"\r\n", b"\n"))  # a file Dovecot names (,S=,W=)
    m.select("INBOX")
    m.uid("STORE", "1", "+FLAGS", r"(\Seen \Flagged)")
    m.logout()
    ours = pop3_uidls(imap_site.pop3_port)
    assert len(ours) == 3 and any(",W=" in u for u in ours)
    # Dovecot's POP3 with the configuration dialmail wrote, beside the running one
    d = peer_tmp / "dovecot-pop3"
    d.mkdir()
    port = free_port()
    conf = d / "dovecot.conf"
    conf.write_text(f"!include {imap_site.dovecot.conf}\n" + textwrap.dedent(f"""\
        protocols = pop3
        base_dir = {d}/run
        state_dir = {d}/state
        log_path = {d}/dovecot.log
        info_log_path = {d}/dovecot.log
        service imap-login {{
          inet_listener imap {{
            port = 0
          }}
        }}
        service pop3-login {{
          inet_listener pop3 {{
            address = 127.0.0.1
            port = {port}
          }}
          inet_listener pop3s {{
            port = 0
          }}
        }}
        """))
    proc = subprocess.Popen([shutil.which("dovecot") or "/usr/sbin/dovecot", "-F", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port("127.0.0.1", port, timeout=20, proc=proc)
        assert pop3_uidls(port) == ours
    finally:
        proc.terminate()
        proc.wait(10)


def test_dovecot_is_restarted_when_it_dies_and_stopped_with_dialmail(imap_site):
    imap_site.start()
    first = imap_site.dovecot_pid()
    assert first is not None
    os.kill(first, 9)
    wait_for(lambda: imap_site.dovecot_pid() not in (None, first), timeout=30, what="a new Dovecot master")
    second = imap_site.dovecot_pid()

    def logs_in():
        try:
            imap_site.imap().logout()
            return True
        except (OSError, imaplib.IMAP4.error):
            return False
    wait_for(logs_in, timeout=30, what="IMAP login on the restarted Dovecot")
    assert "Dovecot exited with status" in imap_site.log()
    assert imap_site.stop() == 0
    wait_for(lambda: not Path(f"/proc/{second}").exists(), timeout=10, what="Dovecot gone with dialmail")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", imap_site.imap_port), timeout=5)


def test_dovecot_goes_with_a_killed_dialmail_and_the_next_start_serves_again(imap_site):
    imap_site.start()
    first = imap_site.dovecot_pid()
    imap_site.stop(sig=9)
    wait_for(lambda: not Path(f"/proc/{first}").exists(), timeout=10, what="Dovecot gone with a killed dialmail")
    imap_site.start()
    assert imap_site.dovecot_pid() not in (None, first)
    imap_site.imap().logout()


def test_quarantine_is_a_folder_of_the_postmaster_only(peer_tmp):
    need("dovecot", "doveconf", "doveadm")
    site = ImapSite(peer_tmp)
    site.server_extra = 'postmaster = "alice@office.test"'
    site.write_config(site.imap_section)
    site.add_user("alice", ALICE_PW)
    site.add_user("bob", BOB_PW)
    try:
        site.start()
        held = b"X-Dialmail-Quarantine: blocked sender\r\nSubject: held\r\n\r\nbad\r\n"
        quarantine = site.maildir("quarantine")
        wait_for(quarantine.exists, what="the quarantine Maildir")
        quarantine.deliver(held, "1700000000.Qquarantined.host")
        m = site.imap()
        assert fetch_all(m, "Quarantine") == {1: (b"", held)}
        m.logout()
        bob = raw_imap(site.imap_port, b"LOGIN bob " + BOB_PW.encode(), b'LIST "" "*"')
        assert b"Quarantine" not in bob
    finally:
        site.stop()


def test_starttls_with_the_pop3_certificate_and_no_cleartext_login_from_the_lan(peer_tmp):
    need("dovecot", "doveconf", "doveadm", "openssl")
    cert, key = make_self_signed_cert(peer_tmp)
    site = ImapSite(peer_tmp, pop3_extra=f'tls_cert = "{cert}"\ntls_key = "{key}"\n')  # IMAP uses it too
    site.add_user("alice", ALICE_PW)
    try:
        site.start()
        # from another address of this host (not the server's own): a LAN client
        with socket.create_connection(("127.0.0.1", site.imap_port), timeout=20, source_address=("127.0.0.2", 0)) as s:
            f = s.makefile("rb")
            greeting = f.readline()
            assert greeting == (b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ "
                                b"STARTTLS LOGINDISABLED] Dovecot (Debian) ready.\r\n")
            s.sendall(b"a LOGIN alice " + ALICE_PW.encode() + b"\r\n")
            assert f.readline() == (b"* BAD [ALERT] Plaintext authentication not allowed without SSL/TLS, but your "
                                    b"client did it anyway. If anyone was listening, the password was exposed.\r\n")
            assert f.readline() == (b"a NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure "
                                    b"(SSL/TLS) connections.\r\n")
        m = imaplib.IMAP4("127.0.0.1", site.imap_port, timeout=20)
        m.starttls(ssl_context=ssl.create_default_context(cafile=str(cert)))
        assert m.login("alice", ALICE_PW)[0] == "OK"
        m.logout()
    finally:
        site.stop()


def test_curl_reads_the_inbox_over_imap(imap_site):
    need("curl")
    imap_site.start()
    smtp_send(imap_site, message(7))
    r = subprocess.run(["curl", "-sS", "--max-time", "20", "-u", f"alice:{ALICE_PW}",
                        f"imap://127.0.0.1:{imap_site.imap_port}/INBOX;UID=1"], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    (stored,) = [p.read_bytes() for p in imap_site.maildir("alice").messages()]
    assert r.stdout == stored and stored.endswith(message(7))


def test_fetched_from_the_isp_appears_in_the_imap_inbox(imap_site, isp):
    from tests.test_fetch_dovecot import ISP_PASSWORD
    letter = b"From: partner@isp.example\r\nTo: office@isp.example\r\nSubject: from outside\r\n\r\nhello\r\n"
    isp.save("office", letter)
    imap_site.write_config(imap_site.imap_section + imap_site.fetch_account(
        isp.imap_port, "office", ISP_PASSWORD, tls="starttls", ca_file=f'"{isp.cert}"', deliver_to='"alice"'))
    imap_site.start()
    r = imap_site.cli("connect-now", timeout=120)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    m = imap_site.imap()
    wait_for(lambda: fetch_all(m), timeout=30, what="fetched mail in the IMAP INBOX")
    ((_flags, body),) = fetch_all(m).values()
    assert body.endswith(letter) and b"Subject: from outside" in body
    m.logout()


# ---------------------------------------------------------------- the admin's Dovecot


ADMIN_DOVECOT = """\
# an admin's Dovecot, as on a Debian server: its own config, run by the admin
protocols = imap
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
ssl = no
auth_mechanisms = plain login
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
{include}
"""


def test_external_dovecot_given_the_printed_fragment_serves_the_mailboxes_and_check_verifies_it(peer_tmp):
    need("dovecot", "doveconf", "doveadm")
    d = peer_tmp / "admin-dovecot"
    d.mkdir()
    conf = d / "dovecot.conf"
    site = ImapSite(peer_tmp, dovecot="external", imap_extra=f'dovecot_config = "{conf}"\n')
    site.add_user("alice", ALICE_PW)
    proc = None
    try:
        site.start()
        smtp_send(site, message(1))
        conf.write_text(ADMIN_DOVECOT.format(d=d, port=site.imap_port, include=""))
        r = site.cli("check")
        assert r.returncode == 78
        assert b"imap.dovecot_config: Dovecot's mail_location is '', not dialmail's 'maildir:" in r.stderr
        fragment = site.cli("dovecot", "config", check=True).stdout
        assert b"passdb {\n  driver = passwd-file\n  args = scheme=ARGON2ID " + str(site.spool).encode() in fragment
        (d / "dialmail.conf").write_bytes(fragment)
        conf.write_text(ADMIN_DOVECOT.format(d=d, port=site.imap_port, include=f"!include {d}/dialmail.conf"))
        r = site.cli("check")
        assert r.returncode == 78 and b"is not running" in r.stderr, r.stderr
        proc = subprocess.Popen([shutil.which("dovecot") or "/usr/sbin/dovecot", "-F", "-c", str(conf)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port("127.0.0.1", site.imap_port, timeout=20, proc=proc)
        r = site.cli("check")
        assert r.returncode == 0, r.stderr
        assert f"imap          127.0.0.1:{site.imap_port}  Dovecot external".encode() in r.stdout
        m = site.imap()
        ((_flags, body),) = fetch_all(m).values()
        assert body.endswith(message(1))
        m.logout()
        # a user added while the admin's Dovecot runs logs in there too
        r = site.cli("users", "add", "carol", "--password-stdin", input=CAROL_PW.encode() + b"\n")
        assert r.returncode == 0, r.stderr

        def carol_in():
            try:
                site.imap("carol", CAROL_PW).logout()
                return True
            except imaplib.IMAP4.error:
                return False
        # Dovecot looks at a passwd-file at most once a second (no signal reaches the admin's Dovecot)
        wait_for(carol_in, timeout=10, what="the new user's login on the admin's Dovecot")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        site.stop()


MUTTRC = """\
set folder = "imap://alice@127.0.0.1:{port}/"
set imap_pass = "{password}"
set spoolfile = "+INBOX"
set ssl_starttls = no
set ssl_force_tls = no
set header_cache = ""
set message_cachedir = ""
set mail_check = 0
set confirmcreate = no
set confirmappend = no
set quit = yes
set move = no
set sort = date
"""


def test_mutt_copies_the_inbox_to_a_new_folder_and_flags_it(imap_site, peer_tmp):
    need("mutt", "script")
    imap_site.start()
    smtp_send(imap_site, message(1), message(2))
    rc = peer_tmp / "muttrc"
    rc.write_text(MUTTRC.format(port=imap_site.imap_port, password=ALICE_PW))
    rc.chmod(0o600)
    keys = "<tag-pattern>~A<enter><tag-prefix><copy-message>=Archive<enter><tag-prefix><set-flag>!<sync-mailbox><quit>"
    # mutt needs a terminal: script(1) gives it one; it runs the keys and quits
    r = subprocess.run(["script", "-qec", f"mutt -n -F {rc} -e 'push \"{keys}\"'", "/dev/null"],
                       capture_output=True, timeout=60, env={**os.environ, "TERM": "xterm", "HOME": str(peer_tmp)})
    assert r.returncode == 0, r.stdout[-2000:]
    m = imap_site.imap()
    archived = fetch_all(m, "Archive")
    inbox = fetch_all(m, "INBOX")
    assert sorted(body for _f, body in archived.values()) == sorted(body for _f, body in inbox.values())
    assert len(inbox) == 2 and all(rb"\Flagged" in flags.split() for flags, _b in inbox.values())
    m.logout()


def test_managed_dovecot_when_dialmail_runs_as_its_own_user(peer_tmp):
    need("dovecot", "doveconf", "doveadm", "setpriv")
    if os.geteuid() != 0:
        pytest.skip("the test itself is the unprivileged user: every other test shows it")
    site = ImapSite(peer_tmp)
    site.add_user("alice", ALICE_PW)
    nobody = pwd.getpwnam("nobody")
    for root, dirs, files in os.walk(peer_tmp):
        for name in [".", *dirs, *files]:
            os.chown(os.path.join(root, name), nobody.pw_uid, nobody.pw_gid)
    site.run_as = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
    try:
        site.start()
        smtp_send(site, message(1))
        m = site.imap()
        ((_flags, body),) = fetch_all(m).values()
        assert body.endswith(message(1))
        m.logout()
        master = psutil.Process(site.dovecot_pid())
        uids = set()
        for process in [master, *master.children(recursive=True)]:
            try:
                uids.add(process.uids().effective)
            except psutil.NoSuchProcess:  # a login process that has done its work
                pass
        assert uids == {nobody.pw_uid}
        r = site.cli("users", "add", "carol", "--password-stdin", input=CAROL_PW.encode() + b"\n")
        assert r.returncode == 0, r.stderr
        site.imap("carol", CAROL_PW).logout()
        assert {p.stat().st_uid for p in site.maildir("alice").path.rglob("*")} == {nobody.pw_uid}
    finally:
        site.stop()


def test_demo_shows_the_mailboxes_over_imap_when_dovecot_is_installed(peer_tmp):
    need("dovecot", "doveconf", "doveadm")
    r = subprocess.run([sys.executable, "-m", "gateway", "demo"], capture_output=True, timeout=240,
                       env={**os.environ, "TMPDIR": str(peer_tmp)})
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert "The same mailboxes over IMAP (Dovecot, run by dialmail)" in out
    assert "alice: folders Sent, Drafts, Trash, Junk, INBOX; INBOX: “Your order has shipped”" in out
    assert "every message arrived where it should" in out
    assert list(peer_tmp.iterdir()) == []  # the demo's directory is gone, its Dovecot with it
