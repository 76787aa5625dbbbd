"""The spool's disk fills up during a fetch: the fetch stops cleanly, nothing it did not
keep is flagged \\Deleted on the ISP, and once there is room again the next fetch
collects the rest, each message delivered exactly once."""
import os
import re
import subprocess
from collections import Counter

import pytest

from tests.torture.checker import mailbox_ids, make_message

pytestmark = [pytest.mark.peer, pytest.mark.timeout(180)]

ISP_USER, ISP_PASS = "office", "isp-diskfull-secret"


def flags_at_isp(dovecot) -> dict[int, str]:
    m = dovecot.imap(ISP_USER)
    try:
        m.select("INBOX")
        typ, data = m.uid("FETCH", "1:*", "(FLAGS)")
        out = {}
        for item in data:
            if item:
                text = item.decode() if isinstance(item, bytes) else item[0].decode()
                uid = re.search(r"UID (\d+)", text)
                if uid:
                    out[int(uid.group(1))] = re.search(r"FLAGS \(([^)]*)\)", text).group(1)
        return out
    finally:
        m.logout()


def test_disk_full_during_fetch_stops_cleanly_and_resumes(site, dovecot):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    dovecot.add_user(ISP_USER, ISP_PASS)
    # Small mail first, then one bigger than the whole spool disk, then more small mail.
    sizes = [2000, 3000, 1500, 6_000_000, 2500, 1800]
    mids = [f"<full-{i}@outside.test>" for i in range(len(sizes))]
    msgs = [make_message(mid, "alice@office.test", size, sender="x@outside.test", delivered_to=True)
            for mid, size in zip(mids, sizes)]
    dovecot.save_many(ISP_USER, msgs)
    site.write_config(site.fetch_account(dovecot.imap_port, ISP_USER, ISP_PASS, mode='"multidrop"',
                                         envelope_header='"Delivered-To"'))
    site.spool.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(site.spool)], check=True)
    try:
        site.add_user("alice", "alice-pw")
        first = site.cli("fetch", timeout=120)
        out = first.stdout.decode() + first.stderr.decode()
        assert "disk full" in out.lower() and "Traceback" not in out, out
        assert first.returncode == 75, out                  # EX_TEMPFAIL: try again later
        # The pieces of the message that did not fit are not kept: they would keep the disk full.
        assert not any((site.spool / "fetch-partial").glob("*"))
        # Nothing on the ISP is marked for deletion: what is still there is intact.
        flags = flags_at_isp(dovecot)
        assert flags and not any("Deleted" in f for f in flags.values()), flags
        have = Counter(mailbox_ids(site.spool).get("alice", []))
        assert all(n == 1 for n in have.values()), have
        # What was not kept is still at the ISP; what was kept is not lost.
        assert len(flags) + sum(have.values()) >= len(mids) - len(list((site.spool / "queue").glob("**/*.msg")))
        # Room again: the next fetch completes, each message exactly once.
        subprocess.run(["mount", "-o", "remount,size=64m", str(site.spool)], check=True)
        second = site.cli("fetch", timeout=120)
        assert second.returncode == 0, second.stdout.decode() + second.stderr.decode()
        have = Counter(mailbox_ids(site.spool).get("alice", []))
        assert have == Counter(mids), have
        assert dovecot.message_count(ISP_USER) == 0
        assert os.listdir(site.spool / "queue" / "tmp") == []
    finally:
        site.stop()
        subprocess.run(["umount", "-l", str(site.spool)])
