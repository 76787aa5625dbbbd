"""`dialmail check` refuses every configuration mistake that would otherwise be found after a
paid call or by lost mail, one line per problem naming file, line and key, all of them at once."""
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from tests.harness import ROOT, Site
from tests.peers import make_self_signed_cert, need

EX_USAGE, EX_CONFIG = 64, 78


def check(site: Site) -> tuple[int, str, str]:
    r = site.cli("check")
    return r.returncode, r.stdout.decode(), r.stderr.decode()


def line_of(site: Site, text: str) -> int:
    """The line of the config file that starts with ``text`` (the test's own expectation)."""
    for no, line in enumerate(site.config_path.read_text().splitlines(), 1):
        if line.startswith(text):
            return no
    raise AssertionError(f"{text!r} not in the config")


def refused(site: Site, key: str, line_start: str, *phrases: str) -> str:
    """``check`` exits 78 with ``file:LINE: key: ...`` on stderr; returns that line."""
    rc, out, err = check(site)
    assert rc == EX_CONFIG, (out, err)
    assert "Traceback" not in err
    prefix = f"{site.config_path}:{line_of(site, line_start)}: {key}: "
    found = [line for line in err.splitlines() if prefix in line]
    assert found, err
    for phrase in phrases:
        assert phrase in found[0], found[0]
    return found[0]


def accepted(site: Site) -> str:
    rc, out, err = check(site)
    assert rc == 0, (out, err)
    assert f"configuration {site.config_path}: OK" in out
    return err


# ---------------------------------------------------------------- where mail goes


def with_postmaster(site: Site, postmaster: str) -> None:
    text = site.config_path.read_text().replace("mynetworks", f'postmaster = "{postmaster}"\nmynetworks', 1)
    site.config_path.write_text(text)


def test_postmaster_that_is_nobody_is_refused(site):
    with_postmaster(site, "admin@office.test")
    refused(site, "server.postmaster", "postmaster =", "'admin@office.test' is nobody here",
            "dialmail users add admin")
    site.add_user("admin", "admin-pw")
    accepted(site)


def test_postmaster_that_only_answers_automatically_is_refused(site):
    """An autoresponder address takes mail only to answer it: the postmaster's mail would be kept nowhere."""
    (site.dir / "reply.eml").write_text("Subject: thanks\n\nWe got your message.\n")
    site.write_config('[autoreply."info@office.test"]\nfile = "reply.eml"\n')
    with_postmaster(site, "info@office.test")
    refused(site, "server.postmaster", "postmaster =", "'info@office.test' is nobody here")


def test_daemon_refuses_to_start_with_a_postmaster_that_is_nobody(site):
    with_postmaster(site, "admin@office.test")
    r = subprocess.run([sys.executable, "-m", "gateway", "-c", str(site.config_path), "run"], capture_output=True,
                       timeout=60, cwd=ROOT, check=False)
    assert r.returncode == EX_CONFIG, r.stderr.decode()
    assert "server.postmaster: the postmaster 'admin@office.test' is nobody here" in r.stderr.decode()
    assert "not starting" in r.stderr.decode()


def test_alias_target_that_is_nobody_is_refused(site):
    site.write_config('[aliases]\nsales = ["alice", "bbo"]\n')
    refused(site, "aliases.sales", "sales =", "'bbo' is nobody here", "office.test")


def test_alias_to_an_invalid_outside_address_is_refused(site):
    site.write_config('[aliases]\nsales = ["alice", "bob at example.org@"]\n')
    refused(site, "aliases.sales", "sales =", "'bob at example.org@' is not a valid mail address")


def test_group_member_that_is_nobody_is_refused(site):
    site.write_config('[groups.support]\nmembers = ["alice", "carl"]\nmode = "round-robin"\n')
    refused(site, "groups.support.members", "members =", "'carl' is nobody here")


def test_forward_target_that_is_nobody_is_refused(site):
    site.write_config('[forward]\nbob = { to = ["alyce@office.test"], keep = true }\n')
    refused(site, "forward.bob.to", "bob =", "'alyce@office.test' is nobody here")


