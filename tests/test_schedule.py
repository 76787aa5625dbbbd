"""Dial times and dial-on-demand, with an injected clock."""
import datetime as dt

import pytest
import schedule

from gateway.config import DemandConfig, dialtimes, loads
from gateway.mail.errors import ConfigError
from gateway.session import demand, scheduler
from spool.clock import ClockSteps, ClockWatch, Step
from spool.queue import Catalogue
from spool.sessions import SessionLog, SessionRecord

FRI = dt.datetime(2026, 11, 27, 17, 45)   # a Friday


def nexts(text, start, n=3):
    rule, out, t = dialtimes.parse(text), [], start
    for _ in range(n):
        t = rule.next_after(t)
        out.append(t.strftime("%a %H:%M"))
    return out


@pytest.mark.parametrize("text, start, expected", [
    ("08:00", FRI, ["Sat 08:00", "Sun 08:00", "Mon 08:00"]),
    ("every 30 minutes", FRI, ["Fri 18:00", "Fri 18:30", "Fri 19:00"]),
    ("every 30 minutes from 08:00 to 18:00 on weekdays", FRI, ["Fri 18:00", "Mon 08:00", "Mon 08:30"]),
    ("monday 07:30", FRI, ["Mon 07:30", "Mon 07:30", "Mon 07:30"]),
    ("mon,wed,fri 12:00", dt.datetime(2026, 11, 25, 12, 0), ["Fri 12:00", "Mon 12:00", "Wed 12:00"]),
    ("weekends 10:00", FRI, ["Sat 10:00", "Sun 10:00", "Sat 10:00"]),
    ("every 2 hours on mon-wed", FRI, ["Mon 00:00", "Mon 02:00", "Mon 04:00"]),
    ("*/20 8-9 * * 1-5", dt.datetime(2026, 11, 25, 9, 50), ["Thu 08:00", "Thu 08:20", "Thu 08:40"]),
])
def test_dial_strings(text, start, expected):
    got = nexts(text, start)
    if text == "monday 07:30":  # next_after from the same instant again
        rule = dialtimes.parse(text)
        got = [rule.next_after(FRI).strftime("%a %H:%M")] * 3
    assert got == expected


@pytest.mark.parametrize("text", ["every 7 minutes", "25:00", "funday 08:00", "every 30 minutes from 18:00 to 08:00",
                                  "61 * * * *", "sometimes"])
def test_bad_dial_strings_are_config_errors(text):
    with pytest.raises(ConfigError) as exc:
        loads(f'[server]\ndomains = ["o.test"]\nspool_dir = "/tmp/x"\n[schedule]\ndial = ["{text}"]\n')
    assert "schedule.dial" in str(exc.value) and ":5:" in str(exc.value)


def test_rules_drive_a_schedule_scheduler():
    now = [dt.datetime(2026, 11, 27, 7, 59)]
    s = schedule.Scheduler()
    fired = []
    dialtimes.install(s, [dialtimes.parse("08:00"), dialtimes.parse("every 30 minutes from 09:00 to 10:00")],
                      fired.append, now=lambda: now[0])
    assert s.get_next_run() == dt.datetime(2026, 11, 27, 8, 0)
    assert len(s.jobs) == 2


CFG = DemandConfig(min_messages=5, min_bytes=1_000_000, urgent_after=600, urgent_senders=(), collect_every=7200,
                   min_gap=300, max_sessions_per_day=3, max_minutes_per_day=30.0)
NOW = 1_800_000_000.0


def hist(last=None, collect=60, n=0, minutes=0.0):
    """``last`` and ``collect``: seconds since the last session and the last collection."""
    return demand.History(since_last_session=last, since_last_collection=collect, sessions_today=n,
                          minutes_today=minutes)


