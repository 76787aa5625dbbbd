"""Fetching from a real Dovecot IMAP server: exactly once, whatever happens to the line."""
from __future__ import annotations

import asyncio
import random
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from gateway import config as config_mod
from gateway.delivery.worker import LocalDelivery
from gateway.fetch.imap import fetch_all
from gateway.office.directory import Directory
from spool.fetchstate import AccountLock
from spool.queue import Catalogue, Queue
from spool.users import Users
from tests.harness import RssSampler, Site
from tests.peers import have, run_fetchmail

pytestmark = pytest.mark.peer

ISP_PASSWORD = "isp-secret"


def message(n: int, *, size: int = 0, headers: str = "", msgid: str | None = None, subject: str | None = None) -> bytes:
    """A CRLF message; ``size`` pads the body to roughly that many bytes."""
    msgid = msgid or f"<m{n}.{random.getrandbits(40):x}@sender.test>"
    head = (f"Return-Path: <sender{n}@outside.test>\r\n{headers}"
            f"From: Sender {n} <sender{n}@outside.test>\r\nTo: office@isp.test\r\n"
            f"Subject: {subject or f'message {n}'}\r\nMessage-ID: {msgid}\r\n"
            f"Date: Wed, 25 Nov 2026 09:00:00 +0000\r\n\r\n")
    body = f"body of message {n}\r\n"
    if size > len(head) + len(body):
        line = (f"{n:08d} " + "x" * 68 + "\r\n").encode()
        reps = (size - len(head) - len(body)) // len(line)
        return (head + body).encode() + line * reps
    return (head + body).encode()


class FetchSite:
    """A dialmail site with local users plus [[fetch]] accounts, fetched in-process."""

    def __init__(self, tmp: Path, users=("alice", "bob", "carol")):
        self.site = Site(tmp)
        for u in users:
            self.site.add_user(u, f"{u}-pw")
        self.pwfile = Path(tmp) / "isp.password"
        self.pwfile.write_text(ISP_PASSWORD + "\n")
        self.pwfile.chmod(0o600)

    def account(self, name: str, port: int, user: str, **opts) -> str:
        lines = ['[[fetch]]', f'name = "{name}"', 'host = "127.0.0.1"', f'port = {port}',
                 f'username = "{user}"', f'password_file = "{self.pwfile}"']
        opts.setdefault("tls", "off")
        for key, value in opts.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, (int, float)):
                lines.append(f"{key} = {value}")
            elif isinstance(value, (list, tuple)):
                lines.append(f"{key} = [{', '.join(repr(str(v)).replace(chr(39), chr(34)) for v in value)}]")
            else:
                lines.append(f'{key} = "{value}"')
        return "\n".join(lines) + "\n\n"

    def configure(self, *accounts: str) -> None:
        self.site.write_config("\n" + "".join(accounts))

    @property
    def config(self):
        return config_mod.load(self.site.config_path)

    def fetch(self, deliver: bool = True, **kw):
        cfg = self.config
        cat = Catalogue(cfg.spool_dir)
        try:
            queue = Queue(cat)
            directory = Directory(cfg, Users(cfg.spool_dir))
            result = asyncio.run(fetch_all(cfg, queue, cat, directory, **kw))
            if deliver:
                delivery = LocalDelivery(cfg, queue, directory)
                while delivery.run_once():
                    pass
            return result
        finally:
            cat.close()

    def mail(self, user: str) -> list[bytes]:
        """Messages in the user's Maildir without the trace lines local delivery adds.

        Fetched mail already has the ISP's Return-Path (every message() here has one), so
        only a Delivered-To is added, and not even that when the ISP wrote the same one;
        our own notices get both lines.
        """
        out = []
        for raw in self.site.mail_of(user):
            if raw.startswith(b"Delivered-To:"):
                raw = raw.split(b"\r\n", 1)[1]
            elif raw.startswith(b"Return-Path: <>\r\nDelivered-To:"):
                raw = raw.split(b"\r\n", 2)[2]
            out.append(raw)
        return out

    def queued(self) -> int:
        cat = Catalogue(self.config.spool_dir)
        try:
            return len(Queue(cat).messages())
        finally:
            cat.close()


