"""The one header-block reader: every part of dialmail agrees where the headers end."""
import io

import pytest

from gateway.mail import headers


@pytest.mark.parametrize("data,block,body", [
    (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", b"A: 1\r\nB: 2\r\n", b"body\r\n"),
    (b"A: 1\nB: 2\n\nbody\n", b"A: 1\nB: 2\n", b"body\n"),  # bare LF, as scripts and some ISPs write
    (b"A: 1\nB: 2\r\n\r\nbody", b"A: 1\nB: 2\r\n", b"body"),
    (b"A: 1\r\n\nbody", b"A: 1\r\n", b"body"),
    (b"\r\nbody only\r\n", b"", b"body only\r\n"),
    (b"A: 1\r\nB: 2\r\n", b"A: 1\r\nB: 2\r\n", b""),  # no empty line: all headers
    (b"A: 1\r\n X: folded\r\n\r\nFrom: not a header\r\n", b"A: 1\r\n X: folded\r\n", b"From: not a header\r\n"),
])
def test_split_finds_the_first_empty_line_with_either_line_end(data, block, body):
    got, start = headers.split(data)
    assert (got, data[start:]) == (block, body)
    assert headers.read(io.BytesIO(data)) == block  # the file reader agrees


def test_a_block_without_an_end_is_read_only_up_to_the_limit():
    data = b"X: " + b"y" * 100 + b"\r\n"
    huge = data * 5000  # 525 kB of headers and no empty line
    block, start = headers.split(huge, limit=10_000)
    assert len(block) <= 10_000 and block.endswith(b"\r\n") and start == len(block)
    assert headers.read(io.BytesIO(huge), limit=10_000) == huge[:10_000]


def test_parse_never_raises_and_of_reads_only_the_header_block():
    parsed = headers.of(b"Subject: hi\nFrom: a@b\n\nFrom: c@d\n")
    assert parsed["Subject"] == "hi" and parsed.get_all("From") == ["a@b"]
    assert headers.parse(b"\xff\xfe: \x00\r\n").keys() is not None


def test_crlf_gives_every_line_crlf():
    assert headers.crlf(b"A: 1\nB: 2\r\nC: 3") == b"A: 1\r\nB: 2\r\nC: 3\r\n"
