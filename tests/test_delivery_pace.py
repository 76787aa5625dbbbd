"""Local delivery keeps pace with SMTP ingest: a pass over a burst of messages pays the
disk's price (fsync, COMMIT) per pass and per mailbox where it can, and per message only
where exactly-once needs it (the Maildir file itself, the message's journal), and those
fsyncs run side by side so the file system can serve them with shared commits."""
from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

from gateway.config import load
from gateway.daemon import Spool
from spool.queue import LOCAL
from tests.torture.checker import mailbox_ids, make_message


def _queue_for(spool: Spool, users: list[str], each: int) -> dict[str, list[str]]:
    mids: dict[str, list[str]] = {u: [] for u in users}
    for i in range(each):
        for user in users:
            mid = f"<pace-{user}-{i}-{time.monotonic_ns()}@outside.test>"
            spool.queue.enqueue("x@outside.test", [(f"{user}@office.test", LOCAL)],
                                make_message(mid, f"{user}@office.test", 2000, sender="x@outside.test"),
                                origin="smtp", message_id=mid)
            mids[user].append(mid)
    return mids


def test_a_delivery_pass_fsyncs_each_maildir_once_and_records_every_delivery_in_one_commit(site, monkeypatch):
    spool = Spool(load(site.config_path))
    try:
        mids = _queue_for(spool, ["alice", "bob"], 6)
        synced: list[str] = []
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            real_fsync(fd)
        monkeypatch.setattr(os, "fsync", fsync)
        writes: list[str] = []
        conn = spool.queue.cat.conn
        # A write transaction is a BEGIN, or a write statement outside one (autocommit).
        conn.set_trace_callback(lambda sql: writes.append(sql[:60]) if (
            sql.startswith("BEGIN") or (not conn.in_transaction and sql.split()[0].upper()
                                        in ("INSERT", "UPDATE", "DELETE"))) else None)

        assert spool.delivery.run_once() == 12
        conn.set_trace_callback(None)

        mail = site.spool / "mail"
        assert sorted(p for p in synced if Path(p).is_dir()) == [str(mail / "alice" / "new"),
                                                                 str(mail / "bob" / "new")]
        maildir_files = [p for p in synced if p.startswith(f"{mail}/") and not Path(p).is_dir()]
        journals = [p for p in synced if p.startswith(f"{site.spool / 'queue' / 'env'}/")]
        assert len(maildir_files) == 12  # each message's file, before its link into new/
        assert len(journals) == 12  # final outcome and removal in one write per message
        # The claim, the hourly expiry of forwarding markers, the outcomes of all 12 (with
        # their removal), the claimant's release: not one or two per message.
        assert len(writes) <= 4, writes
        assert {u: Counter(ids) for u, ids in mailbox_ids(site.spool).items()} == \
            {u: Counter(ids) for u, ids in mids.items()}
        assert spool.queue.messages() == []
        assert not any((site.spool / "queue" / "msg").iterdir())
    finally:
        spool.close()
