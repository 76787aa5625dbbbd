"""Dial times and dial-on-demand, with an injected clock."""
import datetime as dt

import pytest
import schedule

from gateway.config import DemandConfig, dialtimes, loads
from gateway.mail.errors import ConfigError
from gateway.session import demand

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


def hist(last=None, collect=NOW - 60, n=0, minutes=0.0):
    return demand.History(last_session_start=last, last_collection=collect, sessions_today=n, minutes_today=minutes)


def test_demand_triggers():
    q = demand.QueueSnapshot
    assert not demand.decide(CFG, q(0, 0, None), hist(), NOW).dial
    assert not demand.decide(CFG, q(4, 1000, None), hist(), NOW).dial
    assert demand.decide(CFG, q(5, 1000, None), hist(), NOW).dial
    assert demand.decide(CFG, q(1, 2_000_000, None), hist(), NOW).dial
    assert not demand.decide(CFG, q(1, 10, NOW - 599), hist(), NOW).dial
    assert "urgent" in demand.decide(CFG, q(1, 10, NOW - 600), hist(), NOW).reason
    assert demand.decide(CFG, q(0, 0, None), hist(collect=NOW - 7200), NOW).reason == "collection due"


def test_demand_budget_and_gap_refusals():
    q = demand.QueueSnapshot(9, 10, None)
    d = demand.decide(CFG, q, hist(last=NOW - 100), NOW)
    assert not d.dial and d.refused and "less than 300s" in d.reason
    d = demand.decide(CFG, q, hist(n=3), NOW)
    assert not d.dial and d.refused and "3 sessions" in d.reason
    d = demand.decide(CFG, q, hist(minutes=30.0), NOW)
    assert not d.dial and d.refused and "30 connected minutes" in d.reason
    assert demand.decide(CFG, q, hist(last=NOW - 301, n=2, minutes=29), NOW).dial
