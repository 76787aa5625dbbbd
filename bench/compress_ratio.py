"""IMAP COMPRESS=DEFLATE: bytes the fetch moves per byte of mail, on and off, from a Dovecot
2.3 with imap_zlib, for the link workload (text plus base64 attachments of random bytes)
and a mostly-text one (replies with quotes).  No line: the line time of a fetch on a
byte-bound line follows these bytes.

    .venv/bin/python bench/compress_ratio.py
"""
import sys
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from workload import LINK_SIZES, message  # noqa: E402

from tests.peers import Dovecot  # noqa: E402
from tests.test_fetch_compress import text_mail  # noqa: E402
from tests.test_fetch_dovecot import ISP_PASSWORD, FetchSite  # noqa: E402

print("6. IMAP COMPRESS=DEFLATE: the fetch's bytes per byte of mail (Dovecot 2.3, imap_zlib)")
realistic = [message(s, sender=f"s{i}@outside.test", rcpt="alice@office.test", subject=f"in {i}", seed=2000 + i)
             for i, s in enumerate(LINK_SIZES)]
text = [text_mail(i, s) for i, s in enumerate(LINK_SIZES)]
with Dovecot(compress=True) as d:
    for name, msgs in (("realistic (text + base64 random)", realistic), ("mostly text", text)):
        for mode in ("auto", "off"):
            d.reset(); d.add_user("office", ISP_PASSWORD); d.save_many("office", msgs)
            with tempfile.TemporaryDirectory() as tmp:
                fs = FetchSite(Path(tmp))
                fs.configure(fs.account("isp", d.imap_port, "office", deliver_to="alice", compress=mode))
                r = fs.fetch(deliver=False)
                fs.site.stop()
            w = r.accounts[0].wire
            mail = r.bytes
            deflated = sum(len(zlib.compress(m, 6)) for m in msgs)
            print(f"{name:34} compress={mode:4} mail {mail:7d} B  wire down {w.down:7d} up {w.up:5d}  "
                  f"down/mail {w.down / mail:.3f}  (deflate(mail) alone {deflated / mail:.3f})")
