"""The fetch plan's decisions, without a server: order, session caps, the oversize policy,
the off-peak window, batching for the wire, read-only SELECT and what kept copies may go."""
import time

from gateway.config import FetchConfig, loads
from gateway.fetch.plan import (
    DEFERRED,
    DELETED_OVERSIZE,
    LEFT,
    Batch,
    batches,
    format_window,
    kept_until,
    opens_read_only,
    plan_folder,
    recognises_copies,
)

BASE = """
[server]
domains = ["office.test"]
spool_dir = "/tmp/unused"
[[fetch]]
name = "isp"
host = "imap.isp.test"
username = "office"
deliver_to = "alice"
"""

KB = 1000
NOON = time.mktime((2026, 11, 25, 12, 0, 0, 0, 0, -1))
MIDNIGHT = time.mktime((2026, 11, 25, 23, 30, 0, 0, 0, -1))


def account(extra: str = "") -> FetchConfig:
    return loads(BASE + extra).fetch[0]


def test_smallest_first_whatever_the_uid_order():
    p = plan_folder(account(), {1: 900 * KB, 2: 3 * KB, 3: 40 * KB, 4: 3 * KB}, NOON)
    assert p.fetch == ((2, 3 * KB), (4, 3 * KB), (3, 40 * KB), (1, 900 * KB))
    assert (p.messages, p.bytes, p.capped, p.oversize, p.outcome) == (4, 946 * KB, 0, (), None)


def test_max_messages_leaves_the_biggest_for_a_later_session():
    p = plan_folder(account("max_messages = 2\n"), {1: 50 * KB, 2: 1 * KB, 3: 2 * KB}, NOON)
    assert p.fetch == ((2, 1 * KB), (3, 2 * KB))
    assert p.capped == 1


def test_max_messages_counts_what_earlier_folders_took():
    p = plan_folder(account("max_messages = 5\n"), {1: 1 * KB, 2: 2 * KB, 3: 3 * KB}, NOON, fetched=4)
    assert p.fetch == ((1, 1 * KB),) and p.capped == 2
    full = plan_folder(account("max_messages = 5\n"), {1: 1 * KB}, NOON, fetched=5)
    assert full.fetch == () and full.capped == 1


def test_max_bytes_stops_at_the_first_message_that_would_overflow():
    # 10 + 20 fit in 35 kB; 30 does not, and nothing after it is tried (smallest first).
    p = plan_folder(account('max_bytes = "35kB"\n'), {1: 30 * KB, 2: 10 * KB, 3: 20 * KB, 4: 31 * KB}, NOON)
    assert p.fetch == ((2, 10 * KB), (3, 20 * KB))
    assert p.capped == 2


def test_max_bytes_still_fetches_one_message_bigger_than_the_cap():
    # Otherwise a message over max_bytes would never come at all.
    p = plan_folder(account('max_bytes = "10kB"\n'), {7: 200 * KB, 8: 300 * KB}, NOON)
    assert p.fetch == ((7, 200 * KB),) and p.capped == 1


def test_max_bytes_counts_what_earlier_folders_took():
    p = plan_folder(account('max_bytes = "10kB"\n'), {7: 200 * KB}, NOON, fetched=1, fetched_bytes=2 * KB)
    assert p.fetch == () and p.capped == 1
    room = plan_folder(account('max_bytes = "10kB"\n'), {7: 8 * KB}, NOON, fetched=1, fetched_bytes=2 * KB)
    assert room.fetch == ((7, 8 * KB),) and room.capped == 0


def test_oversize_leave_keeps_the_copy_out_with_a_left_notice():
    p = plan_folder(account('max_message_size = "100kB"\n'), {1: 101 * KB, 2: 100 * KB, 3: 5 * KB}, NOON)
    assert p.fetch == ((3, 5 * KB), (2, 100 * KB))  # the limit itself is allowed
    assert p.oversize == (1,) and p.outcome == LEFT
    assert p.capped == 0  # left by the policy, not by the caps


