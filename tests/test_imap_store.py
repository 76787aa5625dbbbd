"""What the spool does so that Dovecot can read it: users file group and mode kept, its time
always moving, Maildir files owned by the Maildirs' owner."""
from __future__ import annotations

import grp
import os
import pwd

import pytest

from spool.maildir import Maildir
from spool.users import Users


def test_a_new_users_file_keeps_the_group_and_mode_and_its_time_moves_on(tmp_path):
    users = Users(tmp_path)
    users.add("alice", "alice-Store-Pw7")
    group = grp.getgrnam("dovecot").gr_gid if os.geteuid() == 0 else os.getegid()
    os.chown(users.path, -1, group)
    os.chmod(users.path, 0o640)
    before = users.path.stat()
    users.add("bob", "bob-Store-Pw7")  # well within the same second
    after = users.path.stat()
    assert after.st_ino != before.st_ino  # replaced, not rewritten in place
    assert (oct(after.st_mode & 0o777), after.st_gid) == ("0o640", group)
    # Dovecot re-reads a passwd-file only when its mtime (whole seconds) or size changed
    assert after.st_mtime_ns // 10**9 > before.st_mtime_ns // 10**9
    assert users.verify("bob", "bob-Store-Pw7")


def test_a_fresh_users_file_is_for_its_owner_alone(tmp_path):
    Users(tmp_path).add("alice", "alice-Store-Pw7")
    assert oct((tmp_path / "users").stat().st_mode & 0o777) == "0o600"


def test_mail_delivered_as_root_belongs_to_the_owner_of_the_maildirs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("only root makes files for another user")
    nobody = pwd.getpwnam("nobody")
    mail = tmp_path / "mail"
    mail.mkdir()
    os.chown(mail, nobody.pw_uid, nobody.pw_gid)
    box = Maildir(mail / "alice")
    delivered = box.deliver(b"Subject: x\r\n\r\nx\r\n", "1700000000.Qx.host")
    made = [box.path, *(box.path / sub for sub in ("tmp", "new", "cur")), delivered]
    assert {(p.stat().st_uid, p.stat().st_gid) for p in made} == {(nobody.pw_uid, nobody.pw_gid)}


def test_mail_delivered_as_root_into_root_owned_maildirs_stays_roots(tmp_path):
    box = Maildir(tmp_path / "mail" / "alice")
    delivered = box.deliver(b"Subject: x\r\n\r\nx\r\n", "1700000000.Qx.host")
    assert delivered.stat().st_uid == os.geteuid()
