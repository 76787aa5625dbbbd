"""[[fetch]] settings the fetcher relies on are refused early, naming the key."""
import time

import pytest

from gateway.config import loads, parse_window
from gateway.fetch.plan import in_window
from gateway.mail.errors import ConfigError

BASE = """
[server]
domains = ["office.test"]
spool_dir = "/tmp/unused"
[[fetch]]
name = "isp"
host = "imap.isp.test"
username = "office"
"""


def test_multidrop_without_an_envelope_header_is_a_config_error():
    with pytest.raises(ConfigError, match="envelope_header"):
        loads(BASE + 'mode = "multidrop"\n')
    cfg = loads(BASE + 'mode = "multidrop"\nguess_from_headers = true\n')  # only when asked for
    assert cfg.fetch[0].guess_from_headers


def test_defer_needs_an_offpeak_window():
    with pytest.raises(ConfigError, match="offpeak"):
        loads(BASE + 'deliver_to = "alice"\nmax_message_size = "5MB"\noversize = "defer"\n')
    cfg = loads(BASE + 'deliver_to = "alice"\nmax_message_size = "5MB"\noversize = "defer"\n'
                'offpeak = "22:00-06:00"\ndomains = ["Hosted.ISP.test"]\n')
    assert cfg.fetch[0].offpeak == (22 * 60, 6 * 60) and cfg.fetch[0].domains == ("hosted.isp.test",)


@pytest.mark.parametrize("text", ["22-06", "25:00-06:00", "10:00-10:00", "10:61-11:00"])
def test_bad_windows(text):
    with pytest.raises(ValueError):
        parse_window(text)


def test_window_wraps_past_midnight():
    def at(hour, minute):
        return time.mktime((2026, 11, 25, hour, minute, 0, 0, 0, -1))
    night = parse_window("22:00-06:00")
    assert in_window(night, at(23, 0)) and in_window(night, at(5, 59))
    assert not in_window(night, at(6, 0)) and not in_window(night, at(12, 0))
    day = parse_window("09:30-17:00")
    assert in_window(day, at(9, 30)) and not in_window(day, at(17, 0))
    assert not in_window(None, at(12, 0))


def test_compress_is_auto_unless_turned_off_and_nothing_else():
    assert loads(BASE + 'deliver_to = "alice"\n').fetch[0].compress == "auto"
    assert loads(BASE + 'deliver_to = "alice"\ncompress = "off"\n').fetch[0].compress == "off"
    with pytest.raises(ConfigError, match=r"fetch\[isp\].*compress.*'auto', 'off'.*'yes'"):
        loads(BASE + 'deliver_to = "alice"\ncompress = "yes"\n')
