"""mailserv.dns against the real loopback DNS server: answers, NXDOMAIN, NODATA, timeouts."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from mailserv.config.sections import DNSSection
from mailserv.dns import DNSResolver
from mailserv.errors import TemporaryFailure
from mailserv.threads import ThreadPools


@pytest.fixture
def resolver(dns_server: Any) -> Any:
    from twisted.internet import reactor

    pools = ThreadPools(reactor, {"dns": 2})
    config = DNSSection(nameservers=[("127.0.0.1", dns_server.port)], timeout=1.0)
    yield DNSResolver(config, pools)
    pools.stopService()


@pytest_twisted.inlineCallbacks
def test_mx_a_and_txt_answers(dns_server: Any, resolver: DNSResolver) -> Any:
    dns_server.set(
        {
            "example.test": {
                "MX": [[10, "mx1.example.test"], [20, "mx2.example.test"]],
                "TXT": ["v=spf1 ip4:127.0.0.1 -all"],
            },
            "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
        }
    )
    mx = yield resolver.lookup("example.test", "MX")
    assert sorted((r.preference, r.exchange.to_text()) for r in mx.records) == [
        (10, "mx1.example.test."),
        (20, "mx2.example.test."),
    ]
    a = yield resolver.lookup("mx1.example.test", "A")
    assert [r.address for r in a.records] == ["127.0.0.2"]
    aaaa = yield resolver.lookup("mx1.example.test", "AAAA")
    assert [r.address for r in aaaa.records] == ["::1"]
    txt = yield resolver.lookup("example.test", "TXT")
    assert [b"".join(r.strings) for r in txt.records] == [b"v=spf1 ip4:127.0.0.1 -all"]


@pytest_twisted.inlineCallbacks
def test_nxdomain_and_nodata_are_answers(dns_server: Any, resolver: DNSResolver) -> Any:
    dns_server.set({"example.test": {"A": ["127.0.0.2"]}})
    missing = yield resolver.lookup("nope.example.test", "A")
    assert missing.nxdomain and not missing
    nodata = yield resolver.lookup("example.test", "MX")
    assert not nodata.nxdomain and not nodata


@pytest_twisted.inlineCallbacks
def test_timeout_is_a_temporary_failure(dns_server: Any, resolver: DNSResolver) -> Any:
    dns_server.set({"slow.example.test": {"TIMEOUT": True}})
    with pytest.raises(TemporaryFailure):
        yield resolver.lookup("slow.example.test", "A")
