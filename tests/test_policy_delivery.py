"""Aliases, catch-alls, groups (incl. round-robin), forwarding and hosted domains: SMTP in, POP3 out."""
from __future__ import annotations

import threading

import pytest

from gateway.config import loads
from gateway.mail.errors import ConfigError
from tests.harness import wait_for
from tests.test_policy_kit import (
    message,
    pop3,
    queue_of,
    send,
    settled,
    subjects,
    submit,
)

pytestmark = pytest.mark.timeout(120)

HOSTED = """
[aliases]
sales = ["alice", "bob"]
"info@branch.test" = ["carol@branch.test"]
"@branch.test" = ["carol@branch.test"]

[groups."team@branch.test"]
members = ["carol@branch.test", "dave@branch.test"]

[groups.everyone]
members = ["alice", "bob", "carol@branch.test"]
"""


@pytest.fixture
def hosted(site):
    """office.test (alice, bob) plus a hosted branch.test (carol, dave) with aliases and groups."""
    site.domains = ("office.test", "branch.test")
    for u in ("carol@branch.test", "dave@branch.test", "postmaster"):
        site.add_user(u, f"{u.split('@')[0]}-pw")
    site.write_config(HOSTED)
    return site


def carol(site):
    return pop3(site, "carol@branch.test", "carol-pw")


def dave(site):
    return pop3(site, "dave@branch.test", "dave-pw")


def test_aliases_groups_and_catch_all_per_domain(hosted):
    site = hosted
    site.start()
    send(site, "x@outside.test", "sales@office.test", "to sales")
    send(site, "x@outside.test", "team@branch.test", "to the branch team")
    send(site, "x@outside.test", "everyone@office.test", "to everyone")
    send(site, "x@outside.test", "whoever@branch.test", "to the catch-all")
    send(site, "x@outside.test", "info@branch.test", "to info")
    send(site, "x@outside.test", ["postmaster@office.test", "abuse@branch.test"], "to postmaster and abuse")
    # No catch-all in office.test, the group is branch.test's only, carol lives in branch.test only.
    for rcpt in ("whoever@office.test", "team@office.test", "carol@office.test"):
        d = submit(site, "x@outside.test", rcpt, message("x@outside.test", rcpt, "nope"))
        assert d.rcpt == [(550, "550 5.1.1 No such user here")], rcpt
    settled(site)
    assert subjects(pop3(site, "alice")) == ["to everyone", "to sales"]
    assert subjects(pop3(site, "bob")) == ["to everyone", "to sales"]
    assert subjects(carol(site)) == ["to everyone", "to info", "to the branch team", "to the catch-all"]
    assert subjects(dave(site)) == ["to the branch team"]
    pm = pop3(site, "postmaster", "postmaster-pw")
    assert subjects(pm) == ["to postmaster and abuse"] * 2


@pytest.mark.peer
def test_forwarding_local_remote_with_and_without_copy(hosted, smtp_sink):
    site = hosted
    site.write_config(HOSTED + f"""
[smarthost]
host = "127.0.0.1"
port = {smtp_sink.port}
starttls = "off"

[forward]
bob = {{ to = ["alice"] }}
"carol@branch.test" = {{ to = ["carol.home@elsewhere.test"], keep = true }}
"dave@branch.test" = {{ to = ["dave@mobile.test", "alice@office.test"] }}
""")
    site.start()
    send(site, "x@outside.test", "bob@office.test", "for bob")
    send(site, "x@outside.test", "carol@branch.test", "for carol")
    send(site, "x@outside.test", "dave@branch.test", "for dave")
    settled(site)
    assert subjects(pop3(site, "alice")) == ["for bob", "for dave"]
    assert pop3(site, "bob") == []
    assert subjects(carol(site)) == ["for carol"]
    assert dave(site) == []
    q = queue_of(site)
    try:
        outbound = {r.rcpt: m for m in q.messages() for r in m.recipients}
    finally:
        q.cat.close()
    assert set(outbound) == {"carol.home@elsewhere.test", "dave@mobile.test"}
    # the copies leave from the forwarding address: its bounces reach the one who set up the forward
    assert {r: (m.origin, m.sender) for r, m in outbound.items()} == {
        "carol.home@elsewhere.test": ("forward", "carol@branch.test"),
        "dave@mobile.test": ("forward", "dave@branch.test")}
    r = site.cli("connect-now", "--send-only", timeout=90)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    got = smtp_sink.wait_messages(2)
    assert sorted((m.mail_from, tuple(m.rcpts), m.message["Subject"]) for m in got) == [
        ("carol@branch.test", ("carol.home@elsewhere.test",), "for carol"),
        ("dave@branch.test", ("dave@mobile.test",), "for dave")]