def test_oversize_delete_names_the_delete_outcome():
    p = plan_folder(account('max_message_size = "100kB"\noversize = "delete"\n'), {4: 2000 * KB, 3: 500 * KB}, NOON)
    assert p.fetch == () and p.oversize == (3, 4) and p.outcome == DELETED_OVERSIZE


def test_oversize_defer_waits_for_the_offpeak_window_then_fetches_last():
    deferring = account('max_message_size = "100kB"\noversize = "defer"\noffpeak = "22:00-06:00"\n')
    sizes = {1: 900 * KB, 2: 3 * KB}
    day = plan_folder(deferring, sizes, NOON)
    assert day.fetch == ((2, 3 * KB),) and day.oversize == (1,) and day.outcome == DEFERRED
    night = plan_folder(deferring, sizes, MIDNIGHT)
    assert night.fetch == ((2, 3 * KB), (1, 900 * KB)) and night.oversize == () and night.outcome is None


def test_caps_apply_to_big_mail_fetched_in_the_offpeak_window():
    deferring = account('max_message_size = "100kB"\noversize = "defer"\noffpeak = "22:00-06:00"\n'
                        'max_bytes = "1MB"\n')
    night = plan_folder(deferring, {1: 900 * KB, 2: 800 * KB, 3: 3 * KB}, MIDNIGHT)
    assert night.fetch == ((3, 3 * KB), (2, 800 * KB)) and night.capped == 1


def test_the_window_prints_as_the_admin_wrote_it():
    assert format_window((22 * 60, 6 * 60)) == "22:00-06:00"
    assert format_window((9 * 60 + 30, 17 * 60)) == "09:30-17:00"


def test_batches_hold_at_most_batch_size_messages():
    fetch = [(uid, 1 * KB) for uid in range(1, 6)]
    assert batches(fetch, batch_size=2, chunk_size=1000 * KB) == [
        Batch(((1, KB), (2, KB))), Batch(((3, KB), (4, KB))), Batch(((5, KB),))]


def test_batches_hold_at_most_chunk_size_bytes():
    fetch = [(1, 40 * KB), (2, 50 * KB), (3, 20 * KB), (4, 100 * KB)]
    assert batches(fetch, batch_size=50, chunk_size=100 * KB) == [
        Batch(((1, 40 * KB), (2, 50 * KB))), Batch(((3, 20 * KB),)), Batch(((4, 100 * KB),))]


def test_a_message_over_chunk_size_goes_alone_in_pieces_between_batches():
    fetch = [(1, 1 * KB), (2, 2 * KB), (9, 5000 * KB), (3, 3 * KB)]
    assert batches(fetch, batch_size=50, chunk_size=1000 * KB) == [
        Batch(((1, 1 * KB), (2, 2 * KB))), Batch(((9, 5000 * KB),), in_pieces=True), Batch(((3, 3 * KB),))]
    assert batches([], batch_size=50, chunk_size=1000 * KB) == []


def test_read_only_select_only_when_nothing_can_be_deleted():
    assert opens_read_only(account("keep = true\n"))
    assert not opens_read_only(account("keep = false\n"))
    assert not opens_read_only(account("keep = true\nkeep_days = 7\n"))
    assert not opens_read_only(account('keep = true\nmax_message_size = "1MB"\noversize = "delete"\n'))
    assert opens_read_only(account('keep = true\nmax_message_size = "1MB"\noversize = "leave"\n'))


def test_which_kept_copies_may_go():
    assert kept_until(account("keep = false\n"), NOON) == float("inf")  # every copy taken: it is spooled
    assert kept_until(account("keep = true\nkeep_days = 3\n"), NOON) == NOON - 3 * 86400
    assert kept_until(account("keep = true\n"), NOON) is None


def test_copies_are_recognised_by_digest_after_renumbering_or_across_folders():
    one = account()
    assert not recognises_copies(one, renumbered=False)
    assert recognises_copies(one, renumbered=True)
    assert recognises_copies(account('folders = ["INBOX", "Spam"]\n'), renumbered=False)
