"""MX resolution (RFC 5321 §5.1, RFC 7505) with an in-memory resolver."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest
from twisted.internet import defer

from mailserv.dns import DNSAnswer
from mailserv.errors import SMTPReply, TemporaryFailure
from mailserv.queue.mx import MXResolver, usable_address


@dataclass
class MX:
    preference: int
    exchange: str


@dataclass
class A:
    address: str


class Zone:
    """name -> rdtype -> records; a missing name is NXDOMAIN; "FAIL" raises TemporaryFailure."""

    def __init__(self, data: dict[str, dict[str, Any]]) -> None:
        self.data = data
        self.queries: list[tuple[str, str]] = []

    def lookup(self, name: str, rdtype: str) -> defer.Deferred[DNSAnswer]:
        self.queries.append((name, rdtype))
        zone = self.data.get(name)
        if zone is None:
            return defer.succeed(DNSAnswer(name, rdtype, nxdomain=True))
        if zone.get(rdtype) == "FAIL":
            return defer.fail(TemporaryFailure(f"{name} {rdtype} timed out"))
        return defer.succeed(DNSAnswer(name, rdtype, tuple(zone.get(rdtype, ()))))


def resolve(zone: Zone, domain: str, **kw: Any) -> Any:
    d = MXResolver(zone, **kw).resolve(domain)
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the fake resolver answers synchronously"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


ZONE = {
    "d.test": {"MX": [MX(20, "b.d.test."), MX(10, "a1.d.test."), MX(10, "a2.d.test.")]},
    "a1.d.test": {"A": [A("192.0.2.1")], "AAAA": [A("2001:db8::1")]},
    "a2.d.test": {"A": [A("192.0.2.2")]},
    "b.d.test": {"A": [A("192.0.2.3")]},
}


def test_preference_order_and_random_among_equals() -> None:
    orders = set()
    for seed in range(20):
        route = resolve(Zone(ZONE), "d.test", rng=random.Random(seed))
        names = [h.name for h in route.hosts]
        assert names[-1] == "b.d.test"
        orders.add(tuple(names[:2]))
    assert orders == {("a1.d.test", "a2.d.test"), ("a2.d.test", "a1.d.test")}


def test_ipv6_and_ipv4_addresses_in_preferred_order() -> None:
    route = resolve(Zone(ZONE), "d.test", rng=random.Random(1))
    host = next(h for h in route.hosts if h.name == "a1.d.test")
    assert host.addresses == ["2001:db8::1", "192.0.2.1"]
    route = resolve(Zone(ZONE), "d.test", ipv6_first=False, rng=random.Random(1))
    host = next(h for h in route.hosts if h.name == "a1.d.test")
    assert host.addresses == ["192.0.2.1", "2001:db8::1"]


def test_implicit_mx_when_there_is_no_mx() -> None:
    route = resolve(Zone({"d.test": {"A": [A("192.0.2.9")]}}), "d.test")
    assert route.implicit and [(h.name, h.addresses) for h in route.hosts] == [
        ("d.test", ["192.0.2.9"])
    ]


def test_nxdomain_and_no_address_bounce() -> None:
    with pytest.raises(SMTPReply) as info:
        resolve(Zone({}), "nowhere.test")
    assert (info.value.code, info.value.enhanced) == (550, "5.1.2")
    with pytest.raises(SMTPReply):
        resolve(Zone({"d.test": {"TXT": ["x"]}}), "d.test")


def test_null_mx_bounces_and_never_resolves_a_host() -> None:
    zone = Zone({"d.test": {"MX": [MX(0, ".")], "A": [A("192.0.2.1")]}})
    with pytest.raises(SMTPReply) as info:
        resolve(zone, "d.test")
    assert (info.value.code, info.value.enhanced) == (556, "5.1.10")
    assert zone.queries == [("d.test", "MX")]


def test_unusable_addresses_are_never_used() -> None:
    """Defect 7: an MX pointing at 0.0.0.0 must not become a connection to 0.0.0.0."""
    for bad in ("0.0.0.0", "::", "224.0.0.1", "255.255.255.255", "240.0.0.1", "ff02::1"):
        assert not usable_address(bad), bad
    zone = Zone({"d.test": {"MX": [MX(10, "z.d.test")]}, "z.d.test": {"A": [A("0.0.0.0")]}})
    with pytest.raises(TemporaryFailure):
        resolve(zone, "d.test")


def test_dns_failure_is_temporary() -> None:
    with pytest.raises(TemporaryFailure):
        resolve(Zone({"d.test": {"MX": "FAIL"}}), "d.test")
    zone = Zone({"d.test": {"MX": [MX(10, "m.d.test")]}, "m.d.test": {"A": "FAIL", "AAAA": "FAIL"}})
    with pytest.raises(TemporaryFailure):
        resolve(zone, "d.test")


def test_own_address_drops_itself_and_worse_mx() -> None:
    own = {"192.0.2.3"}.__contains__
    route = resolve(Zone(ZONE), "d.test", is_own=own)
    assert sorted(h.name for h in route.hosts) == ["a1.d.test", "a2.d.test"]
    own = {"192.0.2.2"}.__contains__
    with pytest.raises(SMTPReply) as info:
        resolve(Zone(ZONE), "d.test", is_own=own)
    assert info.value.enhanced == "5.4.6"  # we are a best MX: loops back to myself


def test_address_literal() -> None:
    route = resolve(Zone({}), "[192.0.2.7]")
    assert route.hosts[0].addresses == ["192.0.2.7"]
    with pytest.raises(SMTPReply):
        resolve(Zone({}), "[0.0.0.0]")
