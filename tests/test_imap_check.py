"""`dialmail check` on the [imap] section: what the file says, and what this machine allows."""
from __future__ import annotations

import os
import socket

import pytest

from gateway.config import ConfigError, loads
from tests.harness import Site
from tests.peers import free_port, need
from tests.test_check import check, refused

BASE = '[server]\ndomains = ["office.test"]\n'


def test_no_imap_section_is_off_and_a_bare_one_is_managed_with_the_pop3_certificate(tmp_path):
    assert loads(BASE).imap.dovecot == "off"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    key.chmod(0o600)
    c = loads(BASE + f'[pop3]\ntls_cert = "{cert}"\ntls_key = "{key}"\n[imap]\n')
    assert (c.imap.dovecot, c.imap.tls_cert, c.imap.tls_key) == ("managed", cert, key)
    assert [str(lst) for lst in c.imap.listen] == ["0.0.0.0:143"]


def test_unknown_dovecot_mode_is_refused_with_its_line():
    with pytest.raises(ConfigError, match=r"<config>:5: imap.dovecot: must be one of 'managed', 'external', 'off'"):
        loads(BASE + '\n[imap]\ndovecot = "builtin"\n')


def test_imap_on_the_pop3_address_is_refused():
    with pytest.raises(ConfigError, match=r"imap.listen: 127.0.0.1:1110 is already \[pop3\] listen"):
        loads(BASE + '[pop3]\nlisten = ["127.0.0.1:1110"]\n[imap]\nlisten = ["127.0.0.1:1110"]\n')


def test_mail_user_root_is_refused():
    with pytest.raises(ConfigError, match="imap.mail_user: name the unprivileged user"):
        loads(BASE + '[imap]\nmail_user = "root"\n')


def test_check_names_a_mail_user_that_does_not_exist(tmp_path):
    need("dovecot", "doveconf")
    site = Site(tmp_path, extra=f'[imap]\nlisten = ["127.0.0.1:{free_port()}"]\nmail_user = "no-such-vmail"\n')
    if os.geteuid() == 0:
        refused(site, "imap.mail_user", 'mail_user = "no-such-vmail"', "no such user 'no-such-vmail'")
    else:  # run as its own user, dialmail is the mail user: the key does not matter
        assert "mail_user" not in check(site)[2]


def test_check_names_the_directory_dovecot_cannot_pass_through(tmp_path):
    need("dovecot", "doveconf")
    if os.geteuid() != 0:
        pytest.skip("only root hands the Maildirs to another user")
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    site = Site(closed, extra=f'[imap]\nlisten = ["127.0.0.1:{free_port()}"]\n')
    shut = next(p for p in reversed(site.spool.parents) if not os.stat(p).st_mode & 0o001)
    rc, _out, err = check(site)
    assert rc == 78, err
    assert f"cannot pass through {shut} on the way to the spool: run chmod o+x {shut}" in err


def test_check_accepts_two_imap_listeners_that_doveconf_accepts(peer_tmp):
    need("dovecot", "doveconf")
    site = Site(peer_tmp, extra=f'[imap]\nlisten = ["127.0.0.1:{free_port()}", "127.0.0.1:{free_port()}"]\n')
    rc, out, err = check(site)
    assert rc == 0 and "Dovecot refuses" not in err, err
    assert "  imap          127.0.0.1:" in out and "Dovecot managed" in out


def test_check_names_another_server_on_the_imap_address(peer_tmp):
    need("dovecot", "doveconf")
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(1)
    port = squatter.getsockname()[1]
    site = Site(peer_tmp, extra=f'[imap]\nlisten = ["127.0.0.1:{port}"]\n')
    try:
        refused(site, "imap.listen", "listen = [\"127.0.0.1:" + str(port),
                f"something else already listens on 127.0.0.1:{port} (Debian's own Dovecot?")
    finally:
        squatter.close()
