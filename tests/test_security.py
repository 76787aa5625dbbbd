"""Security properties against the real daemon: AUTH only under TLS for a real
non-loopback client (in a network namespace of its own), password guessing throttled
on SMTP and POP3, passwords stored only as argon2 hashes, no SMTP smuggling."""
import base64
import os
import poplib
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tests.harness import Site, wait_for
from tests.peers import wait_port

pytestmark = pytest.mark.timeout(180)


def smtp_section(site: Site, extra: str) -> None:
    """Add keys to the site's [smtp] section (the harness writes that section itself)."""
    text = site.config_path.read_text()
    site.config_path.write_text(text.replace('min_free_space = "1MB"\n', 'min_free_space = "1MB"\n' + extra, 1))


# ------------------------------------------------------------------ AUTH needs TLS off loopback

NETNS_CLIENT = textwrap.dedent("""
    import smtplib, ssl, sys
    host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    c = smtplib.SMTP(host, port, timeout=20)
    c.ehlo("lan.test")
    print("AUTH-ADVERTISED" if c.has_extn("auth") else "AUTH-HIDDEN")
    if mode == "tls":
        ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
        c.starttls(context=ctx); c.ehlo("lan.test")
        print("AUTH-ADVERTISED" if c.has_extn("auth") else "AUTH-HIDDEN")
    import base64
    code, msg = c.docmd("AUTH", "PLAIN " + base64.b64encode(b"\\0alice\\0alice-pw").decode())
    print("AUTH-REPLY", code, msg.decode())
    code, msg = c.docmd("MAIL FROM:<alice@office.test>")
    code, msg = c.docmd("RCPT TO:<partner@elsewhere.test>")
    print("RCPT-REPLY", code, msg.decode())
    c.quit()
    """)


@pytest.fixture
def netns():
    """A network namespace joined to this one by a veth pair: 10.200.<n>.1 here, .2 there."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2 for a network namespace")
    n = os.getpid() % 250 + 1
    name, here, there = f"dmsec{os.getpid()}", f"dmv{os.getpid()}a", f"dmv{os.getpid()}b"
    net = f"10.200.{n}"

    def ip(*args, ns=None):
        cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=10)
    try:
        ip("netns", "add", name)
        ip("link", "add", here, "type", "veth", "peer", "name", there)
        ip("link", "set", there, "netns", name)
        ip("addr", "add", f"{net}.1/30", "dev", here)
        ip("link", "set", here, "up")
        ip("addr", "add", f"{net}.2/30", "dev", there, ns=name)
        ip("link", "set", there, "up", ns=name)
        ip("link", "set", "lo", "up", ns=name)
    except subprocess.CalledProcessError as exc:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        pytest.skip(f"cannot make a network namespace here: {exc.stderr.decode().strip()}")
    yield name, f"{net}.1"
    subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=10)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def test_auth_needs_tls_for_a_real_non_loopback_client(site, netns, tmp_path):
    from tests.peers import make_self_signed_cert
    ns, addr = netns
    cert, key = make_self_signed_cert(tmp_path)
    text = site.config_path.read_text().replace(
        f'"127.0.0.2:{site.smtp_port}"]', f'"127.0.0.2:{site.smtp_port}", "{addr}:{site.smtp_port}"]')
    site.config_path.write_text(text)
    smtp_section(site, f'tls_cert = "{cert}"\ntls_key = "{key}"\n')
    site.start()
    wait_port(addr, site.smtp_port)

    def client(mode):
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", NETNS_CLIENT, addr,
                            str(site.smtp_port), mode], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    plain = client("plain")
    assert plain.splitlines()[0] == "AUTH-HIDDEN"
    assert re.search(r"AUTH-REPLY 538 ", plain), plain          # encryption required
    assert "RCPT-REPLY 554" in plain                          # and so no relaying either
    tls = client("tls")
    assert tls.splitlines()[:2] == ["AUTH-HIDDEN", "AUTH-ADVERTISED"]
    assert "AUTH-REPLY 235" in tls and "RCPT-REPLY 250" in tls, tls
    # On loopback AUTH works in the clear (local programs, the POP3/SMTP clients on the box).
    c = smtplib.SMTP("127.0.0.1", site.smtp_port, timeout=20)
    c.ehlo("localhost")
    assert c.has_extn("auth")
    c.login("alice", "alice-pw")
    c.quit()
    assert "alice-pw" not in site.log()


# ------------------------------------------------------------------ password guessing

def test_smtp_auth_guessing_is_slowed_then_locked_out(site):
    smtp_section(site, 'max_auth_failures = 3\nauth_lockout = "1m"\n')
    site.start()
    c = smtplib.SMTP("127.0.0.1", site.smtp_port, source_address=("127.0.0.2", 0), timeout=30)
    c.ehlo("guesser.test")
    took = []
    for guess in ("123456", "password", "alice"):
        t = time.monotonic()
        code, _ = c.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0alice\0" + guess.encode()).decode())
        took.append(time.monotonic() - t)
        assert code == 535
    # Each failure answers more slowly (0.25 s more per recent failure, verification aside).
    assert took[1] >= 0.25 and took[2] >= 0.5 and took[2] > took[0] + 0.3, took
    # Locked out now: even the right password is refused, before it is looked at.
    code, msg = c.docmd("AUTH", "PLAIN AGFsaWNlAGFsaWNlLXB3")  # \0alice\0alice-pw
    assert (code, msg.decode()) == (454, "4.7.0 Too many failed logins from your address, try again later")
    c.close()
    c = smtplib.SMTP("127.0.0.1", site.smtp_port, source_address=("127.0.0.2", 0), timeout=30)
    code, _ = c.docmd("EHLO", "again.test")
    code, _ = c.docmd("AUTH", "PLAIN AGFsaWNlAGFsaWNlLXB3")
    assert code == 454
    c.close()
    # Another address is not affected.
    c = smtplib.SMTP("127.0.0.1", site.smtp_port, timeout=30)
    c.ehlo("office.test")
    c.login("alice", "alice-pw")
    c.quit()
    assert "too many failed logins" in site.log()


def test_pop3_guessing_is_locked_out(tmp_path):
    site = Site(tmp_path, extra='max_failures = 3\nlockout = "1m"\n')
    site.add_user("alice", "alice-pw")
    site.start()
    try:
        p = poplib.POP3("127.0.0.1", site.pop3_port, timeout=30)
        for guess in ("123456", "password", "qwerty"):
            p.user("alice")
            with pytest.raises(poplib.error_proto):
                p.pass_(guess)
        p.user("alice")
        with pytest.raises(poplib.error_proto):
            p.pass_("alice-pw")
        p.close()
    finally:
        site.stop()


# ------------------------------------------------------------------ stored passwords

def test_passwords_are_stored_only_as_argon2_hashes(running):
    running.cli("user", "add", "carol", input=b"carol-Secret-9\ncarol-Secret-9\n")
    running.users.set_password("bob", "bob-new-Secret")
    c = smtplib.SMTP("127.0.0.1", running.smtp_port, timeout=30)
    c.login("bob", "bob-new-Secret")
    c.sendmail("bob@office.test", ["alice@office.test"], b"Subject: x\r\n\r\nx\r\n")
    c.quit()
    wait_for(lambda: running.mail_of("alice"), timeout=20, what="delivery")
    lines = (running.spool / "users").read_text().splitlines()
    assert lines and all(re.fullmatch(r"[^:]+:\$argon2id\$v=19\$m=\d+,t=\d+,p=\d+\$[^$]+\$[^$]+", l) for l in lines)
    assert oct((running.spool / "users").stat().st_mode & 0o777) == "0o600"
    secrets = [b"alice-pw", b"bob-pw", b"bob-new-Secret", b"carol-Secret-9"]
    for path in [*running.spool.rglob("*"), running.log_path]:
        if path.is_file():
            data = path.read_bytes()
            found = [s for s in secrets if s in data]
            assert not found, f"{path} holds a password: {found}"


# ------------------------------------------------------------------ SMTP smuggling

SMUGGLE_ENDS = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\n.\r", b"\r\n.\r", b"\r\n\x00.\r\n"]


def test_no_smtp_smuggling_inbound_or_on_to_the_smarthost(site, smtp_sink):
    site.write_config(f"""
