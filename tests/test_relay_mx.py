"""Direct MX delivery: host selection with an injected resolver (never real DNS), and one
flush through it to smtp-sink on 127.0.0.1."""
from __future__ import annotations

import asyncio
import random

import pytest

from gateway.relay import mx
from gateway.relay.flush import flush
from spool.queue import BOUNCED, DEFERRED, DELIVERED
from tests.test_relay import Office, message


def resolver(table: dict):
    """``{domain: [(pref, host)] | exception class}`` as an async lookup."""
    async def lookup(domain: str, rdtype: str):
        assert rdtype == "MX"
        answer = table.get(domain, mx.NoSuchDomain)
        if isinstance(answer, type) and issubclass(answer, Exception):
            raise answer(domain)
        return answer
    return lookup


def plan(domain, table, seed=1):
    return asyncio.run(mx.plan(domain, resolver(table), random.Random(seed)))


def test_mx_hosts_by_preference_with_equal_ones_shuffled():
    table = {"example.com": [(20, "b.example.com."), (10, "a1.example.com."), (10, "a2.example.com"),
                             (30, "c.example.com")]}
    orders = {plan("example.com", table, seed).hosts for seed in range(20)}
    assert orders == {("a1.example.com", "a2.example.com", "b.example.com", "c.example.com"),
                      ("a2.example.com", "a1.example.com", "b.example.com", "c.example.com")}


def test_no_mx_falls_back_to_the_domain_itself():
    assert plan("example.org", {"example.org": mx.NoRecords}).hosts == ("example.org",)


def test_null_mx_bounces():
    p = plan("nomail.example", {"nomail.example": [(0, ".")]})
    assert p.hosts == () and (p.failure.status, p.failure.dsn) == (BOUNCED, "5.1.10")


def test_unknown_domain_bounces_and_dns_failure_defers():
    p = plan("typo.example", {})
    assert (p.failure.status, p.failure.dsn) == (BOUNCED, "5.1.2")
    p = plan("flaky.example", {"flaky.example": mx.LookupFailed})
    assert (p.failure.status, p.failure.dsn) == (DEFERRED, "4.4.3")


@pytest.mark.peer
def test_mx_route_delivers_per_domain_over_one_connection(tmp_path, smtp_sink):
    o = Office(tmp_path / "o", 25, route="mx")
    qid = o.send("alice@office.test", ["a@example.com", "b@example.com", "c@typo.example", "d@dead.example"],
                 message("direct"))
    lookup = resolver({"example.com": [(10, "127.0.0.1")],
                       # the best MX refuses connections (nothing listens on 127.0.0.2), the next works
                       "dead.example": [(5, "127.0.0.2"), (10, "127.0.0.1")]})
    result = asyncio.run(flush(o.cfg, o.queue, lookup=lookup, mx_port=smtp_sink.port))
    by = {r.rcpt: r.outcome.status for r in result.results}
    assert by == {"a@example.com": DELIVERED, "b@example.com": DELIVERED, "c@typo.example": BOUNCED,
                  "d@dead.example": DELIVERED}
    got = smtp_sink.wait_messages(2)
    assert sorted(tuple(m.rcpts) for m in got) == [("a@example.com", "b@example.com"), ("d@dead.example",)]
    assert o.queue.get(qid) is None


def test_unreachable_name_server_defers_not_bounces():
    """dnspython against a name server that does not answer (a closed port on loopback)."""
    import dns.asyncresolver

    from tests.peers import free_port
    r = dns.asyncresolver.Resolver(configure=False)
    r.nameservers = ["127.0.0.1"]
    r.port = free_port()
    p = asyncio.run(mx.plan("example.com", mx.dns_resolver(r, lifetime=1.0)))
    assert p.hosts == () and (p.failure.status, p.failure.dsn) == (DEFERRED, "4.4.3")