def test_demand_triggers():
    q = demand.QueueSnapshot
    assert not demand.decide(CFG, q(0, 0, None), hist(), NOW).dial
    assert not demand.decide(CFG, q(4, 1000, None), hist(), NOW).dial
    assert demand.decide(CFG, q(5, 1000, None), hist(), NOW).dial
    assert demand.decide(CFG, q(1, 2_000_000, None), hist(), NOW).dial
    assert not demand.decide(CFG, q(1, 10, NOW - 599), hist(), NOW).dial
    assert "urgent" in demand.decide(CFG, q(1, 10, NOW - 600), hist(), NOW).reason
    assert demand.decide(CFG, q(0, 0, None), hist(collect=7200), NOW).reason == "collection due"


def test_demand_budget_and_gap_refusals():
    q = demand.QueueSnapshot(9, 10, None)
    d = demand.decide(CFG, q, hist(last=100), NOW)
    assert not d.dial and d.refused and "less than 300s" in d.reason
    d = demand.decide(CFG, q, hist(n=3), NOW)
    assert not d.dial and d.refused and "3 sessions" in d.reason
    d = demand.decide(CFG, q, hist(minutes=30.0), NOW)
    assert not d.dial and d.refused and "30 connected minutes" in d.reason
    assert demand.decide(CFG, q, hist(last=301, n=2, minutes=29), NOW).dial


# ---------------------------------------------------------------- the clock stepped

DAY = 86400
NOON = dt.datetime(2027, 1, 15, 12, 0).timestamp()  # local noon: "today" has room either side
BOOT = "9c1e0c55-boot"


@pytest.fixture
def sessions(tmp_path):
    cat = Catalogue(tmp_path / "spool")
    yield SessionLog(cat)
    cat.close()


def logged(sessions: SessionLog, started: float, *, minutes: float = 10, boot: str | None = None,
           uptime: float | None = None, outcome: str = "ok") -> None:
    rec = SessionRecord(trigger="demand", started=started, boot=boot, started_uptime=uptime)
    rec.connected_at, rec.hung_up_at, rec.ended = started + 30, started + 30 + minutes * 60, started + 40 + minutes * 60
    rec.outcome = outcome
    sessions.update(sessions.start(rec), rec)


def test_a_session_stamped_in_the_future_does_not_block_dialling(sessions):
    # The clock ran a day fast during the last session, then NTP set it back: its stamp is
    # "tomorrow".  It was on another boot (or before sessions carried a boot-clock stamp).
    logged(sessions, NOON + DAY, boot=None)
    history = scheduler.history(sessions, NOON, up=500.0, boot=BOOT)
    assert history.since_last_session == demand.LONG_AGO and history.since_last_collection == demand.LONG_AGO
    d = demand.decide(CFG, demand.QueueSnapshot(9, 10, None), history, NOON)
    assert d.dial, d.reason
    assert demand.decide(CFG, demand.QueueSnapshot(0, 0, None), history, NOON).reason == "collection due"


def test_urgent_mail_stamped_in_the_future_is_urgent_now():
    d = demand.decide(CFG, demand.QueueSnapshot(1, 10, NOON + DAY), hist(), NOON)
    assert d.dial and d.reason == "urgent mail waiting since before the clock was set back"


def test_the_gap_after_a_session_on_this_boot_is_real_time_whatever_the_wall_clock_did(sessions):
    q = demand.QueueSnapshot(9, 10, None)
    logged(sessions, NOON + DAY, boot=BOOT, uptime=1000.0)  # stamped a day ahead, 100 real seconds ago
    d = demand.decide(CFG, q, scheduler.history(sessions, NOON, up=1100.0, boot=BOOT), NOON)
    assert not d.dial and d.refused and "less than 300s ago" in d.reason
    assert demand.decide(CFG, q, scheduler.history(sessions, NOON + 201, up=1301.0, boot=BOOT), NOON + 201).dial
    # Stepped forward a day right after a session: the wall clock says a day, real time 100 s.
    assert scheduler.history(sessions, NOON + 2 * DAY, up=1100.0, boot=BOOT).since_last_session == 100.0
    # After a reboot the boot clock says nothing about that session: the wall clock does.
    assert scheduler.history(sessions, NOON + DAY + 50, up=20.0, boot="other-boot").since_last_session == 50.0


