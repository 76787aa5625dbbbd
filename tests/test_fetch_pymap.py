"""Fetching from pymap, the pure-Python IMAP server the demo uses as its simulated ISP."""
from __future__ import annotations

import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from imapclient import IMAPClient

from tests.peers import free_port, have, make_self_signed_cert, wait_port
from tests.test_fetch_dovecot import ISP_PASSWORD, CuttingProxy, FetchSite, message

pytest.importorskip("pymap")

USER = "office"


class Pymap:
    """``pymap dict`` (in-memory mailboxes) on 127.0.0.1; STARTTLS with a self-signed cert when openssl exists."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="dialmail-pymap-"))
        self.port = free_port()
        self.cert = None
        tls = ["--no-tls"]
        if have("openssl"):
            self.cert, key = make_self_signed_cert(self.dir)
            tls = ["--cert", str(self.cert), "--key", str(key)]
        self.log = open(self.dir / "pymap.log", "wb")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("pymap")), "--host", "127.0.0.1", "--port", str(self.port), *tls,
             "dict", "--demo-user", USER, "--demo-password", ISP_PASSWORD],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_port("127.0.0.1", self.port, timeout=20, proc=self.proc)

    def client(self) -> IMAPClient:
        c = IMAPClient("127.0.0.1", self.port, ssl=False, timeout=10)
        c.login(USER, ISP_PASSWORD)
        return c

    def append(self, messages, folder="INBOX") -> None:
        c = self.client()
        try:
            for data in messages:
                c.append(folder, data)
        finally:
            c.logout()

    def count(self, folder="INBOX") -> int:
        c = self.client()
        try:
            return len(c.select_folder(folder, readonly=True) and c.search(["ALL"]))
        finally:
            c.logout()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def pymap_isp():
    server = Pymap()
    yield server
    server.stop()


@pytest.fixture
def fs(tmp_path):
    s = FetchSite(tmp_path)
    yield s
    s.site.stop()


def test_single_drop_over_starttls_from_pymap(fs, pymap_isp):
    if pymap_isp.cert is None:
        pytest.skip("needs openssl for the test certificate")
    before = pymap_isp.count()  # nothing is preloaded without --demo-data
    msgs = [message(i) for i in range(5)]
    pymap_isp.append(msgs)
    fs.configure(fs.account("sim", pymap_isp.port, USER, tls="starttls", ca_file=str(pymap_isp.cert),
                            deliver_to="alice"))
    result = fs.fetch()
    assert result.errors == [] and result.fetched == 5 + before
    assert sorted(m for m in fs.mail("alice") if m in msgs) == sorted(msgs)
    assert pymap_isp.count() == 0
    assert fs.fetch().fetched == 0


def test_multidrop_keep_and_large_message_in_pieces_from_pymap(fs, pymap_isp):
    msgs = [message(1, headers="Delivered-To: alice@office.test\r\n"),
            message(2, headers="Delivered-To: bob@office.test\r\n", size=300_000),
            message(3)]
    pymap_isp.append(msgs)
    fs.configure(fs.account("sim", pymap_isp.port, USER, mode="multidrop", envelope_header="Delivered-To",
                            keep=True, chunk_size="64KB"))
    result = fs.fetch()
    assert result.errors == [] and result.fetched == 3 and result.review == 1
    assert fs.mail("alice") == [msgs[0]] and fs.mail("bob") == [msgs[1]]
    assert len(fs.mail("postmaster")) == 1
    assert pymap_isp.count() == 3
    pymap_isp.append([message(4, headers="Delivered-To: carol@office.test\r\n")])
    again = fs.fetch()
    assert again.fetched == 1 and len(fs.mail("carol")) == 1


@pytest.mark.timeout(120)
def test_cut_line_against_pymap_delivers_everything_once(fs, pymap_isp):
    rnd = random.Random(3)
    msgs = [message(i, size=rnd.choice([400, 5000, 40_000])) for i in range(15)]
    pymap_isp.append(msgs)
    proxy = CuttingProxy(pymap_isp.port)
    try:
        fs.configure(fs.account("sim", proxy.port, USER, deliver_to="bob", batch_size=4, chunk_size="16KB"))
        limit, runs, cuts = 300, 0, 0
        while True:
            proxy.limit = limit if limit < 2_000_000 else None
            result = fs.fetch()
            runs += 1
            cuts += bool(result.errors)
            delivered = fs.mail("bob")
            assert len(delivered) == len(set(delivered))
            assert len(delivered) + pymap_isp.count() >= len(msgs)
            if not result.errors and pymap_isp.count() == 0:
                break
            limit = int(limit * 1.6)
            assert runs < 40
        assert cuts >= 3
        assert sorted(delivered) == sorted(msgs)
    finally:
        proxy.close()