def fill(dovecot, user: str, messages: list[bytes], folder: str = "INBOX") -> None:
    dovecot.save_many(user, messages, folder)


@pytest.fixture
def fs(tmp_path):
    s = FetchSite(tmp_path)
    yield s
    s.site.stop()


# ---------------------------------------------------------------- single-drop


@pytest.mark.parametrize("tls", ["starttls", "imaps", "off"])
def test_single_drop_delete_fetches_every_message_once_and_empties_the_mailbox(fs, isp, tls):
    msgs = [message(i) for i in range(5)]
    fill(isp, "office", msgs)
    port = {"starttls": isp.imap_port, "imaps": isp.imaps_port, "off": isp.imap_port}[tls]
    fs.configure(fs.account("isp", port, "office", tls=tls, ca_file=str(isp.cert), deliver_to="alice"))
    result = fs.fetch()
    assert result.errors == []
    assert result.fetched == 5 and result.deleted == 5 and result.complete
    assert sorted(fs.mail("alice")) == sorted(msgs)
    assert isp.message_count("office") == 0
    again = fs.fetch()
    assert again.fetched == 0 and again.errors == []
    assert len(fs.mail("alice")) == 5


def test_certificate_is_verified(fs, isp):
    fill(isp, "office", [message(1)])
    fs.configure(fs.account("isp", isp.imap_port, "office", tls="starttls", deliver_to="alice"))
    result = fs.fetch()  # the test CA is not given: the self-signed certificate must be refused
    assert result.fetched == 0 and "TLS" in result.errors[0]
    assert isp.message_count("office") == 1


def test_wrong_password_is_an_account_error_not_an_exception(fs, isp):
    fill(isp, "office", [message(1)])
    fs.pwfile.write_text("not-the-isp-password-3\n")
    fs.configure(fs.account("isp", isp.imap_port, "office", deliver_to="alice"))
    result = fs.fetch()
    assert result.fetched == 0 and "login refused" in result.errors[0]


def test_keep_leaves_mail_on_server_and_fetches_only_new_uids(fs, isp):
    fill(isp, "office", [message(i) for i in range(3)])
    fs.configure(fs.account("isp", isp.imaps_port, "office", tls="imaps", ca_file=str(isp.cert),
                            deliver_to="bob", keep=True))
    assert fs.fetch().fetched == 3
    assert isp.message_count("office") == 3
    fill(isp, "office", [message(10)])
    result = fs.fetch()
    assert result.fetched == 1 and result.deleted == 0
    assert len(fs.mail("bob")) == 4
    assert isp.message_count("office") == 4


def test_keep_days_deletes_from_the_server_n_days_after_the_fetch(fs, isp):
    fill(isp, "office", [message(i) for i in range(3)])
    fs.configure(fs.account("isp", isp.imap_port, "office", deliver_to="alice", keep=True, keep_days=2))
    t0 = time.time()
    assert fs.fetch(clock=lambda: t0).fetched == 3
    fill(isp, "office", [message(3)])
    day1 = fs.fetch(clock=lambda: t0 + 86400)
    assert day1.fetched == 1 and day1.deleted == 0 and isp.message_count("office") == 4
    day3 = fs.fetch(clock=lambda: t0 + 3 * 86400 - 60)  # the first three are 3 days old, the fourth 2
    assert day3.fetched == 0 and day3.deleted == 3
    assert isp.message_count("office") == 1
    day4 = fs.fetch(clock=lambda: t0 + 4 * 86400)
    assert day4.deleted == 1 and isp.message_count("office") == 0
    assert len(fs.mail("alice")) == 4


def test_several_folders(fs, isp):
    fill(isp, "office", [message(1)])
    fill(isp, "office", [message(2), message(3)], folder="Lists")
    fs.configure(fs.account("isp", isp.imap_port, "office", deliver_to="alice", folders=["INBOX", "Lists"]))
    assert fs.fetch().fetched == 3
    assert isp.message_count("office", "Lists") == 0 and isp.message_count("office") == 0


