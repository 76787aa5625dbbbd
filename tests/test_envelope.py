"""Multidrop envelope extraction, in memory: which header, which copy of it, never To/Cc unless asked."""
import pytest

from gateway.fetch.envelope import (
    Envelope,
    envelope_recipients,
    header_block,
    headers,
    message_digest,
    message_id,
    received_for,
    return_path,
)

LIST_MAIL = (b"Return-Path: <list-bounces@lists.test>\r\n"
             b"Delivered-To: carol@office.test\r\n"
             b"Received: from mx.isp.test by store.isp.test with LMTP\r\n"
             b"\tid 42 for <carol@office.test>; Wed, 25 Nov 2026 09:00:00 +0000\r\n"
             b"Received: from lists.test by mx.isp.test for <team@lists.test>; Wed, 25 Nov 2026 08:59:00 +0000\r\n"
             b"Delivered-To: team@lists.test\r\n"
             b"From: Dave <dave@outside.test>\r\n"
             b"To: team@lists.test\r\n"
             b"Cc: alice@office.test, \"Bob B.\" <bob@office.test>\r\n"
             b"Subject: minutes\r\n"
             b"Message-ID: <abc@outside.test>\r\n"
             b"\r\n"
             b"Delivered-To: body@not.a.header\r\n")


def test_header_block_stops_at_the_empty_line_and_unfolds():
    block = header_block(LIST_MAIL)
    assert block.endswith(b"Message-ID: <abc@outside.test>")
    names = [n for n, _ in headers(block)]
    assert names.count("received") == 2 and "body" not in " ".join(v for _, v in headers(block))
    assert dict(headers(block))["received"].endswith("+0000")  # the folded line joined


def test_topmost_delivered_to_is_the_isps():
    assert envelope_recipients(header_block(LIST_MAIL), "Delivered-To") == \
        Envelope(("carol@office.test",), "Delivered-To[0]")


def test_skip_count_passes_over_headers_added_after_delivery():
    assert envelope_recipients(header_block(LIST_MAIL), "Delivered-To", skip=1).recipients == ("team@lists.test",)
    assert envelope_recipients(header_block(LIST_MAIL), "Delivered-To", skip=2) is None


def test_received_for_clause_of_the_chosen_received_line():
    block = header_block(LIST_MAIL)
    assert envelope_recipients(block, "Received").recipients == ("carol@office.test",)
    assert envelope_recipients(block, "Received", skip=1).recipients == ("team@lists.test",)


@pytest.mark.parametrize("line, addr", [
    ("from a by b with ESMTP id X for <Alice@Office.Test>; Wed, 25 Nov 2026", "Alice@Office.Test"),
    ("from a by b for alice@office.test; Wed, 25 Nov 2026", "alice@office.test"),
    ("from a by b with SMTP id 7; Wed, 25 Nov 2026", None),
    ("from a (for relay) by b; Wed, 25 Nov 2026", None),
    ("from a by b (envelope-from <x@y.test>) for <z@office.test>", "z@office.test"),
])
def test_received_for_parsing(line, addr):
    assert received_for(line) == addr


def test_to_cc_are_never_read_unless_guessing_is_enabled():
    block = b"From: x@outside.test\r\nTo: team@lists.test\r\nCc: alice@office.test\r\n"
    assert envelope_recipients(block, "Delivered-To") is None
    assert envelope_recipients(block, None) is None
    guess = envelope_recipients(block, "Delivered-To", guess=True)
    assert guess.recipients == ("team@lists.test", "alice@office.test") and guess.source == "To/Cc guess"


def test_the_envelope_header_wins_over_guessing():
    assert envelope_recipients(header_block(LIST_MAIL), "Delivered-To", guess=True).source == "Delivered-To[0]"


def test_envelope_header_with_several_addresses():
    block = b"Envelope-To: alice@office.test, bob@office.test\r\nX-Envelope-To: <carol@office.test>\r\n"
    assert envelope_recipients(block, "Envelope-To").recipients == ("alice@office.test", "bob@office.test")
    assert envelope_recipients(block, "x-envelope-to").recipients == ("carol@office.test",)


def test_header_without_an_address_gives_nothing():
    assert envelope_recipients(b"Delivered-To: \r\n", "Delivered-To") is None
    assert envelope_recipients(b"Delivered-To: undisclosed\r\n", "Delivered-To") is None


@pytest.mark.parametrize("value, sender", [
    ("<list-bounces@lists.test>", "list-bounces@lists.test"),
    ("<>", ""),
    ("<MAILER-DAEMON>", ""),
    ("plain@x.test", "plain@x.test"),
])
def test_return_path(value, sender):
    assert return_path(f"Return-Path: {value}\r\n".encode()) == sender


def test_no_return_path_is_the_null_sender():
    assert return_path(b"From: someone@x.test\r\n") == ""


def test_message_id_and_digest():
    block = header_block(LIST_MAIL)
    assert message_id(block) == "<abc@outside.test>"
    assert message_id(b"Subject: x\r\n") is None
    # the same copy gives the same digest from the whole message or from BODY[HEADER] (with its empty line)
    whole = message_digest(header_block(LIST_MAIL), len(LIST_MAIL))
    assert whole == message_digest(header_block(block + b"\r\n\r\n"), len(LIST_MAIL))
    assert whole != message_digest(block, len(LIST_MAIL) + 1)
    other = LIST_MAIL.replace(b"carol@office.test\r\nReceived", b"alice@office.test\r\nReceived")
    assert whole != message_digest(header_block(other), len(other))


def test_bare_lf_messages():
    msg = b"Delivered-To: alice@office.test\nSubject: x\n\nDelivered-To: no@x.test\n"
    assert envelope_recipients(header_block(msg), "Delivered-To").recipients == ("alice@office.test",)
