"""Flushing the outbound queue to real smarthosts: smtp-sink and Postfix on 127.0.0.1."""
from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

import pytest
from flufl.bounce import scan_message

from gateway import config as config_mod
from gateway.delivery.worker import LocalDelivery
from gateway.mail import outcome
from gateway.office.directory import Directory
from gateway.relay.flush import flush
from spool.queue import BOUNCED, DEFERRED, DELIVERED, LOCAL, RELAY, Catalogue, Queue
from spool.users import Users
from tests.harness import wait_for
from tests.peers import free_port, need, run_swaks

pytestmark = pytest.mark.peer


# ---------------------------------------------------------------- a dialmail spool without the daemon


class Office:
    """Config, queue, users and local delivery of one office, driven directly.

    One SMTP connection unless ``smarthost`` says otherwise: the tests built on it follow
    messages one after another (what a stop, a 421 or a hold does to the next one); what
    changes with more connections is in tests/test_relay_connections.py.
    """

    def __init__(self, tmp: Path, port: int = 25, *, starttls: str = "off", smarthost: str = "",
                 extra: str = "", route: str = "smarthost", timeout: float = 20, server: str = ""):
        one = "" if "connections" in smarthost else "connections = 1"
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.path = self.tmp / "dialmail.toml"
        self.path.write_text(f"""
[server]
hostname = "mail.office.test"
domains = ["office.test"]
spool_dir = "{self.tmp / 'spool'}"
{server}

[smarthost]
host = "127.0.0.1"
port = {port}
starttls = "{starttls}"
timeout = {timeout}
route = "{route}"
{one}
{smarthost}

[queue]
retry_min = "5m"
retry_max = "4h"
queue_lifetime = "4d"
delay_warning = "4h"
{extra}
""")
        self.cfg = config_mod.load(self.path)
        self.queue = Queue(Catalogue(self.cfg.spool_dir))
        self.users = Users(self.cfg.spool_dir)
        for name in ("alice", "bob"):
            self.users.add(name, f"{name}-pw")
        self.delivery = LocalDelivery(self.cfg, self.queue, Directory(self.cfg, self.users))

    def send(self, sender: str, rcpts: list[str], data: bytes, **kw) -> str:
        routes = [(r, LOCAL if r.endswith("@office.test") else RELAY) for r in rcpts]
        kw.setdefault("client", "127.0.0.1")  # a LAN client, as the SMTP server records it
        return self.queue.enqueue(sender, routes, data, origin="smtp", **kw)

    def flush(self, **kw):
        return asyncio.run(flush(self.cfg, self.queue, **kw))

    def deliver_local(self) -> None:
        while self.delivery.run_once():
            pass

    def mailbox(self, user: str) -> list[email.message.EmailMessage]:
        new = self.tmp / "spool" / "mail" / user / "new"
        files = sorted(new.iterdir()) if new.exists() else []
        return [email.message_from_bytes(p.read_bytes(), policy=email.policy.default) for p in files]

    def status(self, qid: str) -> dict[str, str]:
        m = self.queue.get(qid)
        return {r.rcpt: r.status for r in m.recipients} if m else {}


def message(subject: str, sender: str = "alice@office.test", to: str = "friend@example.com", body: str = "hello",
            extra_headers: str = "") -> bytes:
    return (f"From: Alice <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@office.test>\r\n{extra_headers}\r\n{body}\r\n").encode()


# ---------------------------------------------------------------- a TCP proxy that counts and cuts


class Proxy:
    """127.0.0.1 proxy in front of a server: counts connections and can cut the first one
    the moment the client's stream reaches ``cut_at`` (bytes before it still pass)."""

    def __init__(self, upstream_port: int, cut_at: bytes | None = None):
        self.upstream_port = upstream_port
        self.cut_at = cut_at
        self.connections = 0
        self.cuts = 0
        self.port = 0

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.connections += 1
        cut = self.cut_at if self.cuts == 0 else None
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def up() -> None:
            seen = b""
            while data := await cr.read(65536):
                if cut is not None:
                    seen += data
                    i = seen.find(cut)
                    if i >= 0:
                        self.cuts += 1
                        uw.write(data[:len(data) - (len(seen) - i)])
                        await uw.drain()
                        uw.transport.abort()
                        cw.transport.abort()
                        return
                uw.write(data)
                await uw.drain()
            uw.close()

        async def down() -> None:
            while data := await ur.read(65536):
                cw.write(data)
                await cw.drain()
            cw.close()

        await asyncio.gather(up(), down(), return_exceptions=True)