def test_a_missing_folder_is_an_error_but_the_others_are_fetched(fs, isp):
    fill(isp, "office", [message(1)])
    fs.configure(fs.account("isp", isp.imap_port, "office", deliver_to="alice", folders=["Nope", "INBOX"]))
    result = fs.fetch()
    assert result.fetched == 1 and not result.complete
    assert result.errors[0].startswith("isp: Nope: server said")


def test_two_fetches_of_one_account_never_run_at_once(fs, isp):
    fill(isp, "office", [message(i) for i in range(3)])
    fs.configure(fs.account("isp", isp.imap_port, "office", deliver_to="alice"))
    with AccountLock(fs.config.spool_dir, "isp"):  # as another process fetching this account would
        blocked = fs.site.cli("fetch")
        assert blocked.returncode == 75 and b"being fetched" in blocked.stdout
        assert isp.message_count("office") == 3 and fs.mail("alice") == []
    assert fs.fetch().fetched == 3


# ---------------------------------------------------------------- multidrop


def test_multidrop_routes_by_delivered_to_and_sends_the_unknown_to_review(fs, isp):
    list_id = "<list-1@lists.test>"
    copies = [
        message(1, headers="Delivered-To: alice@office.test\r\n"),
        message(2, headers="Delivered-To: bob@office.test\r\nDelivered-To: old@elsewhere.test\r\n"),
        # a list message: one copy per local subscriber, To: names only the list
        message(3, headers="Delivered-To: alice@office.test\r\n", msgid=list_id),
        message(3, headers="Delivered-To: carol@office.test\r\n", msgid=list_id),
        message(3, headers="Delivered-To: alice@office.test\r\nX-Dup: again\r\n", msgid=list_id),
        # Bcc: To/Cc do not name carol at all
        message(4, headers="Delivered-To: carol@office.test\r\nCc: alice@office.test\r\n"),
        message(5, headers="Delivered-To: nobody@office.test\r\n"),
        message(6),  # no envelope header at all
        message(7, headers="Delivered-To: BOB@isp-hosted.test\r\n"),
    ]
    fill(isp, "office", copies)
    fs.configure(fs.account("isp", isp.imap_port, "office", mode="multidrop", envelope_header="Delivered-To",
                            domains=["isp-hosted.test"]))
    result = fs.fetch()
    assert result.errors == []
    assert result.fetched == 8 and result.duplicates == 1 and result.review == 2
    subjects = {u: sorted(m.split(b"Subject: ")[1].split(b"\r\n")[0].decode() for m in fs.mail(u))
                for u in ("alice", "bob", "carol", "postmaster")}
    assert subjects == {"alice": ["message 1", "message 3"], "bob": ["message 2", "message 7"],
                        "carol": ["message 3", "message 4"], "postmaster": ["message 5", "message 6"]}
    review = [m for m in fs.site.mail_of("postmaster")]
    assert all(b"X-Dialmail-Review: " in m for m in review)
    assert isp.message_count("office") == 0


def test_same_recipient_and_message_id_is_never_delivered_twice_across_sessions(fs, isp):
    fs.configure(fs.account("isp", isp.imap_port, "office", mode="multidrop", envelope_header="X-Original-To"))
    fill(isp, "office", [message(1, headers="X-Original-To: alice@office.test\r\n", msgid="<same@x.test>")])
    assert fs.fetch().fetched == 1
    fill(isp, "office", [message(1, headers="X-Original-To: alice@office.test\r\nX-Resent: 1\r\n",
                                 msgid="<same@x.test>"),
                         message(1, headers="X-Original-To: bob@office.test\r\n", msgid="<same@x.test>")])
    result = fs.fetch()
    assert result.fetched == 1 and result.duplicates == 1
    assert len(fs.mail("alice")) == 1 and len(fs.mail("bob")) == 1
    assert isp.message_count("office") == 0


def test_a_different_message_reusing_a_message_id_is_still_delivered(fs, isp):
    """Broken senders reuse Message-IDs: only a copy that also agrees on From, Date and Subject is a duplicate."""
    fs.configure(fs.account("isp", isp.imap_port, "office", mode="multidrop", envelope_header="X-Original-To"))
    fill(isp, "office", [message(1, headers="X-Original-To: alice@office.test\r\n", msgid="<reused@x.test>",
                                 subject="first")])
    assert fs.fetch().fetched == 1
    fill(isp, "office", [message(2, headers="X-Original-To: alice@office.test\r\n", msgid="<reused@x.test>",
                                 subject="second, a different message")])
    result = fs.fetch()
    assert result.fetched == 1 and result.duplicates == 0
    assert len(fs.mail("alice")) == 2