def test_the_daily_budget_counts_todays_sessions_by_the_wall_clock_and_ignores_future_ones(sessions):
    logged(sessions, NOON - DAY, minutes=10)              # yesterday
    logged(sessions, NOON - 3600, minutes=10)             # today
    logged(sessions, NOON - 1800, outcome="refused")      # a refused dial is no session
    logged(sessions, NOON + 3600, minutes=20)             # later today: recorded before a step back
    logged(sessions, NOON + DAY, minutes=20)              # "tomorrow"
    history = scheduler.history(sessions, NOON, up=500.0, boot=BOOT)
    assert (history.sessions_today, history.minutes_today) == (1, 10.0)
    d = demand.decide(CFG, demand.QueueSnapshot(9, 10, None), history, NOON)  # 3 a day, 30 minutes a day
    assert d.dial, d.reason


def test_connected_minutes_go_by_the_boot_clock_when_the_session_has_them():
    rec = SessionRecord(trigger="demand", started=NOON, connected_at=NOON, hung_up_at=NOON + 5 * DAY,
                        online_seconds=120.0)
    assert rec.connected_seconds == 120.0  # a step forward while online is not five days online


def test_a_step_back_replans_the_dial_times():
    wed_7 = dt.datetime(2026, 11, 25, 7, 0)
    now = [wed_7]
    s = schedule.Scheduler()
    dialtimes.install(s, [dialtimes.parse("08:00")], [].append, now=lambda: now[0])
    assert s.get_next_run() == dt.datetime(2026, 11, 25, 8, 0)
    now[0] = wed_7 - dt.timedelta(days=1)  # the clock was a day fast; NTP steps it back
    assert s.get_next_run() == dt.datetime(2026, 11, 25, 8, 0)  # the library alone would skip Tuesday's dial
    dialtimes.replan(s)
    assert s.get_next_run() == dt.datetime(2026, 11, 24, 8, 0)


def test_the_clock_watch_records_steps_not_slewing(tmp_path):
    cat = Catalogue(tmp_path / "spool")
    watch = ClockWatch(cat, boot=BOOT)
    assert watch.observe(NOON, 1000.0) is None
    assert watch.observe(NOON + 301.5, 1300.0) is None          # 1.5 s off in 5 minutes: slewing, not a step
    step = watch.observe(NOON + 5 * DAY + 311.5, 1310.0)        # ten real seconds, five days on the wall
    assert step == Step(before=NOON + 311.5, seconds=5 * DAY)
    back = watch.observe(NOON + 320.0, 1318.5)                  # and NTP sets it right again
    assert back == Step(before=NOON + 5 * DAY + 320.0, seconds=-5 * DAY)
    assert ClockSteps(cat).all() == [step, back]
    cat.close()


def test_a_restarted_daemon_sees_a_step_made_while_it_was_stopped_on_the_same_boot(tmp_path):
    cat = Catalogue(tmp_path / "spool")
    ClockWatch(cat, boot=BOOT).observe(NOON, 1000.0)
    assert ClockWatch(cat, boot=BOOT).observe(NOON + 3 * DAY + 60, 1060.0) == Step(NOON + 60, 3 * DAY)
    # Stopped a week while NTP slewed the clock 30 s: that is no step.
    assert ClockWatch(cat, boot=BOOT).observe(NOON + 3 * DAY + 60 + 7 * DAY + 30, 1060.0 + 7 * DAY) is None
    # After a reboot the boot clock starts again: only the wall clock is left, and it is believed.
    assert ClockWatch(cat, boot="next-boot").observe(NOON + 9 * DAY, 30.0) is None
    cat.close()