# ---------------------------------------------------------------- smtp-sink


def test_whole_queue_goes_over_one_reused_connection(office, smtp_sink):
    o = office(smtp_sink.port)
    ids = [o.send("alice@office.test", ["friend@example.com", "other@example.net"], message(f"m{i}"))
           for i in range(5)]

    async def run():
        async with Proxy(smtp_sink.port) as proxy:
            o.cfg = config_mod.loads(o.path.read_text().replace(f"port = {smtp_sink.port}", f"port = {proxy.port}"))
            seen = []
            result = await flush(o.cfg, o.queue, progress=seen.append)
            return proxy.connections, result, seen

    connections, result, seen = asyncio.run(run())
    assert connections == 1
    assert (result.sent, result.deferred, result.bounced, result.messages, result.error) == (10, 0, 0, 5, None)
    assert [p.qid for p in seen] == ids and seen[-1].total == result.bytes > 0
    assert [p.remaining for p in seen] == [4, 3, 2, 1, 0] and sum(p.size for p in seen) == result.bytes
    got = smtp_sink.wait_messages(5)
    assert sorted(m.message["Subject"] for m in got) == [f"m{i}" for i in range(5)]
    assert all(m.rcpts == ["friend@example.com", "other@example.net"] for m in got)
    assert all(m.helo == "mail.office.test" for m in got)
    assert o.queue.messages() == []


def test_sender_rewritten_on_the_way_out_but_not_on_the_lan(office, smtp_sink):
    o = office(smtp_sink.port, smarthost='[smarthost.rewrite]\n"@office.test" = "office@isp.example"\n'
                                        '"boss@office.test" = "boss@isp.example"\n')
    data = message("rewrite", extra_headers="Reply-To: boss@office.test\r\nSender: alice@office.test\r\n",
                   body="alice@office.test stays in the body")
    qid = o.send("alice@office.test", ["friend@example.com", "bob@office.test"], data)
    o.deliver_local()
    result = o.flush()
    assert result.sent == 1
    sent = smtp_sink.wait_messages(1)[0]
    assert sent.mail_from == "office@isp.example"
    assert sent.message["From"] == "Alice <office@isp.example>"
    assert sent.message["Reply-To"] == "boss@isp.example"
    assert sent.message["Sender"] == "office@isp.example"
    assert b"alice@office.test stays in the body" in sent.data
    local = o.mailbox("bob")[0]
    assert local["From"] == "Alice <alice@office.test>" and local["Return-Path"] == "<alice@office.test>"
    assert o.queue.get(qid) is None


def test_starttls_required_refuses_server_without_it(office, smtp_sink):
    o = office(smtp_sink.port, starttls="required")
    qid = o.send("alice@office.test", ["friend@example.com"], message("needs tls"))
    result = o.flush()
    assert result.error is not None and result.error.dsn == "4.7.4"
    assert "does not offer STARTTLS" in result.error.reason
    assert o.status(qid) == {"friend@example.com": DEFERRED}
    r = o.queue.get(qid).recipients[0]
    assert r.last_reply.startswith("4.7.4") and r.attempts == 0 and r.next_retry <= time.time()
    assert smtp_sink.messages() == []


