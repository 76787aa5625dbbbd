"""Direct delivery: which hosts take mail for a domain (``[smarthost] route = "mx"``).

``plan(domain, lookup)`` is the selection logic without sockets: MX records by
preference (equal preferences shuffled, RFC 5321 §5.1), the domain itself when it has
no MX (implicit MX), a null MX (RFC 7505) or a domain that does not exist is a bounce,
a DNS failure a deferral.  ``lookup`` is injected: ``dns_lookup`` (dnspython) in
production, a dictionary in tests -- the tests never touch real DNS.
"""
from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.mail.outcome import Outcome
from spool.queue import BOUNCED, DEFERRED

SMTP_PORT = 25


class NoSuchDomain(Exception):
    """NXDOMAIN: the domain does not exist."""


class NoRecords(Exception):
    """The domain exists but has no record of that type."""


class LookupFailed(Exception):
    """Timeout, SERVFAIL, no name servers: try again later."""


# (domain, "MX") -> [(preference, exchange), ...]
Lookup = Callable[[str, str], Awaitable[list[tuple[int, str]]]]


@dataclass(frozen=True)
class Plan:
    hosts: tuple[str, ...] = ()
    failure: Outcome | None = None  # set when no host can be tried


async def plan(domain: str, lookup: Lookup, rng: random.Random | None = None) -> Plan:
    rng = rng or random.Random()
    domain = domain.lower().rstrip(".")
    try:
        records = await lookup(domain, "MX")
    except NoSuchDomain:
        return Plan(failure=Outcome(BOUNCED, 550, "5.1.2", f"domain {domain} does not exist (DNS NXDOMAIN)"))
    except NoRecords:
        return Plan(hosts=(domain,))  # implicit MX: the domain's own address records
    except LookupFailed as exc:
        return Plan(failure=Outcome(DEFERRED, 451, "4.4.3", f"DNS lookup of MX for {domain} failed: {exc}"))
    if not records:
        return Plan(hosts=(domain,))
    hosts = [(pref, host.lower().rstrip(".")) for pref, host in records]
    if any(host in ("", "@") for _, host in hosts):
        return Plan(failure=Outcome(BOUNCED, 556, "5.1.10", f"domain {domain} does not accept mail (null MX)"))
    by_pref: dict[int, list[str]] = {}
    for pref, host in hosts:
        by_pref.setdefault(pref, []).append(host)
    ordered: list[str] = []
    for pref in sorted(by_pref):
        group = by_pref[pref]
        rng.shuffle(group)
        ordered += [h for h in group if h not in ordered]
    return Plan(hosts=tuple(ordered))


def dns_resolver(resolver=None, lifetime: float = 30.0) -> Lookup:
    """A ``Lookup`` on dnspython (the system's resolver unless one is given), mapped onto
    the three outcomes ``plan`` knows."""
    import dns.asyncresolver
    import dns.exception
    import dns.resolver

    async def lookup(domain: str, rdtype: str) -> list[tuple[int, str]]:
        r = resolver or dns.asyncresolver.get_default_resolver()
        try:
            answer = await r.resolve(domain, rdtype, lifetime=lifetime)
        except dns.resolver.NXDOMAIN:
            raise NoSuchDomain(domain) from None
        except dns.resolver.NoAnswer:
            raise NoRecords(domain) from None
        except dns.exception.DNSException as exc:
            raise LookupFailed(str(exc) or type(exc).__name__) from None
        return [(rr.preference, rr.exchange.to_text(omit_final_dot=True)) for rr in answer]
    return lookup


async def dns_lookup(domain: str, rdtype: str) -> list[tuple[int, str]]:
    """The production lookup: the system's resolver."""
    return await dns_resolver()(domain, rdtype)
