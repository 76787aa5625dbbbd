"""Large messages in pieces straight to disk, without a server: a cut line costs only the
piece in flight, the next session asks for the rest from where the file ends, and partial
files nobody wants any more are dropped."""
import os

import pytest

from gateway.fetch.partial import Partials, move_into

MESSAGE = b"Subject: big\r\n\r\n" + bytes(range(256)) * 40  # 10256 bytes
CHUNK = 4096


class Server:
    """Answers BODY.PEEK[]<offset.length> from MESSAGE; ``cut_after`` pieces, the line drops."""

    def __init__(self, cut_after: int | None = None):
        self.asked: list[tuple[int, int]] = []
        self.cut_after = cut_after

    def read_piece(self, offset: int, length: int) -> bytes:
        if self.cut_after is not None and len(self.asked) == self.cut_after:
            raise ConnectionResetError("carrier lost")
        self.asked.append((offset, length))
        return MESSAGE[offset:offset + length]


def test_download_asks_piece_by_piece_until_a_short_one(tmp_path):
    server, seen = Server(), []
    path = Partials(tmp_path, "isp").download("INBOX", 7, 42, len(MESSAGE), CHUNK, server.read_piece, seen.append)
    assert server.asked == [(0, CHUNK), (4096, CHUNK), (8192, CHUNK)]
    assert seen == [4096, 8192, len(MESSAGE)]
    assert path.read_bytes() == MESSAGE


def test_a_cut_line_resumes_at_the_end_of_the_partial_file(tmp_path):
    partials = Partials(tmp_path, "isp")
    cut = Server(cut_after=2)
    with pytest.raises(ConnectionResetError):
        partials.download("INBOX", 7, 42, len(MESSAGE), CHUNK, cut.read_piece)
    kept = partials.path("INBOX", 7, 42)
    assert kept.read_bytes() == MESSAGE[:8192]  # both pieces that arrived are on disk
    again = Server()
    path = partials.download("INBOX", 7, 42, len(MESSAGE), CHUNK, again.read_piece)
    assert again.asked == [(8192, CHUNK)]  # only the rest is asked for
    assert path == kept and path.read_bytes() == MESSAGE


def test_a_server_understating_the_size_still_gets_the_whole_message(tmp_path):
    server = Server()
    path = Partials(tmp_path, "isp").download("INBOX", 7, 42, 100, CHUNK, server.read_piece)
    assert path.read_bytes() == MESSAGE


def test_clean_drops_partials_taken_gone_or_of_an_old_uidvalidity(tmp_path):
    partials, other = Partials(tmp_path, "isp"), Partials(tmp_path, "branch")
    for p, folder, validity, uid in [(partials, "INBOX", 7, 1), (partials, "INBOX", 7, 2), (partials, "INBOX", 6, 3),
                                     (partials, "Spam", 7, 4), (other, "INBOX", 7, 5)]:
        p.download(folder, validity, uid, 10, CHUNK, lambda offset, length: b"0123456789" if not offset else b"")
    partials.clean("INBOX", 7, wanted={2, 3})
    assert sorted(os.listdir(partials.dir)) == sorted(
        p.path(f, v, u).name for p, f, v, u in [(partials, "INBOX", 7, 2), (partials, "Spam", 7, 4),
                                                 (other, "INBOX", 7, 5)])


def test_move_into_puts_the_review_header_on_top(tmp_path):
    partial, tmp = tmp_path / "partial", tmp_path / "tmp"
    partial.write_bytes(MESSAGE)
    move_into(partial, tmp, b"X-Dialmail-Review: why\r\n")
    assert tmp.read_bytes() == b"X-Dialmail-Review: why\r\n" + MESSAGE and not partial.exists()
    partial.write_bytes(MESSAGE)
    move_into(partial, tmp_path / "tmp2")
    assert (tmp_path / "tmp2").read_bytes() == MESSAGE and not partial.exists()