def test_carrier_drop_mid_data_keeps_message_queued_then_delivers_exactly_once(office, smtp_sink):
    o = office(smtp_sink.port)
    first = o.send("alice@office.test", ["friend@example.com"], message("first"))
    big_body = "line of text\r\n" * 2000 + "CUT-HERE\r\n" + "more text\r\n" * 2000 + "END-OF-SECOND"
    second = o.send("alice@office.test", ["friend@example.com", "other@example.com"], message("second", body=big_body))
    clock = [time.time()]

    async def run(cut: bool):
        async with Proxy(smtp_sink.port, cut_at=b"CUT-HERE" if cut else None) as proxy:
            o.cfg = config_mod.loads(o.path.read_text().replace(f"port = {smtp_sink.port}", f"port = {proxy.port}"))
            result = await flush(o.cfg, o.queue, clock=lambda: clock[0])
            return result, proxy.cuts

    result, cuts = asyncio.run(run(cut=True))
    assert cuts == 1
    assert result.sent == 1 and result.deferred == 2
    assert result.error is not None and result.error.status == DEFERRED and result.error.dsn == "4.4.2"
    assert o.queue.get(first) is None
    waiting = o.queue.get(second)
    assert {r.status for r in waiting.recipients} == {DEFERRED}
    # a dropped line says nothing about the message: due again at once, for the session's retry
    assert all(r.next_retry == clock[0] for r in waiting.recipients)

    # cut again in the same message: now it backs off, so it cannot block the queue's head
    result, cuts = asyncio.run(run(cut=True))
    assert cuts == 1 and result.sent == 0 and result.deferred == 2
    assert all(r.next_retry >= clock[0] + 300 for r in o.queue.get(second).recipients)
    result, _ = asyncio.run(run(cut=False))
    assert result.sent == 0 and o.queue.get(second) is not None

    clock[0] += 601
    result, _ = asyncio.run(run(cut=False))
    assert (result.sent, result.deferred, result.error) == (2, 0, None)
    assert o.queue.get(second) is None
    msgs = smtp_sink.wait_messages(2)
    complete = [m for m in msgs if m.data.rstrip().endswith(b"END-OF-SECOND")]
    assert len(complete) == 1 and complete[0].rcpts == ["friend@example.com", "other@example.com"]
    assert sum(1 for m in msgs if m.message["Subject"] == "first") == 1


def test_stop_event_ends_flush_between_messages(office, smtp_sink):
    o = office(smtp_sink.port)
    ids = [o.send("alice@office.test", ["friend@example.com"], message(f"s{i}")) for i in range(4)]

    async def run():
        stop = asyncio.Event()
        return await flush(o.cfg, o.queue, stop_event=stop, progress=lambda p: stop.set())

    result = asyncio.run(run())
    assert result.sent == 1 and result.error is not None and result.error.status == DEFERRED
    assert o.queue.get(ids[0]) is None
    # the rest was never tried: still queued, due at once for the next session
    assert all(o.status(q) == {"friend@example.com": "queued"} for q in ids[1:])
    assert o.flush().sent == 3


def test_server_hanging_up_with_421_defers_that_message_and_leaves_the_rest(office, smtp_sink_factory):
    sink = smtp_sink_factory(disconnect_421=["mail"])
    o = office(sink.port)
    first = o.send("alice@office.test", ["friend@example.com"], message("first"))
    second = o.send("alice@office.test", ["friend@example.com"], message("second"))
    result = o.flush()
    assert result.results[0].outcome.code == 421 and result.results[0].outcome.status == DEFERRED
    assert len(result.results) == 1 and result.error is not None and "closed" in result.error.reason
    assert o.status(first) == {"friend@example.com": DEFERRED}
    assert o.status(second) == {"friend@example.com": "queued"}


@pytest.mark.timeout(60)
def test_reply_timeout_after_the_final_dot_defers(office, smtp_sink_factory):
    sink = smtp_sink_factory(delays={".": 5})
    o = office(sink.port, timeout=1)
    qid = o.send("alice@office.test", ["friend@example.com"], message("slow server"))
    result = o.flush()
    assert result.error is not None and result.error.status == DEFERRED and "timed out" in result.error.reason
    # the server may have the message (RFC 1047): deferred, never bounced, tried again next time
    assert o.status(qid) == {"friend@example.com": DEFERRED}
    assert o.queue.get(qid).recipients[0].next_retry <= time.time()


def test_hard_rejects_bounce_to_local_sender_at_once(office, smtp_sink_factory):
    sink = smtp_sink_factory(hard_reject=["rcpt"], hard_reply="550 5.1.1 no such user")
    o = office(sink.port)
    qid = o.send("alice@office.test", ["nobody@example.com"], message("to nobody"))
    events = []
    result = asyncio.run(flush(o.cfg, o.queue, on_local_mail=lambda: events.append(1)))
    assert result.bounced == 1 and result.local_notices == 1 and events == [1]
    assert o.queue.get(qid) is None
    [notice] = [m for m in o.queue.messages()]
    assert notice.sender == "" and notice.recipients[0].rcpt == "alice@office.test"
    assert notice.recipients[0].route == LOCAL
    o.deliver_local()
    [dsn] = o.mailbox("alice")
    assert dsn.get_content_type() == "multipart/report"
    assert scan_message(dsn) == {b"nobody@example.com"}
    assert "550 5.1.1 no such user" in dsn.as_string()


