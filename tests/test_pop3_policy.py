"""Who may send a password in the clear: loopback always, the LAN only when configured."""
from __future__ import annotations

import pytest

from gateway.config import loads
from gateway.pop3.server import POP3Server
from spool.users import Users


def server(tmp_path, allow_lan: bool) -> POP3Server:
    config = loads(f"""
[server]
hostname = "mail.office.test"
domains = ["office.test"]
spool_dir = "{tmp_path}"
mynetworks = ["192.168.1.0/24"]

[pop3]
listen = ["127.0.0.1:0"]
allow_plaintext_lan = {"true" if allow_lan else "false"}
""")
    return POP3Server(config, Users(tmp_path))


@pytest.mark.parametrize("ip, default, lan_allowed", [
    ("127.0.0.1", True, True),
    ("127.0.0.2", True, True),
    ("::1", True, True),
    ("::ffff:127.0.0.1", True, True),
    ("192.168.1.20", False, True),
    ("::ffff:192.168.1.20", False, True),
    ("10.9.9.9", False, False),  # not in mynetworks: never in the clear
    ("garbage", False, False),
])
def test_plaintext_login_is_allowed_from_loopback_and_from_mynetworks_when_configured(tmp_path, ip, default,
                                                                                      lan_allowed):
    assert server(tmp_path, allow_lan=False).plaintext_allowed(ip) is default
    assert server(tmp_path, allow_lan=True).plaintext_allowed(ip) is lan_allowed