[smarthost]
host = "127.0.0.1"
port = {smtp_sink.port}
starttls = "off"

[link]
type = "always-on"
""")
    site.start()
    s = socket.create_connection(("127.0.0.1", site.smtp_port), timeout=30)
    f = s.makefile("rb")

    def reply():
        lines = []
        while True:
            line = f.readline()
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)
    assert reply().startswith(b"220")
    s.sendall(b"EHLO lan.test\r\n")
    assert reply().startswith(b"250")
    for i, end in enumerate(SMUGGLE_ENDS):
        s.sendall(b"MAIL FROM:<alice@office.test>\r\nRCPT TO:<partner@elsewhere.test>\r\nDATA\r\n")
        assert reply().startswith(b"250") and reply().startswith(b"250") and reply().startswith(b"354")
        smuggled = (b"MAIL FROM:<mallory@office.test>\r\nRCPT TO:<victim@elsewhere.test>\r\nDATA\r\n"
                    b"Subject: smuggled " + str(i).encode() + b"\r\n\r\nsmuggled body\r\n")
        s.sendall(b"Subject: carrier " + str(i).encode() + b"\r\n\r\nfirst line" + end + smuggled + b"\r\n.\r\n")
        assert re.match(rb"250 2\.0\.0 Ok: queued as ", reply())
    s.sendall(b"QUIT\r\n")
    assert reply().startswith(b"221")
    # Exactly one reply per transaction came back: nothing after the dot was taken as commands.
    s.settimeout(2)
    assert f.read() == b""
    s.close()
    r = site.cli("connect-now", "--send-only", timeout=120)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    got = smtp_sink.wait_messages(len(SMUGGLE_ENDS), timeout=30)
    assert len(got) == len(SMUGGLE_ENDS)
    assert sorted(m.message["Subject"] for m in got) == sorted(f"carrier {i}" for i in range(len(SMUGGLE_ENDS)))
    assert all(m.rcpts == ["partner@elsewhere.test"] for m in got)
    assert not any("victim" in a for m in got for a in m.rcpts)