def test_soft_rejects_defer_with_back_off(office, smtp_sink_factory):
    sink = smtp_sink_factory(soft_reject=["rcpt"])
    o = office(sink.port)
    qid = o.send("alice@office.test", ["slow@example.com"], message("later"))
    start = time.time()
    clock = [start]
    delays = []
    for _ in range(4):
        result = asyncio.run(flush(o.cfg, o.queue, clock=lambda: clock[0]))
        assert result.deferred == 1 and result.bounced == 0
        r = o.queue.get(qid).recipients[0]
        delays.append(round(r.next_retry - clock[0]))
        clock[0] = r.next_retry
    assert delays == [300, 600, 1200, 2400]
    assert r.last_code == 450 and r.attempts == 4


# ---------------------------------------------------------------- real Postfix


def test_postfix_per_recipient_outcomes_and_single_bounce(office, postfix_smarthost):
    pf = postfix_smarthost
    o = office(pf.port)
    mixed = o.send("alice@office.test", ["ok1@example.com", "temp1@example.com", "bad1@example.com"],
                   message("mixed"))
    all_bad = o.send("alice@office.test", ["bad2@example.com"], message("all bad"))
    after = o.send("alice@office.test", ["ok2@example.com"], message("after the refusals"))
    now = time.time()
    result = o.flush(clock=lambda: now)
    by = {r.rcpt: r.outcome for r in result.results}
    assert by["ok1@example.com"].status == DELIVERED
    assert (by["temp1@example.com"].status, by["temp1@example.com"].code, by["temp1@example.com"].dsn) == \
        (DEFERRED, 450, "4.2.0")
    assert (by["bad1@example.com"].status, by["bad1@example.com"].dsn) == (BOUNCED, "5.1.1")
    assert by["bad2@example.com"].status == BOUNCED and by["ok2@example.com"].status == DELIVERED
    assert o.status(mixed) == {"ok1@example.com": DELIVERED, "temp1@example.com": DEFERRED,
                               "bad1@example.com": BOUNCED}
    assert o.queue.get(all_bad) is None and o.queue.get(after) is None

    # the sender hears about the bad recipients now, not when temp1 is finally done
    o.deliver_local()
    bounces = o.mailbox("alice")
    assert sorted(b for m in bounces for b in scan_message(m)) == [b"bad1@example.com", b"bad2@example.com"]

    pf.set_recipient_rules("")
    result = o.flush(clock=lambda: now + 301)
    assert [(r.rcpt, r.outcome.status) for r in result.results] == [("temp1@example.com", DELIVERED)]
    assert o.queue.get(mixed) is None
    o.deliver_local()
    assert len(o.mailbox("alice")) == 2  # no second bounce for bad1

    delivered = pf.wait_delivered(3)
    rcpts = sorted(d.original_to for d in pf.delivered())
    assert rcpts == ["ok1@example.com", "ok2@example.com", "temp1@example.com"]
    assert all(d.return_path == "alice@office.test" for d in delivered)


def test_postfix_size_limit_bounces_without_sending(office, postfix_smarthost):
    postfix_smarthost.set_params(message_size_limit=3000)
    o = office(postfix_smarthost.port)
    big = o.send("alice@office.test", ["friend@example.com"], message("big", body="x" * 70 + "\r\n" * 1 + "y" * 5000))
    small = o.send("alice@office.test", ["friend@example.com"], message("small"))
    result = o.flush()
    by = {r.qid: r.outcome for r in result.results}
    assert by[big].status == BOUNCED and by[big].dsn == "5.3.4" and "size limit 3000" in by[big].reason
    assert by[small].status == DELIVERED
    assert [d.message["Subject"] for d in postfix_smarthost.wait_delivered(1)] == ["small"]
    o.deliver_local()
    [dsn] = o.mailbox("alice")
    assert scan_message(dsn) == {b"friend@example.com"}
    assert "Status: 5.3.4" in dsn.as_string()


