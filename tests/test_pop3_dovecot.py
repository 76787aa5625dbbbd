"""One Maildir, two POP3 servers: what dialmail serves, Dovecot serves the same, and back.

Dovecot stores LF line ends and names files ``,S=<size>,W=<CRLF size>``; dialmail
stores CRLF.  Whichever wrote the Maildir, both servers must report the same octet
counts and send the same bytes, and dialmail's new/ -> cur/ move must leave a Maildir
that Dovecot reads as it is.
"""
from __future__ import annotations

import os
import poplib
import pwd
import shutil
from pathlib import Path

import pytest

from tests.peers import wait_port
from tests.test_pop3_clients import PASSWORD, login, message, retr, smtp_send

pytestmark = pytest.mark.peer


@pytest.fixture
def pop3(running):
    wait_port("127.0.0.1", running.pop3_port, proc=running.proc)
    return running


def copy_maildir(src: Path, dst: Path, owner: str | None = None) -> None:
    for sub in ("tmp", "new", "cur"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        for p in (src / sub).iterdir() if (src / sub).is_dir() else ():
            if p.is_file():
                shutil.copy2(p, dst / sub / p.name)
    if owner and os.geteuid() == 0:
        pw = pwd.getpwnam(owner)
        for root, dirs, files in os.walk(dst.parent):
            for name in [*dirs, *files]:
                os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)
        os.chown(dst.parent, pw.pw_uid, pw.pw_gid)


def everything(pop: poplib.POP3) -> list[tuple[int, bytes]]:
    """(LIST size, RETR bytes) of every message, in maildrop order."""
    out = [(int(entry.split()[1]), retr(pop, int(entry.split()[0]))) for entry in pop.list()[1]]
    pop.quit()
    return sorted(out)


def test_dovecot_written_maildir_is_served_identically_by_dialmail(pop3, dovecot):
    dovecot.add_user("alice", PASSWORD)
    dovecot.save("alice", b"From: a@example.com\nSubject: lf\n\nline\n.\n..two\n")
    dovecot.save("alice", message(7).replace(b"\r\n", b"\n"))
    theirs = everything(dovecot.pop3("alice"))
    copy_maildir(dovecot.maildir("alice"), pop3.maildir("alice").path)
    ours = everything(login(pop3))
    assert ours == theirs and len(ours) == 2


def test_maildir_served_by_dialmail_is_served_identically_by_dovecot(pop3, dovecot):
    smtp_send(pop3, message(1), message(2))
    ours = everything(login(pop3))  # moves the messages new/ -> cur/
    assert os.listdir(pop3.maildir("alice").path / "new") == []
    dovecot.add_user("alice", PASSWORD)
    copy_maildir(pop3.maildir("alice").path, dovecot.maildir("alice"), owner=dovecot.mail_owner)
    theirs = everything(dovecot.pop3("alice"))
    assert theirs == ours and len(ours) == 2