def test_forward_of_a_user_that_does_not_exist_is_refused(site):
    site.write_config('[forward]\nzoe = { to = ["zoe@example.org"] }\n')
    refused(site, "forward.zoe", "zoe =", "there is no user 'zoe'")


def test_fetch_deliver_to_that_is_nobody_is_refused(site):
    site.write_config(site.fetch_account(1143, "office@isp.test", "pw", deliver_to='"alcie"'))
    refused(site, "fetch[isp].deliver_to", "deliver_to =", "'alcie@office.test' is nobody here",
            "fetched mail goes to the postmaster")
    site.write_config(site.fetch_account(1143, "office@isp.test", "pw", deliver_to='"alice"'))
    accepted(site)


def test_every_problem_is_listed_not_only_the_first(site):
    site.write_config('[aliases]\nsales = ["bbo"]\n[groups.desk]\nmembers = ["carl"]\n')
    rc, _, err = check(site)
    assert rc == EX_CONFIG
    lines = err.splitlines()
    assert any("aliases.sales: 'bbo' is nobody here" in line for line in lines), err
    assert any("groups.desk.members: 'carl' is nobody here" in line for line in lines), err
    assert lines[-1].endswith("2 problems to fix before dialmail runs"), err


# ---------------------------------------------------------------- users


def test_users_add_refuses_a_user_of_a_domain_that_is_not_local(site):
    r = site.cli("users", "add", "zed@other.example", "--password-stdin", input=b"pw\n")
    assert r.returncode == EX_USAGE, r.stderr.decode()
    assert "other.example is not a local domain" in r.stderr.decode()
    assert "zed@other.example" not in site.users.names()
    r = site.cli("users", "add", "zed@office.test", "--password-stdin", input=b"pw\n")
    assert r.returncode == 0, r.stderr.decode()


def test_check_refuses_an_existing_user_of_a_domain_that_is_not_local(site):
    site.add_user("zed@other.example", "zed-pw")  # added before the domain left [server] domains
    rc, _, err = check(site)
    assert rc == EX_CONFIG
    assert f"{site.spool / 'users'}: user zed@other.example: other.example is not a local domain" in err, err


# ---------------------------------------------------------------- host names


@pytest.mark.parametrize("name, why", [
    ("localhost", "is a local-only name"),
    ("localhost.localdomain", "is a local-only name"),
    ("mailhost", "is not a fully qualified name"),
    ("192.0.2.25", "is an IP address"),
    ("mail_host.office.test", "is not a valid host name"),
])
def test_hostname_a_smarthost_would_refuse_is_refused(site, name, why):
    text = site.config_path.read_text().replace('hostname = "mail.office.test"', f'hostname = "{name}"')
    site.config_path.write_text(text)
    refused(site, "server.hostname", "hostname =", f"'{name}' {why}", "set [server] hostname")


def test_unset_hostname_is_refused_when_this_machine_has_no_full_name(site):
    """Without [server] hostname the machine's own name is used: only a full DNS name will do."""
    text = site.config_path.read_text().replace('hostname = "mail.office.test"\n', "")
    site.config_path.write_text(text)
    own = socket.getfqdn()
    if "." in own and not own.startswith("localhost") and not own.endswith(".localdomain"):
        accepted(site)
    else:
        rc, _, err = check(site)
        assert rc == EX_CONFIG, err
        assert f"server.hostname: '{own}' (not set, so this machine's own name was used)" in err, err
        assert "set [server] hostname" in err


@pytest.mark.parametrize("host, hint", [
    ("smtp.isp.test:587", "give the port in port ="),
    ("smtps://smtp.isp.test", "without a URL scheme"),
    ("smtp isp.test", ""),
])
def test_smarthost_host_that_is_no_host_name_is_refused(site, host, hint):
    site.write_config(f'[smarthost]\nhost = "{host}"\n')
    refused(site, "smarthost.host", "host =", f"'{host}' is not a host name or IP address", hint)


def test_fetch_host_that_is_no_host_name_is_refused(site):
    text = site.fetch_account(1143, "office@isp.test", "pw", deliver_to='"alice"')
    site.write_config(text.replace('host = "127.0.0.1"', 'host = "imap.isp.test:993"'))
    refused(site, "fetch[isp].host", "host =", "give the port in port =")


