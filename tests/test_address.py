"""Which envelope addresses dialmail passes on to the smarthost (RFC 5321 §4.1.2, RFC 6531 §3.3)."""
import pytest

from gateway.mail.address import is_relayable


@pytest.mark.parametrize("addr", [
    "john@remote.example", '"john doe"@remote.example', '"a\\"b"@remote.example', '"x.y z"@remote.example',
    "jörg@bücher.example", '"jörg müller"@remote.example', "Jörg@Remote.Example.",
])
def test_valid_addresses_are_relayed(addr):
    assert is_relayable(addr)


@pytest.mark.parametrize("addr", [
    '"victim@elsewhere.test"@remote.example', '"victim%elsewhere.test"@remote.example',
    '"elsewhere.test!victim"@remote.example', "victim%elsewhere.test@remote.example",
    "elsewhere.test!victim@remote.example", '"unclosed@remote.example', '"trailing\\"@remote.example',
    '"tab\there"@remote.example', "a..b@remote.example", ".a@remote.example", "john@[192.0.2.1]",
    "john@[IPv6:::1]", "john", '"john doe"', "john@remote.example (x)", "jo\udcffrg@remote.example",
    "john@bad_domain.example", "john@-bad.example",
])
def test_routing_tricks_and_malformed_addresses_are_not(addr):
    assert not is_relayable(addr)