def test_postfix_without_smtputf8_bounces_utf8_recipient_with_reason(office, postfix_smarthost):
    o = office(postfix_smarthost.port)
    qid = o.send("alice@office.test", ["jörg@example.com", "plain@example.com"], message("umlaut"))
    result = o.flush()
    by = {r.rcpt: r.outcome for r in result.results}
    assert by["jörg@example.com"].status == BOUNCED and by["jörg@example.com"].dsn == "5.6.7"
    assert "SMTPUTF8" in by["jörg@example.com"].reason
    # only the address that needs SMTPUTF8 fails; the ASCII one goes without it
    assert by["plain@example.com"].status == DELIVERED
    assert o.queue.get(qid) is None
    o.deliver_local()
    [dsn] = o.mailbox("alice")
    assert "does not support it" in dsn.get_body(("plain",)).get_content()
    assert [d.original_to for d in postfix_smarthost.wait_delivered(1)] == ["plain@example.com"]


# ---------------------------------------------------------------- refusals of the office, not of a recipient


def _assert_kept_queued_with_reason(o: Office, qids: list[str], result, words: str) -> None:
    # the message that met the refusal waits with the server's words; the flush stopped
    # there, so the others were not even tried and wait as they were
    first, *rest = qids
    assert set(o.status(first).values()) == {DEFERRED}, o.status(first)
    assert all(words in (r.last_reply or "") and r.last_reply.startswith("4.")
               for r in o.queue.get(first).recipients)
    for qid in rest:
        assert all(r.status not in (BOUNCED, DELIVERED) and r.attempts == 0 for r in o.queue.get(qid).recipients)
    assert result.error is not None and words in result.error.reply
    o.deliver_local()
    assert o.mailbox("alice") == []  # nobody was told their mail failed


def test_postfix_non_fqdn_helo_refused_at_rcpt_defers_instead_of_bouncing(office, postfix_smarthost):
    """A default hostname of "localhost": Postfix's reject_non_fqdn_helo_hostname answers at
    RCPT (504 5.5.2 <localhost>: Helo command rejected).  That is about the office, so the
    mail waits with the reason instead of bouncing, earlier-deferred mail included."""
    pf = postfix_smarthost
    pf.set_params(smtpd_recipient_restrictions="reject_non_fqdn_helo_hostname, "
                  f"check_recipient_access regexp:{pf.etc}/recipient_access, permit_mynetworks, reject")
    o = office(pf.port)
    o.cfg = dataclasses.replace(o.cfg, server=dataclasses.replace(o.cfg.server, hostname="localhost"))
    first = o.send("alice@office.test", ["friend@example.com"], message("one"))
    second = o.send("alice@office.test", ["other@example.com", "third@example.com"], message("two"))
    result = o.flush()
    _assert_kept_queued_with_reason(o, [first, second], result, "Helo command rejected")
    assert "504" in result.error.reply and "[server] hostname" in result.error.reply
    assert pf.delivered() == []


@pytest.mark.parametrize("restriction,rule,words,at_mail", [
    ("smtpd_recipient_restrictions", "/./ 554 5.7.1 Relay access denied", "Relay access denied", False),
    ("smtpd_recipient_restrictions", "/./ 530 5.7.0 Authentication required", "Authentication required", False),
    # Postfix delays sender restrictions to RCPT by default; smtpd_delay_reject = no answers at MAIL
    ("smtpd_sender_restrictions", "/./ 553 5.7.1 not owned by user", "not owned by user", False),
    ("smtpd_sender_restrictions", "/./ 553 5.7.1 not owned by user", "not owned by user", True),
])
def test_postfix_refusing_the_office_defers_every_message(office, postfix_smarthost, restriction, rule, words,
                                                          at_mail):
    pf = postfix_smarthost
    table = pf.etc / "office_access"
    table.write_text(rule + "\n")
    check = "check_sender_access" if restriction == "smtpd_sender_restrictions" else "check_recipient_access"
    pf.set_params(**{restriction: f"{check} regexp:{table}, permit_mynetworks, reject"},
                  smtpd_delay_reject="no" if at_mail else "yes")
    o = office(pf.port)
    qids = [o.send("alice@office.test", [f"friend{i}@example.com"], message(f"m{i}")) for i in range(3)]
    result = o.flush()
    _assert_kept_queued_with_reason(o, qids, result, words)
    assert f"refused this office, not the recipient: {rule.split()[1]}" in result.error.reply
    pf.set_params(**{restriction: "permit_mynetworks, reject"})
    result = o.flush(clock=lambda: time.time() + 301)
    assert len(pf.wait_delivered(3)) == 3 and all(o.queue.get(q) is None for q in qids)