def test_multidrop_received_for_clause_with_skip(fs, isp):
    own = "Received: from mx.isp.test by store.isp.test with LMTP for <bob@office.test>; Wed, 25 Nov 2026\r\n"
    filt = "Received: from filter by store.isp.test; Wed, 25 Nov 2026\r\n"
    fill(isp, "office", [message(1, headers=filt + own)])
    fs.configure(fs.account("isp", isp.imap_port, "office", mode="multidrop", envelope_header="Received",
                            envelope_skip=1))
    assert fs.fetch().fetched == 1
    assert len(fs.mail("bob")) == 1


# ---------------------------------------------------------------- UIDVALIDITY


@pytest.mark.parametrize("renumber", [True, False])
def test_uidvalidity_change_fetches_nothing_twice(fs, isp, renumber):
    fill(isp, "office", [message(i) for i in range(4)])
    fs.configure(fs.account("isp", isp.imap_port, "office", deliver_to="carol", keep=True))
    assert fs.fetch().fetched == 4
    old = isp.uidvalidity("office")
    assert isp.reset_uidvalidity("office", renumber=renumber) != old
    fill(isp, "office", [message(9)])
    result = fs.fetch()
    assert result.errors == []
    assert result.fetched == 1 and result.duplicates == 4
    assert len(fs.mail("carol")) == 5
    assert fs.fetch().fetched == 0


# ---------------------------------------------------------------- size policy, order, caps


def test_small_messages_come_first_and_caps_leave_the_rest_for_the_next_session(fs, isp):
    big = message(0, size=300_000)
    small = [message(i, size=1000 + i) for i in range(1, 6)]
    fill(isp, "office", [big] + small)
    fs.configure(fs.account("isp", isp.imap_port, "office", deliver_to="alice", max_messages=3,
                            chunk_size="64KB"))
    events = []
    first = fs.fetch(progress=events.append)
    assert first.fetched == 3 and first.deferred == 3 and not first.complete
    assert [e.size for e in events] == sorted(e.size for e in events) and max(e.size for e in events) < 2000
    second = fs.fetch(progress=events.append)
    assert second.fetched == 3 and second.complete
    pieces = [e for e in events if e.partial]
    assert len(pieces) == 5 and pieces[-1].done_bytes == len(big)
    assert sorted(fs.mail("alice")) == sorted([big] + small)


def test_max_bytes_cap(fs, isp):
    fill(isp, "office", [message(i, size=10_000) for i in range(10)])
    fs.configure(fs.account("isp", isp.imap_port, "office", deliver_to="alice", max_bytes="35KB"))
    assert fs.fetch().fetched == 3
    assert fs.fetch().fetched == 3
    assert isp.message_count("office") == 4


def _window_around(now: float, inside: bool) -> str:
    lt = time.localtime(now)
    m = lt.tm_hour * 60 + lt.tm_min
    start = (m - 30) % 1440 if inside else (m + 60) % 1440
    end = (start + 120) % 1440
    return f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"


@pytest.mark.parametrize("policy", ["leave", "delete", "defer"])
def test_oversize_policy_always_notifies(fs, isp, policy):
    big = message(1, size=150_000, subject="the big one")
    fill(isp, "office", [big, message(2)])
    now = time.time()
    opts = dict(deliver_to="bob", max_message_size="100KB", oversize=policy)
    if policy == "defer":
        opts["offpeak"] = _window_around(now, inside=False)
    fs.configure(fs.account("isp", isp.imap_port, "office", **opts))
    result = fs.fetch(clock=lambda: now)
    assert result.fetched == 1 and result.oversize == 1 and result.notices == 1
    mail = fs.mail("bob")
    notice = [m for m in mail if b"MAILER-DAEMON" in m]
    assert len(notice) == 1 and b"the big one" in notice[0] and str(len(big)).encode() in notice[0]
    assert isp.message_count("office") == (0 if policy == "delete" else 1)
    again = fs.fetch(clock=lambda: now + 60)  # no second notice for the same copy
    assert again.notices == 0 and again.fetched == 0
    if policy == "defer":
        fs.configure(fs.account("isp", isp.imap_port, "office", **{**opts, "offpeak": _window_around(now, True)}))
        night = fs.fetch(clock=lambda: now)
        assert night.fetched == 1
        assert big in fs.mail("bob")
        assert isp.message_count("office") == 0