# ---------------------------------------------------------------- files


def test_missing_smarthost_password_file_is_refused(site, tmp_path):
    pw = tmp_path / "smarthost.password"
    site.write_config(f'[smarthost]\nhost = "smtp.isp.test"\nusername = "office"\npassword_file = "{pw}"\n')
    refused(site, "smarthost.password_file", "password_file =", f"{pw} does not exist", "chmod 600")
    pw.write_text("s3cret\n")
    pw.chmod(0o640)
    refused(site, "smarthost.password_file", "password_file =", "readable by group or others (mode 0640)",
            f"run: chmod 600 {pw}")
    pw.chmod(0o600)
    accepted(site)


def test_fetch_password_file_missing_or_open_is_refused(site):
    site.write_config(site.fetch_account(1143, "office@isp.test", "pw", deliver_to='"alice"'))
    pw = site.dir / "isp.password"
    pw.chmod(0o604)
    refused(site, "fetch[isp].password_file", "password_file =", "readable by group or others (mode 0604)")
    pw.unlink()
    refused(site, "fetch[isp].password_file", "password_file =", f"{pw} does not exist")


def test_fetch_without_a_password_file_is_refused(site):
    text = site.fetch_account(1143, "office@isp.test", "pw", deliver_to='"alice"')
    site.write_config(re.sub(r"password_file = .*\n", "", text))
    refused(site, "fetch[isp].password_file", "[[fetch]]", "is required")


def test_smarthost_and_isp_ca_files_that_hold_no_certificates_are_refused(site):
    bad = site.dir / "isp-ca.pem"
    bad.write_text("not a certificate\n")
    text = site.fetch_account(1143, "office@isp.test", "pw", deliver_to='"alice"', ca_file=f'"{site.dir}/nope.pem"')
    site.write_config(f'[smarthost]\nhost = "smtp.isp.test"\nca_file = "{bad}"\n' + text)
    refused(site, "smarthost.ca_file", "ca_file =", f"{bad} holds no PEM certificates")
    refused(site, "fetch[isp].ca_file", "ca_file = \"" + str(site.dir) + "/nope.pem", "nope.pem does not exist")


def test_missing_autoreply_file_is_refused_with_its_line(site):
    site.write_config('[autoreply."info@office.test"]\nfile = "nonexistent-reply.eml"\n')
    refused(site, "autoreply.info@office.test.file", "file =", "cannot read", "nonexistent-reply.eml")


def test_unreadable_autoreply_file_is_refused_with_its_line(site):
    # a directory where the document belongs: unreadable as a file for root too
    (site.dir / "reply.eml").mkdir()
    site.write_config('[autoreply."info@office.test"]\nfile = "reply.eml"\n')
    refused(site, "autoreply.info@office.test.file", "file =", "cannot read")


def test_tls_key_that_does_not_match_the_certificate_is_refused(site, tmp_path):
    need("openssl")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cert, _ = make_self_signed_cert(tmp_path / "a")
    _, other_key = make_self_signed_cert(tmp_path / "b")
    text = site.config_path.read_text().replace("[smtp]\n", f'[smtp]\ntls_cert = "{cert}"\ntls_key = "{other_key}"\n')
    site.config_path.write_text(text)
    refused(site, "smtp.tls_cert", "tls_cert =", f"the key {other_key} does not belong to the certificate {cert}")
    site.config_path.write_text(text.replace(str(other_key), str(tmp_path / "a" / "key.pem")))
    accepted(site)