def test_recipient_refusals_still_bounce_with_client_words_nowhere_near():
    for code, text in ((550, "5.1.1 <x@example.com>: Recipient address rejected: User unknown"),
                       (504, "5.5.2 <x>: Recipient address rejected: need fully-qualified address"),
                       (550, "5.7.1 <x@example.com>: Recipient address rejected: Access denied"),
                       (552, "5.3.4 Message size exceeds fixed limit")):
        o = outcome.from_reply(code, text)
        assert not outcome.refuses_client(o, outcome.RCPT_STAGE), text
    assert not outcome.refuses_client(outcome.from_reply(552, "5.3.4 too big"), outcome.MAIL_STAGE)
    assert outcome.refuses_client(outcome.from_reply(550, "5.1.8 <x@y>: Sender address rejected: Domain not found"),
                                  outcome.MAIL_STAGE)


# ---------------------------------------------------------------- outcomes, without sockets


@pytest.mark.parametrize("code,text,status,dsn", [
    (250, "2.0.0 Ok: queued as X", DELIVERED, "2.0.0"),
    (450, "4.2.0 try later", DEFERRED, "4.2.0"),
    (451, "try again", DEFERRED, "4.0.0"),
    (550, "5.1.1 no such user", BOUNCED, "5.1.1"),
    (554, "4.1.1 mismatched class", BOUNCED, "5.0.0"),
    (421, "4.3.2 shutting down", DEFERRED, "4.3.2"),
])
def test_reply_classification(code, text, status, dsn):
    o = outcome.from_reply(code, text)
    assert (o.status, o.dsn) == (status, dsn)


def test_back_off_doubles_up_to_the_maximum():
    assert [outcome.retry_delay(n, 300, 3600) for n in range(6)] == [300, 600, 1200, 2400, 3600, 3600]


# ---------------------------------------------------------------- `dialmail queue flush` over a dialled link


@pytest.mark.timeout(120)
def test_cli_queue_flush_dials_the_link_and_only_sends(site, smtp_sink):
    route = free_port()
    site.write_config(f"""
        [smarthost]
        host = "127.0.0.1"
        port = {route}
        starttls = "off"

        [link]
        type = "sim"
        rate = 115200
        dial_delay = "0.5s"
        forward = ["127.0.0.1:{route}->127.0.0.1:{smtp_sink.port}"]
        """)
    q = Queue(Catalogue(site.spool))
    qid = q.enqueue("alice@office.test", [("friend@example.com", RELAY)], message("dialled"), origin="smtp")
    r = site.cli("queue", "flush", timeout=90)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    assert f"{qid} <friend@example.com> delivered: 250" in r.stdout.decode()
    assert [m.message["Subject"] for m in smtp_sink.wait_messages(1)] == ["dialled"]
    assert q.get(qid) is None
    # the link is down again: nothing listens on the ISP side's forwarded port any more
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", route), timeout=2).close()


def test_rewrite_map_full_address_wins_and_only_sender_headers_change():
    from gateway.relay.rewrite import SenderRewriter
    rw = SenderRewriter([("@office.test", "office@isp.example"), ("Boss@Office.test", "boss@isp.example")])
    assert rw.address("boss@OFFICE.TEST") == "boss@isp.example"
    assert rw.address("alice@office.test") == "office@isp.example"
    assert rw.address("alice@sub.office.test") == "alice@sub.office.test"
    assert rw.address("") == ""
    data = (b"From: \"Alice (alice@office.test)\" <alice@office.test>\r\n"
            b"Reply-To: boss@office.test,\r\n\tfriend@example.com\r\n"
            b"To: bob@office.test\r\nCc: alice@office.test\r\n\r\nFrom: alice@office.test in the body\r\n")
    out = rw.message(data)
    head, body = out.split(b"\r\n\r\n", 1)
    assert head.splitlines()[0] == b"From: \"Alice (office@isp.example)\" <office@isp.example>"
    assert b"Reply-To: boss@isp.example,\r\n\tfriend@example.com" in head
    assert b"To: bob@office.test\r\nCc: alice@office.test" in head
    assert body == b"From: alice@office.test in the body\r\n"
    plain = b"From: someone@example.com\r\n\r\nbody\r\n"
    assert rw.message(plain) is plain


