"""8-bit mail and a 7-bit smarthost (RFC 6152): Postfix's smtp-sink with and without 8BITMIME.

A smarthost that does not offer 8BITMIME never gets an octet over 127: the MIME parts that
hold 8-bit text go out quoted-printable, and a message that cannot be converted without
changing what it says waits in the queue with the reason.
"""
import email
import email.policy

import pytest

from gateway.relay.downgrade import CannotDowngrade, to_7bit
from spool.queue import DEFERRED
from tests.test_relay import message

UMLAUTS = "Grüße aus Köln, schöne Woche!"

TEXT_8BIT = (b"From: Alice <alice@office.test>\r\nTo: friend@example.com\r\nSubject: gruss\r\n"
             b"Message-ID: <gruss@office.test>\r\nMIME-Version: 1.0\r\n"
             b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
             + UMLAUTS.encode() + b"\r\nzweite Zeile\r\n")

ATTACHMENT = b"UEsDBBQAAAAIAAAAIQBkb2N1bWVudA==\r\n"
MIXED_8BIT = (b"From: Alice <alice@office.test>\r\nTo: friend@example.com\r\nSubject: mixed\r\n"
              b"Message-ID: <mixed@office.test>\r\nMIME-Version: 1.0\r\n"
              b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n'
              b"--XX\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
              + UMLAUTS.encode() + b"\r\n"
              b"--XX\r\nContent-Type: application/zip\r\nContent-Transfer-Encoding: base64\r\n\r\n"
              + ATTACHMENT +
              b"--XX--\r\n")


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def parsed(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def test_8bit_text_goes_quoted_printable_to_a_smarthost_without_8bitmime(office, smtp_sink_factory):
    sink = smtp_sink_factory(no_8bitmime=True)
    o = office(sink.port)
    o.send("alice@office.test", ["friend@example.com"], TEXT_8BIT)
    o.flush()
    got = sink.wait_messages(1)[0]
    assert got.data.isascii(), got.data
    assert "BODY=8BITMIME" not in got.mail_args.upper()
    head, _, body = got.data.partition(b"\n\n")
    assert head == lf(TEXT_8BIT.split(b"\r\n\r\n")[0]).replace(b"Content-Transfer-Encoding: 8bit",
                                                               b"Content-Transfer-Encoding: quoted-printable")
    assert body == b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln, sch=C3=B6ne Woche!\nzweite Zeile\n"
    assert parsed(got.data).get_content() == UMLAUTS + "\nzweite Zeile\n"


def test_only_the_8bit_part_of_a_multipart_is_converted(office, smtp_sink_factory):
    sink = smtp_sink_factory(no_8bitmime=True)
    o = office(sink.port)
    o.send("alice@office.test", ["friend@example.com"], MIXED_8BIT)
    o.flush()
    got = sink.wait_messages(1)[0]
    assert got.data.isascii(), got.data
    text, attachment = parsed(got.data).iter_parts()
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert text.get_content() == UMLAUTS
    assert lf(b"Content-Type: application/zip\r\nContent-Transfer-Encoding: base64\r\n\r\n" + ATTACHMENT) \
        in got.data


def test_8bit_without_mime_headers_is_labelled_and_converted(office, smtp_sink_factory):
    sink = smtp_sink_factory(no_8bitmime=True)
    o = office(sink.port)
    o.send("alice@office.test", ["friend@example.com"], message("plain", body=UMLAUTS))
    o.flush()
    got = sink.wait_messages(1)[0]
    assert got.data.isascii(), got.data
    m = parsed(got.data)
    assert m["MIME-Version"] == "1.0" and (m.get_content_type(), m.get_content_charset()) == ("text/plain", "utf-8")
    assert m.get_content() == UMLAUTS + "\n"


def test_8bit_in_the_header_waits_with_the_reason(office, smtp_sink_factory):
    # A raw 8-bit Subject cannot be made 7-bit without guessing its charset: the message
    # waits (the smarthost may offer 8BITMIME another day) and says why.
    sink = smtp_sink_factory(no_8bitmime=True)
    o = office(sink.port)
    qid = o.send("alice@office.test", ["friend@example.com"],
                 f"Subject: {UMLAUTS}\r\nTo: friend@example.com\r\n\r\nhi\r\n".encode())
    o.flush()
    assert o.status(qid) == {"friend@example.com": DEFERRED}
    rcpt = o.queue.get(qid).recipients[0]
    assert "4.6.3" in rcpt.last_reply and "8BITMIME" in rcpt.last_reply, rcpt
    assert sink.messages() == []


def test_a_smarthost_with_8bitmime_gets_the_message_as_it_is(office, smtp_sink):
    o = office(smtp_sink.port)
    o.send("alice@office.test", ["friend@example.com"], MIXED_8BIT)
    o.flush()
    got = smtp_sink.wait_messages(1)[0]
    assert got.data == lf(MIXED_8BIT)
    assert "BODY=8BITMIME" in got.mail_args.upper()


def test_conversion_rules_without_a_peer():
    ascii_mail = message("ascii")
    assert to_7bit(ascii_mail) is ascii_mail
    signed = (b"MIME-Version: 1.0\r\nContent-Type: multipart/signed; boundary=S; protocol=x\r\n\r\n"
              b"--S\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
              + UMLAUTS.encode() + b"\r\n--S\r\nContent-Type: application/x-sig\r\n\r\nSIG\r\n--S--\r\n")
    with pytest.raises(CannotDowngrade, match="signed or encrypted"):
        to_7bit(signed)
    latin1 = to_7bit(b"Subject: x\r\n\r\nK\xf6ln\r\n")
    assert b"Content-Type: text/plain; charset=\"unknown-8bit\"" in latin1 and b"K=F6ln" in latin1
    # quoted-printable gives back every octet: trailing blanks, long lines, CRLFs
    text = ("Grüße aus Köln! " * 20 + "\r\n").encode() * 3 + b"tab\there \r\nend"
    converted = to_7bit(b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text)
    assert converted.isascii() and max(len(line) for line in converted.split(b"\r\n")) <= 76
    assert email.message_from_bytes(converted).get_payload(decode=True) == text
    binary = to_7bit(b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Transfer-Encoding: binary\r\n\r\n\x00\xff\xfe")
    assert binary.endswith(b"Content-Transfer-Encoding: base64\r\n\r\nAP/+\r\n")


def test_a_postfix_that_hides_8bitmime_gets_only_7bit(office, postfix_smarthost):
    # A real Postfix told not to offer 8BITMIME (smtpd_discard_ehlo_keywords): what it
    # delivers is the converted message, readable as the original.
    postfix_smarthost.set_params(smtpd_discard_ehlo_keywords="8bitmime")
    o = office(postfix_smarthost.port)
    o.send("alice@office.test", ["friend@example.com"], MIXED_8BIT)
    o.flush()
    got = postfix_smarthost.wait_delivered(1)[0]
    body = got.raw.split(b"\n\n", 1)[1]
    assert body.isascii(), body
    text, _attachment = parsed(got.raw).iter_parts()
    assert text.get_content() == UMLAUTS