def test_tls_certificate_that_is_not_pem_is_refused(site, tmp_path):
    need("openssl")
    _, key = make_self_signed_cert(tmp_path)
    cert = tmp_path / "cert.pem"
    cert.write_text("this is not a certificate\n")
    text = site.config_path.read_text().replace("[pop3]\n", f'[pop3]\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    site.config_path.write_text(text)
    refused(site, "pop3.tls_cert", "tls_cert =", "is not a PEM certificate and key")


# ---------------------------------------------------------------- clamd


def test_clamd_that_does_not_answer_is_a_warning_not_an_error(site, tmp_path):
    sock = tmp_path / "no-clamd.sock"
    site.write_config(f'[virus]\nclamd = "unix:{sock}"\n')
    err = accepted(site)
    line = line_of(site, "clamd =")
    assert (f"dialmail: warning: {site.config_path}:{line}: virus.clamd: clamd at unix:{sock} does not answer"
            in err), err
    assert "mail is delivered unscanned (virus on_error = accept)" in err


def test_clamd_that_answers_gives_no_warning(site, clamd):
    site.write_config(f'[virus]\nclamd = "unix:{clamd.socket_path}"\n')
    assert "virus.clamd" not in accepted(site)


def test_no_clamd_warns_once_in_the_daemon_log_not_on_every_sendmail(site, tmp_path):
    sock = tmp_path / "no-clamd.sock"
    site.write_config(f'[virus]\nclamd = "unix:{sock}"\n')
    for n in range(2):
        r = site.cli("sendmail", "alice@office.test", input=f"Subject: note {n}\n\nhello\n".encode())
        assert r.returncode == 0, r.stderr.decode()
        assert r.stderr == b"", r.stderr.decode()
    assert len(site.mail_of("alice")) == 2  # delivered unscanned (on_error = accept)
    r = site.cli("queue", "list")
    assert r.returncode == 0 and r.stderr == b"", r.stderr.decode()
    site.start()
    site.stop(signal.SIGTERM)
    log = site.log()
    assert log.count(f"clamd at unix:{sock} does not answer") == 1, log
    assert "WARNING dialmail.preflight:" in log, log


# ---------------------------------------------------------------- the sample


def test_sample_config_passes_once_its_users_and_password_files_exist(tmp_path):
    """etc/dialmail.toml names users and password files an admin creates first (see README)."""
    text = (ROOT / "etc" / "dialmail.toml").read_text()
    text = text.replace('"/var/spool/dialmail"', f'"{tmp_path / "spool"}"').replace("/etc/dialmail/", f"{tmp_path}/")
    text = text.replace('"unix:/var/run/clamav/clamd.ctl"', f'"unix:{tmp_path / "clamd.ctl"}"')
    cfg = tmp_path / "dialmail.toml"
    cfg.write_text(text)
    shutil.copy(ROOT / "etc" / "fudge-recipe.eml", tmp_path)

    def dialmail(*args, input=None):
        return subprocess.run([sys.executable, "-m", "gateway", "-c", str(cfg), *args], input=input,
                              capture_output=True, timeout=60, cwd=ROOT, check=False)

    r = dialmail("check")
    assert r.returncode == EX_CONFIG
    err = r.stderr.decode()
    assert "server.postmaster: the postmaster 'admin@office.example' is nobody here" in err, err
    assert "smarthost.password_file" in err and "fetch[office].password_file" in err
    for user in ("admin", "alice", "bob", "carol@branch.office.example"):
        assert dialmail("users", "add", user, "--password-stdin", input=b"pw\n").returncode == 0
    for name in ("smarthost.password", "office.password"):
        (tmp_path / name).write_text("s3cret\n")
        (tmp_path / name).chmod(0o600)
    r = dialmail("check")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stderr.decode().count("\n") == 1 and "virus.clamd" in r.stderr.decode()  # no clamd here: a warning
    assert "configuration" in r.stdout.decode() and "OK (1 warning)" in r.stdout.decode()



def test_connect_now_without_a_daemon_refuses_to_dial_with_a_refused_configuration(site):
    """A paid call with a configuration check refuses would only meet the same problem."""
    pw = site.dir / "smarthost.password"
    pw.write_text("secret\n")
    pw.chmod(0o644)
    site.write_config(f"""
[smarthost]
host = "127.0.0.1"
port = 2525
starttls = "off"
username = "office"
password_file = "{pw}"

[link]
type = "sim"
""")
    r = site.cli("connect-now", "--send-only")
    assert r.returncode == 78, r.stdout.decode() + r.stderr.decode()
    err = r.stderr.decode()
    assert "smarthost.password_file" in err and "not dialling" in err
    assert b"bringing the link up" not in r.stdout