@pytest.mark.timeout(120)
def test_daemon_session_bounce_reaches_the_local_sender(site, smtp_sink_factory):
    """SMTP in, dial session out through the simulated modem, 5xx at the ISP, bounce in alice's Maildir."""
    need("swaks")
    sink = smtp_sink_factory(hard_reject=["rcpt"], hard_reply="550 5.1.1 <nobody@example.com>: no such user")
    route = free_port()
    site.write_config(f"""
        [smarthost]
        host = "127.0.0.1"
        port = {route}
        starttls = "off"

        [link]
        type = "sim"
        rate = 115200
        dial_delay = "0.5s"
        forward = ["127.0.0.1:{route}->127.0.0.1:{sink.port}"]
        """)
    site.start()
    r = run_swaks(["--server", f"127.0.0.1:{site.smtp_port}", "--from", "alice@office.test",
                   "--to", "nobody@example.com", "--header", "Subject: into the void"])
    assert r.returncode == 0, r.stdout
    r = site.cli("connect-now", "--send-only", timeout=90)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    mail = wait_for(lambda: site.mail_of("alice"), timeout=30, what="the bounce in alice's Maildir")
    dsn = email.message_from_bytes(mail[0], policy=email.policy.default)
    assert dsn["Return-Path"] == "<>" and dsn.get_content_type() == "multipart/report"
    assert scan_message(dsn) == {b"nobody@example.com"}
    assert "Subject: into the void" in dsn.as_string()
    assert site.cli("queue", "list").stdout.decode().strip() == "queue is empty"


def test_claims_of_a_dead_flush_are_released(office, smtp_sink):
    o = office(smtp_sink.port)
    qid = o.send("alice@office.test", ["friend@example.com"], message("orphaned claim"))
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert o.queue.claim(RELAY, f"relay:{dead.pid}:dead", 10) == [(qid, "friend@example.com")]
    assert o.flush().sent == 1
    assert o.queue.get(qid) is None


def test_next_retry_drop_is_due_at_once_unless_it_repeats():
    drop = outcome.lost_connection("while sending message body")
    assert outcome.next_retry(drop, None, 0, 1000.0, 300, 3600) == 1000.0
    assert outcome.next_retry(drop, "4.2.0 try later", 3, 1000.0, 300, 3600) == 1000.0
    assert outcome.next_retry(drop, drop.reply, 1, 1000.0, 300, 3600) == 1600.0
    assert outcome.next_retry(outcome.from_reply(450, "4.2.0 try later"), None, 0, 1000.0, 300, 3600) == 1300.0


def test_a_message_held_or_deleted_during_a_flush_is_not_sent(office, smtp_sink):
    o = office(smtp_sink.port)
    first, held, deleted, last = (o.send("alice@office.test", ["friend@example.com"], message(f"m{i}"))
                                  for i in range(4))

    def admin_meanwhile(p) -> None:  # the administrator acts while the first message goes
        if p.qid == first:
            o.queue.set_hold(held, True)
            o.queue.remove(deleted)

    result = o.flush(progress=admin_meanwhile)
    assert result.sent == 2 and result.error is None
    assert sorted(m.message["Subject"] for m in smtp_sink.wait_messages(2)) == ["m0", "m3"]
    assert o.queue.get(held).hold and o.status(held) == {"friend@example.com": "queued"}
    assert o.queue.get(deleted) is None and o.queue.get(last) is None
    assert o.queue.claim_owners("") == []


def test_a_message_whose_file_is_gone_is_deferred_with_the_reason_and_expires(office, smtp_sink):
    o = office(smtp_sink.port)
    lost = o.send("alice@office.test", ["friend@example.com"], message("lost"))
    fine = o.send("alice@office.test", ["friend@example.com"], message("fine"))
    o.queue.body_path(lost).unlink()
    result = o.flush()
    assert result.sent == 1 and result.deferred == 1
    assert [m.message["Subject"] for m in smtp_sink.wait_messages(1)] == ["fine"]
    [r] = o.queue.get(lost).recipients
    assert r.status == DEFERRED and r.last_code is None and r.last_reply.startswith(f"4.3.0 the message file queue/msg/{lost} is missing")
    assert r.next_retry > time.time() and o.queue.get(fine) is None
    assert o.queue.claim_owners("") == []
    # Like any message, it expires: its sender hears of it, and it leaves the queue.
    result = o.flush(clock=lambda: time.time() + 5 * 86400)
    assert result.expired == 1 and o.queue.get(lost) is None
    o.deliver_local()
    [bounce] = o.mailbox("alice")
    assert "is missing from the spool" in bounce.as_string()