def test_round_robin_is_fair_over_100_messages_across_a_restart(site):
    site.add_user("carol", "carol-pw")
    site.write_config("""
[groups.support]
members = ["alice", "bob", "carol"]
mode = "round-robin"
""")
    site.start()

    def burst(first: int, count: int, threads: int = 5) -> None:
        def worker(k):
            for n in range(first + k, first + count, threads):
                send(site, "customer@outside.test", "support@office.test", f"ticket {n:03d}")
        ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    burst(0, 50)
    site.stop()  # some may still wait in the queue: delivered after the restart
    site.start()
    burst(50, 50)
    settled(site, timeout=60)
    counts = {u: len(pop3(site, u, f"{u}-pw")) for u in ("alice", "bob", "carol")}
    print("round-robin counts:", counts)
    assert sum(counts.values()) == 100
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    got = sorted(s for u in ("alice", "bob", "carol") for s in subjects(pop3(site, u, f"{u}-pw")))
    assert got == [f"ticket {n:03d}" for n in range(100)]  # each exactly once


def test_aliases_list_prints_every_rule_with_its_expansion(hosted):
    site = hosted
    site.write_config(HOSTED + """
[groups.support]
members = ["alice", "bob"]
mode = "round-robin"
members_only = true

[forward]
bob = { to = ["bob@home.test"], keep = true }
""")
    r = site.cli("aliases", "list")
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()
    assert "sales@office.test" in out and "mailbox alice, mailbox bob, bob@home.test" in out
    assert "*@branch.test" in out and "-> mailbox carol@branch.test" in out
    assert "team@branch.test" in out and "mailbox carol@branch.test, mailbox dave@branch.test" in out
    assert "support@office.test                [round-robin, members only] = alice, bob" in out
    assert "bob                                -> bob@home.test (keeps a copy)" in out
    assert "postmaster@office.test             (always exists) -> mailbox postmaster" in out


@pytest.mark.parametrize("snippet, complaint", [
    ('[groups.x]\nmembers = []', "groups.x.members: a group needs at least one member"),
    ('[groups.x]\nmembers = ["a"]\nmode = "rr"', "groups.x.mode: must be one of 'all', 'round-robin'"),
    ('[groups.x]\nmembrs = ["a"]', "groups.x.membrs: unknown key (did you mean 'members'?)"),
    ('[groups."x@elsewhere.test"]\nmembers = ["a"]', "'elsewhere.test' is not one of the local domains"),
    ('[aliases]\nx = ["a"]\n[groups.x]\nmembers = ["a"]', "groups.x: is both an alias and a group"),
    ('[aliases]\n"@other.test" = ["a"]', "aliases.@other.test: a catch-all needs a local domain"),
    ('[forward]\nbob = { to = [] }', "forward.bob.to: list at least one address"),
    ('[forward]\nbob = { to = ["not an address@"] }', "is not an address"),
    ('[virus]\nclamd = "localhost"', 'virus.clamd: \'localhost\': write "unix:/run/clamav/clamd.ctl"'),
    ('[virus]\nclamd = "tcp:127.0.0.1:3310"\non_error = "ignore"', "virus.on_error: must be one of"),
    ('[blocklist]\nsenders = ["bad domain"]', "blocklist.senders: 'bad domain' is neither"),
    ('[vacation.alice]\nbody = "x"\nstart = 2026-07-10\nend = 2026-07-01', "vacation.alice.end: must not be before"),
    ('[vacation.alice]\nstart = 2026-07-01', "vacation.alice.body: is required"),
    ('[autoreply."fudge@office.test"]\nevery = "1d"', "autoreply.fudge@office.test.file: is required"),
    ('[autoreply."fudge@office.test"]\nfile = "/nonexistent.eml"', "cannot read /nonexistent.eml"),
    ('[policy]\nautoreply_every = "often"', "policy.autoreply_every: 'often' is not a duration"),
])
def test_config_errors_name_the_key(snippet, complaint):
    base = '[server]\ndomains = ["office.test"]\nspool_dir = "/tmp/unused"\n'
    with pytest.raises(ConfigError) as err:
        loads(base + snippet)
    assert complaint in str(err.value)


