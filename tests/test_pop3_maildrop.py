"""The Maildir side of POP3 on a real directory: new/ -> cur/, UIDLs, sizes, UPDATE."""
from __future__ import annotations

import os

from gateway.pop3.maildrop import MAX_UID, Maildrop, MaildropLocks, OctetCounts, uid_of
from spool.maildir import Maildir


def deliver(md: Maildir, unique: str, data: bytes):
    return md.deliver(data, unique)


def test_missing_maildir_is_an_empty_maildrop(tmp_path):
    assert Maildrop(tmp_path / "nobody", OctetCounts()).open() == []


def test_open_moves_new_to_cur_and_uidls_survive_the_move(tmp_path):
    md = Maildir(tmp_path / "alice")
    deliver(md, "1700000002.Qb.host", b"Subject: b\r\n\r\nb\r\n")
    deliver(md, "1700000001.Qa.host", b"Subject: a\r\n\r\na\r\n")
    before = sorted(uid_of(p.name) for p in md.messages())
    listing = Maildrop(md.path, OctetCounts()).open()
    # the name without its ":2," info, as Dovecot's pop3_uidl_format = %f gives it
    assert [m.uid for m in listing] == ["1700000001.Qa.host,S=17", "1700000002.Qb.host,S=17"] == before
    assert os.listdir(md.path / "new") == []
    assert sorted(os.listdir(md.path / "cur")) == [m.path.name for m in listing]
    assert all(m.path.name.endswith(":2,") for m in listing)
    again = Maildrop(md.path, OctetCounts()).open()
    assert [(m.uid, m.octets) for m in again] == [(m.uid, m.octets) for m in listing]


def test_flag_changes_by_another_reader_keep_the_uidl(tmp_path):
    md = Maildir(tmp_path / "alice")
    deliver(md, "1700000001.Qa.host", b"x\r\n")
    (m,) = Maildrop(md.path, OctetCounts()).open()
    os.rename(m.path, m.path.with_name(m.path.name + "S"))
    (again,) = Maildrop(md.path, OctetCounts()).open()
    assert again.uid == m.uid
    drop = Maildrop(md.path, OctetCounts())
    assert drop.open_message(m).read() == b"x\r\n"  # found under its new name
    assert drop.remove([m]) == 0
    assert os.listdir(md.path / "cur") == []


def test_octets_are_wire_sizes_for_lf_files_and_dovecot_w_sizes_are_trusted(tmp_path):
    md = Maildir(tmp_path / "alice").create()
    (md.path / "new" / "1700000001.M1P1.host").write_bytes(b"Subject: lf\n\nbody\n")
    (md.path / "cur" / "1700000002.M2P2.host,S=5,W=999:2,S").write_bytes(b"x\n\ny\n")
    a, b = Maildrop(md.path, OctetCounts()).open()
    assert a.octets == len(b"Subject: lf\r\n\r\nbody\r\n")
    assert (b.uid, b.octets) == ("1700000002.M2P2.host,S=5,W=999", 999)


def test_unusable_names_get_a_stable_digest_uid():
    long = "1700000000." + "x" * 100
    assert len(uid_of(long)) <= MAX_UID and uid_of(long) == uid_of(long + ":2,S")
    assert all(0x21 <= ord(c) <= 0x7E for c in uid_of("17 00 é"))


def test_remove_deletes_only_what_it_is_given(tmp_path):
    md = Maildir(tmp_path / "alice")
    deliver(md, "1700000001.Qa.host", b"a\r\n")
    deliver(md, "1700000002.Qb.host", b"b\r\n")
    drop = Maildrop(md.path, OctetCounts())
    first, second = drop.open()
    assert drop.remove([first]) == 0
    assert [m.uid for m in drop.open()] == [second.uid]


def test_one_session_per_maildrop():
    locks = MaildropLocks()
    assert locks.acquire("alice") and not locks.acquire("alice") and locks.acquire("bob")
    locks.release("alice")
    assert locks.acquire("alice")