# ---------------------------------------------------------------- a cut line


class CuttingProxy:
    """TCP proxy on 127.0.0.1 that drops the connection after ``limit`` bytes from the server."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.limit: int | None = None
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _client(self, reader, writer):
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        limit = self.limit

        async def pipe(src, dst, counted):
            sent = 0
            try:
                while data := await src.read(65536):
                    if counted and limit is not None and sent + len(data) >= limit:
                        dst.write(data[:max(0, limit - sent)])
                        await dst.drain()
                        break
                    sent += len(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            for w in (writer, up_w):
                w.transport.abort()

        await asyncio.gather(pipe(up_r, writer, True), pipe(reader, up_w, False))

    def close(self):
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.mark.timeout(240)
def test_connection_cut_mid_fetch_loses_nothing_and_duplicates_nothing(fs, isp):
    rnd = random.Random(6)
    msgs = [message(i, size=rnd.choice([500, 3000, 20_000, 90_000])) for i in range(30)]
    msgs.append(message(99, size=400_000))
    fill(isp, "office", msgs)
    proxy = CuttingProxy(isp.imap_port)
    try:
        fs.configure(fs.account("isp", proxy.port, "office", deliver_to="alice", batch_size=5,
                                chunk_size="64KB"))
        total = len(msgs)
        runs = cuts = 0
        limit = 400
        while True:
            proxy.limit = limit
            result = fs.fetch()
            runs += 1
            cuts += bool(result.errors)
            delivered = fs.mail("alice")
            on_server = isp.message_count("office")
            # nothing deleted on the server before it was in the spool, nothing twice
            assert len(delivered) == len(set(delivered))
            assert len(delivered) + on_server >= total, (limit, len(delivered), on_server)
            if on_server == 0 and not result.errors:
                break
            limit = int(limit * rnd.uniform(1.2, 1.9))
            if limit > 3_000_000:
                proxy.limit = None
            assert runs < 60
        assert cuts >= 5
        assert sorted(delivered) == sorted(msgs)
        assert fs.queued() == 0
    finally:
        proxy.close()


# ---------------------------------------------------------------- big and many


@pytest.mark.timeout(240)
def test_twenty_megabyte_message_is_fetched_in_pieces_with_flat_memory(fs, isp, capsys):
    big = message(1, size=20 * 1000 * 1000)
    isp.save("office", big)
    fs.configure(fs.account("isp", isp.imap_port, "office", deliver_to="alice"))
    rss = RssSampler()
    tracemalloc.start()
    try:
        t0 = time.monotonic()
        with rss:
            result = fs.fetch(deliver=False)
        elapsed = time.monotonic() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.fetched == 1 and result.bytes == len(big)
    with capsys.disabled():
        print(f"\n20 MB message: fetched in {elapsed:.2f}s, tracemalloc peak {peak / 1e6:.1f} MB, "
              f"RSS growth {rss.growth / 1e6:.1f} MB (chunk_size 1 MB)")
    # a whole-literal fetch needs ~3.3x the message (66 MB) in Python objects alone
    assert peak < 12 * 1000 * 1000, f"peak {peak} bytes: not flat"
    assert rss.growth < 40 * 1000 * 1000, f"RSS grew by {rss.growth} bytes"
    fs.fetch()
    assert fs.mail("alice") == [big]
    assert isp.message_count("office") == 0


@pytest.mark.timeout(300)
def test_thousand_small_messages_against_fetchmail(fs, isp, tmp_path, capsys):
    """Timing for the note (not asserted): dialmail and fetchmail on the same mailbox, same run."""
    msgs = [message(i, size=rnd_size) for i, rnd_size in
            enumerate(random.Random(1000).choices([600, 1500, 3000, 6000], k=1000))]
    fill(isp, "office", msgs)
    fs.configure(fs.account("isp", isp.imap_port, "office", deliver_to="alice", keep=True, batch_size=50))
    t0 = time.monotonic()
    result = fs.fetch(deliver=False)
    ours = time.monotonic() - t0
    assert result.fetched == 1000 and result.errors == []
    t0 = time.monotonic()
    fs.fetch()  # local delivery of what was fetched (nothing new on the server)
    delivery = time.monotonic() - t0
    assert len(fs.mail("alice")) == 1000
    line = f"dialmail {ours:.2f}s (fetch into the spool, fsynced; +{delivery:.2f}s local delivery to Maildir)"
    if have("fetchmail"):
        # fetchall keep, each message piped to an MDA that discards it: fetchmail's fastest path
        rc = (f"set no syslog\npoll 127.0.0.1 with proto IMAP port {isp.imap_port}\n"
              f'  user "office" there with password "{ISP_PASSWORD}" is "alice@office.test" here\n'
              f"  options keep fetchall no sslcertck sslproto '' mda 'cat >/dev/null'\n")
        t0 = time.monotonic()
        proc = run_fetchmail(rc, tmp_path / "fetchmail", timeout=240, verbose=False)
        theirs = time.monotonic() - t0
        assert proc.returncode == 0, proc.stderr[-2000:]
        line += f"; fetchmail (fetchall keep, mda 'cat >/dev/null') {theirs:.2f}s; " \
                f"fetchmail/dialmail {theirs / ours:.2f}"
    with capsys.disabled():
        print(f"\n1000 small messages ({sum(map(len, msgs))} bytes) from Dovecot on loopback: {line}")


# ---------------------------------------------------------------- the command


def test_dialmail_fetch_command_prints_a_line_per_account_and_delivers(fs, isp):
    isp.add_user("other", ISP_PASSWORD)
    fill(isp, "office", [message(1), message(2)])
    fill(isp, "other", [message(3)])
    fs.configure(fs.account("office", isp.imap_port, "office", deliver_to="alice"),
                 fs.account("other", isp.imap_port, "other", deliver_to="bob"))
    only = fs.site.cli("fetch", "--account", "other")
    assert only.returncode == 0, only.stderr
    assert only.stdout.decode().splitlines()[0].startswith("other: 1 fetched")
    assert len(fs.mail("bob")) == 1 and fs.mail("alice") == []
    both = fs.site.cli("fetch")
    lines = both.stdout.decode().splitlines()
    assert [line.split(":")[0] for line in lines] == ["office", "other"]
    assert lines[0].startswith("office: 2 fetched") and lines[1].startswith("other: 0 fetched")
    assert len(fs.mail("alice")) == 2
    assert fs.site.cli("fetch", "--account", "nope").returncode == 64
    isp.remove_user("other")
    failed = fs.site.cli("fetch")
    assert failed.returncode == 75 and "other: 0 fetched" in failed.stdout.decode()


def test_switching_keep_off_deletes_the_copies_kept_so_far(fs, isp):
    fill(isp, "office", [message(i) for i in range(3)])
    fs.configure(fs.account("isp", isp.imap_port, "office", deliver_to="alice", keep=True))
    assert fs.fetch().fetched == 3 and isp.message_count("office") == 3
    fs.configure(fs.account("isp", isp.imap_port, "office", deliver_to="alice", keep=False))
    result = fs.fetch()
    assert result.fetched == 0 and result.deleted == 3 and isp.message_count("office") == 0
    assert len(fs.mail("alice")) == 3


def test_stop_event_ends_the_session_between_messages_and_the_next_one_continues(fs, isp):
    msgs = [message(i) for i in range(40)]
    fill(isp, "office", msgs)
    fs.configure(fs.account("isp", isp.imap_port, "office", deliver_to="alice", batch_size=5))

    async def run():
        stop = asyncio.Event()
        seen = []

        def progress(event):
            seen.append(event)
            if len(seen) == 3:
                stop.set()

        return await _fetch_async(fs, progress=progress, stop_event=stop)

    first = asyncio.run(run())
    assert 3 <= first.fetched < 40 and first.errors == [] and not first.complete
    assert isp.message_count("office") == 40 - first.fetched
    second = fs.fetch()
    assert second.fetched == 40 - first.fetched and second.complete
    assert sorted(fs.mail("alice")) == sorted(msgs)


async def _fetch_async(fs, **kw):
    cfg = fs.config
    cat = Catalogue(cfg.spool_dir)
    try:
        return await fetch_all(cfg, Queue(cat), cat, Directory(cfg, Users(cfg.spool_dir)), **kw)
    finally:
        cat.close()


def test_single_drop_to_a_user_that_does_not_exist_goes_to_review(fs, isp):
    fill(isp, "office", [message(1)])
    fs.configure(fs.account("isp", isp.imap_port, "office", deliver_to="zed"))
    result = fs.fetch()
    assert result.fetched == 1 and result.review == 1
    assert b"X-Dialmail-Review: deliver_to zed@office.test is nobody here" in fs.site.mail_of("postmaster")[0]


def test_without_uidplus_the_folder_is_expunged_once_at_the_end(fs, isp, monkeypatch):
    from imapclient import IMAPClient
    real = IMAPClient.has_capability
    monkeypatch.setattr(IMAPClient, "has_capability",
                        lambda self, cap: False if cap.upper() == "UIDPLUS" else real(self, cap))
    fill(isp, "office", [message(i) for i in range(7)])
    fs.configure(fs.account("isp", isp.imap_port, "office", deliver_to="alice", batch_size=3))
    result = fs.fetch()
    assert result.fetched == 7 and result.deleted == 7 and isp.message_count("office") == 0
    assert len(fs.mail("alice")) == 7


def test_cut_in_a_big_message_resumes_where_it_stopped(fs, isp):
    big = message(1, size=2_000_000)
    fill(isp, "office", [big])
    proxy = CuttingProxy(isp.imap_port)
    try:
        fs.configure(fs.account("isp", proxy.port, "office", deliver_to="alice", chunk_size="64KB"))
        proxy.limit = 1_200_000
        first = fs.fetch()
        assert first.fetched == 0 and "connection lost" in first.errors[0]
        partial_dir = fs.config.spool_dir / "fetch-partial"
        kept = sum(p.stat().st_size for p in partial_dir.iterdir())
        assert 1_000_000 < kept < 1_200_000
        proxy.limit = None
        events = []
        second = fs.fetch(progress=events.append)
        assert second.fetched == 1 and second.errors == []
        assert events[0].partial and events[0].done_bytes == kept + 64_000  # the first piece asked for (64KB = 64000)
        assert fs.mail("alice") == [big]
        assert list(partial_dir.iterdir()) == [] and isp.message_count("office") == 0
    finally:
        proxy.close()


def test_partial_download_of_a_message_gone_from_the_server_is_dropped(fs, isp):
    fill(isp, "office", [message(1, size=500_000)])
    proxy = CuttingProxy(isp.imap_port)
    try:
        fs.configure(fs.account("isp", proxy.port, "office", deliver_to="alice", chunk_size="64KB"))
        proxy.limit = 300_000
        assert fs.fetch().errors
        partial_dir = fs.config.spool_dir / "fetch-partial"
        assert len(list(partial_dir.iterdir())) == 1
        isp.doveadm("expunge", "-u", "office", "mailbox", "INBOX", "all")
        proxy.limit = None
        assert fs.fetch().errors == []
        assert list(partial_dir.iterdir()) == []
    finally:
        proxy.close()


def test_mail_deleted_at_the_isp_but_not_expunged_is_not_fetched(fs, isp):
    msgs = [message(i) for i in range(3)]
    fill(isp, "office", msgs)
    isp.set_flags("office", [isp.list_uids("office")[1]], ["\\Deleted"])
    fs.configure(fs.account("isp", isp.imap_port, "office", deliver_to="alice", keep=True))
    assert fs.fetch().fetched == 2
    assert sorted(fs.mail("alice")) == sorted([msgs[0], msgs[2]])