def test_dialmail_check_refuses_a_bad_policy_with_exit_78(site):
    site.write_config('[groups.sales]\nmembers = ["alice"]\nmode = "random"\n')
    r = site.cli("check")
    assert r.returncode == 78
    assert "groups.sales.mode: must be one of 'all', 'round-robin', got 'random'" in r.stderr.decode()


def test_members_only_group_bounces_outsider_mail_that_did_not_come_by_smtp(site):
    """sendmail (like fetched mail) is checked at delivery: the recipient bounces to the sender."""
    site.write_config('[groups.board]\nmembers = ["alice"]\nmembers_only = true\n')
    site.start()
    r = site.cli("sendmail", "-f", "outsider@else.test", "board@office.test",
                 input=message("outsider@else.test", "board@office.test", "sneaky"))
    assert r.returncode == 0, r.stderr.decode()
    settled(site)
    assert pop3(site, "alice") == []
    q = queue_of(site)
    try:
        bounces = [m for m in q.messages() if m.sender == "" and m.recipients[0].rcpt == "outsider@else.test"]
        assert len(bounces) == 1
        with q.open_body(bounces[0].id) as f:
            assert b"only members may post to board" in f.read()
    finally:
        q.cat.close()


def test_sample_config_shows_every_policy_section():
    from pathlib import Path

    from gateway.config import load
    cfg = load(Path(__file__).resolve().parent.parent / "etc" / "dialmail.toml")
    pol = cfg.policy
    assert pol.groups["support"].mode == "round-robin" and pol.groups["board@office.example"].members_only
    assert pol.forwards["bob"].keep and pol.virus.clamd.kind == "unix" and pol.virus.on_error == "accept"
    assert "*.junk.example" in pol.blocklist.senders and pol.blocklist.allow
    assert pol.autoresponders["fudge@office.example"].file.name == "fudge-recipe.eml"


@pytest.mark.timeout(180)
def test_kill_9_in_the_middle_of_a_group_delivery_neither_loses_nor_duplicates(site):
    """The daemon dies while a big message's copies for six mailboxes are being written: the
    retry completes them, keeps the round-robin member and the forwarded copy it had, and
    duplicates nothing."""
    import os
    import signal

    members = ["alice", "bob", "u1", "u2", "u3", "u4"]
    desk = ["d1", "d2", "d3"]
    for u in members[2:] + desk:
        site.add_user(u, f"{u}-pw")
    site.write_config(f"""
[groups.all]
members = {members!r}
[groups.desk]
members = ["d1", "d2", "d3"]
mode = "round-robin"
[aliases]
both = ["all", "desk", "someone@remote.test"]
""".replace("'", '"'))
    site.start()
    data = message("x@outside.test", "both@office.test", "big", attachment=("blob.bin", os.urandom(12 << 20)))
    assert submit(site, "x@outside.test", "both@office.test", data).accepted
    # Delivery writes every mailbox's copy into its tmp/ first, then links them all into
    # new/ and records them together: the kill comes while the copies are being written.
    def writing() -> bool:
        for u in members:
            for f in (site.spool / "mail" / u / "tmp").glob("*"):
                try:
                    if f.stat().st_size > 0:
                        return True
                except FileNotFoundError:  # linked into new/ and removed from tmp/ meanwhile
                    pass
        return False
    wait_for(writing, timeout=60, interval=0.005, what="the first mailbox copy being written")
    site.stop(signal.SIGKILL)
    q = queue_of(site)
    try:
        pending = [r for m in q.messages() for r in m.recipients if r.rcpt == "both@office.test"]
    finally:
        q.cat.close()
    assert pending and pending[0].status == "queued", "killed too late: the delivery had already finished"
    site.start()
    settled(site, timeout=90)
    copies = {u: len(site.mail_of(u)) for u in members + desk}
    print("copies after kill -9 and retry:", copies)
    assert all(copies[u] == 1 for u in members), copies
    # The turn was taken (d1, the first) before the kill; the retry must reuse it, not take d2's.
    assert [copies[u] for u in desk] == [1, 0, 0], copies
    q = queue_of(site)
    try:
        forwarded = [m for m in q.messages() if m.origin == "forward"]
    finally:
        q.cat.close()
    assert len(forwarded) == 1 and forwarded[0].recipients[0].rcpt == "someone@remote.test"
