"""Hostile mail at the ISP (hypothesis): bad encodings, missing headers, NUL bytes, bare CR
and LF, no header/body separator, huge header lines.  Whatever Dovecot holds is fetched
and then delivered or quarantined, each exactly once; none is dropped or left behind."""
from __future__ import annotations

import asyncio
import itertools
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import load
from gateway.delivery.worker import LocalDelivery
from gateway.fetch.imap import fetch_all
from gateway.office.directory import Directory
from spool.queue import Catalogue, Queue
from spool.users import Users
from tests.torture import budget

pytestmark = pytest.mark.peer

ISP_USER, ISP_PASS = "office", "isp-fuzz-secret"
_tokens = itertools.count()

header_line = st.sampled_from([
    b"Delivered-To: alice@office.test", b"Delivered-To: bob@office.test", b"Delivered-To: nobody@office.test",
    b"Delivered-To: <>", b"Delivered-To: alice@elsewhere.test", b"Delivered-To:", b"Delivered-To: \xff\xfe@office.test",
    b"From: =?utf-8?b?////?= <x@outside.test>", b"From: =?bogus?q?=ZZ?=", b"From:", b"From: \x00",
    b"Subject: =?utf-8?q?=C3=28=A0?=", b"Subject: \xc3\x28 latin-1 \xe9", b"Subject: " + b"long " * 300,
    # A Message-ID (with From, Date, Subject) seen before for the same recipient is a duplicate
    # by design, so every identifier here is this message's own.
    b"Message-ID: <@@TOKEN@@@outside.test>", b"Message-ID: <@@TOKEN@@", b"Message-ID: @@TOKEN@@ no brackets",
    b"Message-ID:", b"Message-Id: <@@TOKEN@@@x> <second@x>",
    b"Content-Type: multipart/mixed; boundary=", b"Content-Type: text/plain; charset=x-unknown",
    b"Content-Transfer-Encoding: base64", b"Content-Transfer-Encoding: quoted-printable",
    b"Date: yesterday", b"To: undisclosed-recipients:;", b" continuation without a header", b"NoColonHere",
    b"X-Nul: a\x00b", b"Received: from x by y; bogus", b":", b"\t"])
line_end = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\r\n", b"\n\r"])
body = st.one_of(st.binary(max_size=400), st.sampled_from([b"", b".", b".\r\n", b"\r\n.\r\n", b"\x00" * 50,
                                                           b"PGh0bWw+" * 20, b"=\r\n=ZZ=0", b"From x\r\n>From y"]))


@st.composite
def hostile(draw) -> tuple[str, bytes]:
    token = f"TOKEN-{os.getpid()}-{next(_tokens)}"
    lines = draw(st.lists(header_line, max_size=8))
    ends = draw(st.lists(line_end, min_size=len(lines) + 1, max_size=len(lines) + 1))
    head = b"".join(a + b for a, b in zip(lines, ends))
    sep = draw(st.sampled_from([b"\r\n", b"\n", b"", b"\r"]))
    head = head.replace(b"@@TOKEN@@", token.encode())
    return token, head + sep + token.encode() + b"\r\n" + draw(body)


def where_is(spool_dir, token: str) -> list[str]:
    out = []
    root = spool_dir / "mail"
    for path in root.rglob("*") if root.exists() else []:
        if path.is_file() and token.encode() in path.read_bytes():
            out.append(str(path.relative_to(root)))
    return out


@pytest.fixture
def isp_site(site, dovecot):
    dovecot.add_user(ISP_USER, ISP_PASS)
    site.write_config(site.fetch_account(dovecot.imap_port, ISP_USER, ISP_PASS, mode='"multidrop"',
                                         envelope_header='"Delivered-To"'))
    return site, dovecot


def fetch_and_deliver(site) -> None:
    cfg = load(site.config_path)
    cat = Catalogue(cfg.spool_dir)
    try:
        q = Queue(cat)
        directory = Directory(cfg, Users(cfg.spool_dir))
        result = asyncio.run(fetch_all(cfg, q, cat, directory))
        assert not result.errors, result.errors
        delivery = LocalDelivery(cfg, q, directory)
        while delivery.run_once():
            pass
        assert q.counts()["local"] == 0, q.counts()
    finally:
        cat.close()


def place_and_check(site, dovecot, messages: list[tuple[str, bytes]]) -> None:
    placed = []
    for token, data in messages:
        before = dovecot.message_count(ISP_USER)
        try:
            dovecot.save(ISP_USER, data)
        except Exception:
            continue  # the ISP would not take it either: it was never there to fetch
        if dovecot.message_count(ISP_USER) > before:
            placed.append(token)
    fetch_and_deliver(site)
    assert dovecot.message_count(ISP_USER) == 0, "left at the ISP"
    for token in placed:
        found = where_is(site.spool, token)
        assert found, f"{token} dropped"
        boxes = [path.split("/")[0] for path in found]
        # Several envelope recipients each get a copy; no mailbox gets two.
        assert len(boxes) == len(set(boxes)), f"{token} duplicated: {found}"


@settings(max_examples=budget.examples(12, 150), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(st.lists(hostile(), min_size=1, max_size=4))
def test_hostile_mail_from_the_isp_is_delivered_or_quarantined_never_dropped(isp_site, messages):
    site, dovecot = isp_site
    place_and_check(site, dovecot, messages)


def test_megabyte_header_line_nul_bytes_and_bare_cr(isp_site):
    site, dovecot = isp_site
    place_and_check(site, dovecot, [
        ("TOKEN-huge-header", b"Delivered-To: alice@office.test\r\nX-Huge: " + b"h" * 1_048_576
         + b"\r\nSubject: huge\r\n\r\nTOKEN-huge-header\r\n"),
        ("TOKEN-huge-line-body", b"Delivered-To: bob@office.test\r\n\r\nTOKEN-huge-line-body " + b"b" * 1_048_576),
        ("TOKEN-nul", b"Delivered-To: alice@office.test\r\nSubject: a\x00b\r\n\r\nTOKEN-nul\x00\x00\r\n"),
        ("TOKEN-bare-cr", b"Delivered-To: bob@office.test\rSubject: cr only\r\rTOKEN-bare-cr\r"),
        ("TOKEN-no-headers", b"TOKEN-no-headers just a body line\r\n"),
        ("TOKEN-nobody", b"Delivered-To: nobody@office.test\r\n\r\nTOKEN-nobody\r\n"),
    ])


def test_two_different_messages_with_the_same_headers_and_size_are_both_delivered(isp_site):
    """No Message-ID, no Received: headers and size alike, bodies not.  A new UID in the same
    UIDVALIDITY is a new message; taking the second for a copy of the first lost it."""
    site, dovecot = isp_site
    head = b"Delivered-To: alice@office.test\r\nSubject: alert\r\n\r\n"
    place_and_check(site, dovecot, [("TOKEN-twin-A", head + b"TOKEN-twin-A\r\n")])
    place_and_check(site, dovecot, [("TOKEN-twin-B", head + b"TOKEN-twin-B\r\n")])
