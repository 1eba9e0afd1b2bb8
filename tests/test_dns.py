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


# --------------------------------------------------------------------------
# Lookups on the reactor: dnspython's resolution logic, Twisted's sockets, no thread


class NoThreads:
    """A ``threads`` that fails the test if a lookup needs a thread."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def run(self, name: str, fn: Any, *args: Any) -> Any:
        raise AssertionError(f"a lookup went to the {name!r} thread pool")


def _reactor_resolver(dns_server: Any, **kw: Any) -> DNSResolver:
    from twisted.internet import reactor

    servers = kw.pop("nameservers", [("127.0.0.1", dns_server.port)])
    config = DNSSection(nameservers=servers, timeout=kw.pop("timeout", 1.0), **kw)
    return DNSResolver(config, NoThreads(reactor))


@pytest_twisted.inlineCallbacks
def test_lookups_run_on_the_reactor_without_a_thread(dns_server: Any) -> Any:
    dns_server.set({"example.test": {"A": ["127.0.0.2"], "TXT": ["hello"]}})
    resolver = _reactor_resolver(dns_server)
    a = yield resolver.lookup("example.test", "A")
    assert [r.address for r in a.records] == ["127.0.0.2"]
    missing = yield resolver.lookup("nope.example.test", "TXT")
    assert missing.nxdomain and not missing
    nodata = yield resolver.lookup("example.test", "MX")
    assert not nodata.nxdomain and not nodata
    with pytest.raises(TemporaryFailure):
        dns_server.set({"slow.example.test": {"TIMEOUT": True}})
        yield resolver.lookup("slow.example.test", "A")


@pytest.mark.parametrize("dnssec", [True, False], ids=["dnspython", "c-ares"])
@pytest_twisted.inlineCallbacks
def test_truncated_udp_answer_is_asked_again_over_tcp(dns_server: Any, dnssec: bool) -> Any:
    # 12 strings of 200 bytes: far over the 1232-byte EDNS payload the resolver offers.
    strings = [f"{i:02d}" + "x" * 198 for i in range(12)]
    dns_server.set({"big.example.test": {"TXT": [strings]}})
    resolver = _reactor_resolver(dns_server)
    answer = yield resolver.lookup("big.example.test", "TXT", dnssec=dnssec)
    assert [s.decode() for s in answer.records[0].strings] == strings


@pytest.mark.parametrize("dnssec", [True, False], ids=["dnspython", "c-ares"])
@pytest_twisted.inlineCallbacks
def test_a_nameserver_that_refuses_is_skipped(dns_server: Any, dnssec: bool) -> Any:
    import socket

    dns_server.set({"example.test": {"A": ["127.0.0.2"]}})
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()  # nothing listens there: ICMP port unreachable
    resolver = _reactor_resolver(
        dns_server, nameservers=[("127.0.0.1", dead_port), ("127.0.0.1", dns_server.port)]
    )
    a = yield resolver.lookup("example.test", "A", dnssec=dnssec)
    assert [r.address for r in a.records] == ["127.0.0.2"]
    only_dead = _reactor_resolver(dns_server, nameservers=[("127.0.0.1", dead_port)])
    with pytest.raises(TemporaryFailure):
        yield only_dead.lookup("example.test", "A", dnssec=dnssec)


@pytest_twisted.inlineCallbacks
def test_answers_and_nxdomain_are_cached_and_shared_with_blocking_lookups(
    dns_server: Any,
) -> Any:
    from twisted.internet import threads

    dns_server.set({"example.test": {"A": ["127.0.0.2"]}})
    resolver = _reactor_resolver(dns_server)
    first = yield resolver.lookup("example.test", "A")
    missing = yield resolver.lookup("gone.example.test", "A")
    assert missing.nxdomain
    # The server changes its mind; the cached answers (TTL 60 s) are kept.
    dns_server.set(
        {"example.test": {"A": ["127.0.0.3"]}, "gone.example.test": {"A": ["127.0.0.4"]}}
    )
    again = yield resolver.lookup("example.test", "A")
    assert [r.address for r in again.records] == [r.address for r in first.records]
    still_missing = yield resolver.lookup("gone.example.test", "A")
    assert still_missing.nxdomain
    blocking = yield threads.deferToThread(resolver.lookup_blocking, "example.test", "A")
    assert [r.address for r in blocking.records] == ["127.0.0.2"]
    # Without a cache every lookup asks the server.
    uncached = _reactor_resolver(dns_server, cache_size=0)
    fresh = yield uncached.lookup("example.test", "A")
    assert [r.address for r in fresh.records] == ["127.0.0.3"]
    dns_server.set({"example.test": {"A": ["127.0.0.5"]}})
    fresher = yield uncached.lookup("example.test", "A")
    assert [r.address for r in fresher.records] == ["127.0.0.5"]


@pytest_twisted.inlineCallbacks
def test_the_timeout_is_the_whole_lookup_time(dns_server: Any) -> Any:
    import time

    dns_server.set({"slow.example.test": {"TIMEOUT": True}})
    resolver = _reactor_resolver(
        dns_server,
        timeout=0.5,
        nameservers=[("127.0.0.1", dns_server.port), ("127.0.0.1", dns_server.port)],
    )
    started = time.monotonic()
    with pytest.raises(TemporaryFailure):
        yield resolver.lookup("slow.example.test", "A")
    assert 0.4 < time.monotonic() - started < 1.5


@pytest_twisted.inlineCallbacks
def test_bad_names_are_nxdomain_on_the_reactor_too(dns_server: Any) -> Any:
    resolver = _reactor_resolver(dns_server)
    answer = yield resolver.lookup("a" * 70 + ".example.test", "A")
    assert answer.nxdomain


def test_the_service_thread_pools_give_the_resolver_its_reactor(resolver: DNSResolver) -> None:
    from twisted.internet import reactor

    assert resolver.reactor is reactor


def test_nameservers_given_as_addresses_are_queried_from_the_reactor() -> None:
    """The system's resolv.conf gives address strings (plain DNS); DoH URLs and TSIG do not."""
    import dns.resolver
    import dns.tsigkeyring

    from mailserv.dns import _reactor_capable

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1", "::1"]
    assert _reactor_capable(resolver)
    resolver.nameservers = ["127.0.0.1", "https://dns.example.test/dns-query"]
    assert not _reactor_capable(resolver)
    resolver.nameservers = ["127.0.0.1"]
    resolver.use_tsig(dns.tsigkeyring.from_text({"key.": "c2VjcmV0"}), "key.")
    assert not _reactor_capable(resolver)


@pytest_twisted.inlineCallbacks
def test_a_cname_answer_is_read_on_the_reactor_as_by_the_blocking_resolver(
    dns_server: Any,
) -> Any:
    from twisted.internet import threads

    dns_server.set(
        {
            "www.example.test": {"CNAME": ["example.test"]},
            "example.test": {"A": ["127.0.0.2"]},
        }
    )
    resolver = _reactor_resolver(dns_server, cache_size=0)
    answer = yield resolver.lookup("www.example.test", "A")
    blocking = yield threads.deferToThread(resolver.lookup_blocking, "www.example.test", "A")
    # The test server answers the CNAME alone (it does not chase it), and both paths make the
    # same Answer of that response (dnspython's chaining rules).
    assert answer == blocking
    assert not answer.nxdomain


# --------------------------------------------------------------------------
# Plain lookups (``dnssec=False``): A, AAAA and TXT through c-ares (pycares) on the reactor,
# the DNS messages made and read in C; everything else, and DNSSEC, through dnspython.


def _plain_resolver(dns_server: Any, **kw: Any) -> DNSResolver:
    resolver = _reactor_resolver(dns_server, **kw)
    assert resolver.plain is not None  # c-ares drives the plain lookups
    return resolver


@pytest_twisted.inlineCallbacks
def test_plain_lookups_answer_a_aaaa_and_txt_without_a_thread(dns_server: Any) -> Any:
    dns_server.set(
        {
            "example.test": {
                "A": ["127.0.0.2", "127.0.0.3"],
                "AAAA": ["::1"],
                "TXT": ["v=spf1 -all", ["two ", "strings"]],
                "MX": [[10, "mx.example.test"]],
            }
        }
    )
    resolver = _plain_resolver(dns_server)
    a = yield resolver.lookup("example.test", "A", dnssec=False)
    assert sorted(r.address for r in a.records) == ["127.0.0.2", "127.0.0.3"]
    assert (a.name, a.rdtype, a.nxdomain, a.authenticated) == ("example.test", "A", False, False)
    aaaa = yield resolver.lookup("example.test", "AAAA", dnssec=False)
    assert [r.address for r in aaaa.records] == ["::1"]
    txt = yield resolver.lookup("example.test", "TXT", dnssec=False)
    assert sorted(r.strings for r in txt.records) == [(b"two ", b"strings"), (b"v=spf1 -all",)]
    # Other types go through dnspython, as before.
    mx = yield resolver.lookup("example.test", "MX", dnssec=False)
    assert [(r.preference, r.exchange.to_text()) for r in mx.records] == [(10, "mx.example.test.")]


@pytest_twisted.inlineCallbacks
def test_plain_nxdomain_and_nodata_are_answers(dns_server: Any) -> Any:
    dns_server.set({"example.test": {"A": ["127.0.0.2"]}})
    resolver = _plain_resolver(dns_server)
    missing = yield resolver.lookup("nope.example.test", "TXT", dnssec=False)
    assert missing.nxdomain and not missing
    nodata = yield resolver.lookup("example.test", "AAAA", dnssec=False)
    assert not nodata.nxdomain and not nodata


@pytest_twisted.inlineCallbacks
def test_plain_lookup_of_a_server_that_never_answers_fails_after_the_timeout(
    dns_server: Any,
) -> Any:
    import socket
    import time

    from twisted.internet import reactor, task

    dns_server.set({"slow.example.test": {"TIMEOUT": True}, "example.test": {"A": ["127.0.0.2"]}})
    resolver = _plain_resolver(dns_server, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(TemporaryFailure):
        yield resolver.lookup("slow.example.test", "A", dnssec=False)
    assert 0.4 < time.monotonic() - started < 1.5
    # The channel still answers afterwards.
    a = yield resolver.lookup("example.test", "A", dnssec=False)
    assert [r.address for r in a.records] == ["127.0.0.2"]

    # Two nameservers: the timeout is the whole lookup's, as for dnspython's lifetime.
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # takes queries, never answers
    silent.bind(("127.0.0.1", 0))
    resolver = _plain_resolver(
        dns_server, timeout=0.5, nameservers=[("127.0.0.1", dns_server.port), silent.getsockname()]
    )
    started = time.monotonic()
    with pytest.raises(TemporaryFailure):
        yield resolver.lookup("slow.example.test", "A", dnssec=False)
    assert 0.4 < time.monotonic() - started < 1.5
    # c-ares gives up on the unanswered query too (after its try of the second nameserver)
    # and closes its sockets: nothing is left for the reactor to watch.
    yield task.deferLater(reactor, 1.2, lambda: None)
    silent.close()
    assert resolver.plain is not None
    assert resolver.plain.orphans == 0 and not resolver.plain.watched


@pytest_twisted.inlineCallbacks
def test_plain_answers_are_cached_for_their_ttl_and_not_without_a_cache(
    dns_server: Any, monkeypatch: pytest.MonkeyPatch
) -> Any:
    import mailserv.dns

    dns_server.set({"example.test": {"A": ["127.0.0.2"]}})
    resolver = _plain_resolver(dns_server)
    first = yield resolver.lookup("example.test", "A", dnssec=False)
    missing = yield resolver.lookup("gone.example.test", "A", dnssec=False)
    assert missing.nxdomain
    dns_server.set(
        {"example.test": {"A": ["127.0.0.3"]}, "gone.example.test": {"A": ["127.0.0.4"]}}
    )
    d = resolver.lookup("example.test", "A", dnssec=False)
    assert d.called  # from the cache, on the spot
    again = yield d
    assert again == first and resolver.cached("example.test", "A") == first
    assert (yield resolver.lookup("gone.example.test", "A", dnssec=False)).nxdomain
    # The TTL (60 s) runs out: the server is asked again.
    now = mailserv.dns.monotonic()
    monkeypatch.setattr(mailserv.dns, "monotonic", lambda: now + 61)
    assert resolver.cached("example.test", "A") is None
    fresh = yield resolver.lookup("example.test", "A", dnssec=False)
    assert [r.address for r in fresh.records] == ["127.0.0.3"]
    monkeypatch.undo()
    # Without a cache every lookup asks the server (c-ares's own query cache is off too).
    uncached = _plain_resolver(dns_server, cache_size=0)
    fresh = yield uncached.lookup("example.test", "A", dnssec=False)
    assert [r.address for r in fresh.records] == ["127.0.0.3"]
    dns_server.set({"example.test": {"A": ["127.0.0.5"]}})
    fresher = yield uncached.lookup("example.test", "A", dnssec=False)
    assert [r.address for r in fresher.records] == ["127.0.0.5"]
    assert uncached.cached("example.test", "A") is None


@pytest_twisted.inlineCallbacks
def test_plain_bad_names_are_nxdomain(dns_server: Any) -> Any:
    resolver = _plain_resolver(dns_server)
    answer = yield resolver.lookup("a" * 70 + ".example.test", "A", dnssec=False)
    assert answer.nxdomain
    answer = yield resolver.lookup(".".join(["a" * 60] * 5), "TXT", dnssec=False)
    assert answer.nxdomain


@pytest_twisted.inlineCallbacks
def test_plain_cname_answers_are_read_as_dnspython_reads_them(dns_server: Any) -> Any:
    dns_server.set(
        {
            "www.example.test": {"CNAME": ["example.test"]},
            "example.test": {"A": ["127.0.0.2"]},
        }
    )
    resolver = _plain_resolver(dns_server, cache_size=0)
    plain = yield resolver.lookup("www.example.test", "A", dnssec=False)
    full = yield resolver.lookup("www.example.test", "A")
    assert plain.records == full.records == () and not plain.nxdomain and not full.nxdomain


@pytest_twisted.inlineCallbacks
def test_plain_lookups_follow_a_reload(dns_server: Any) -> Any:
    from twisted.internet import reactor

    from mailserv.dns import DNSResolver
    from tests.conftest import DNSServer

    dns_server.set({"example.test": {"A": ["127.0.0.2"]}})
    (dns_server.zones.parent / "other").mkdir()
    other = DNSServer(dns_server.zones.parent / "other")
    try:
        other.set({"example.test": {"A": ["127.0.0.9"]}})
        resolver = _plain_resolver(dns_server)
        a = yield resolver.lookup("example.test", "A", dnssec=False)
        assert [r.address for r in a.records] == ["127.0.0.2"]

        class Config:
            dns = DNSSection(nameservers=[("127.0.0.1", other.port)], timeout=1.0)

        resolver.reload(Config())
        assert isinstance(resolver, DNSResolver) and resolver.reactor is reactor
        b = yield resolver.lookup("example.test", "A", dnssec=False)
        assert [r.address for r in b.records] == ["127.0.0.9"]
    finally:
        other.stop()


@pytest_twisted.inlineCallbacks
def test_plain_lookups_of_international_names_use_idna_as_dnspython_does(
    dns_server: Any,
) -> Any:
    dns_server.set({"xn--bcher-kva.example.test": {"A": ["127.0.0.7"]}})
    resolver = _plain_resolver(dns_server)
    a = yield resolver.lookup("bücher.example.test", "A", dnssec=False)
    assert [r.address for r in a.records] == ["127.0.0.7"]


@pytest_twisted.inlineCallbacks
def test_plain_lookups_keep_their_socket_until_the_channel_is_idle(
    dns_server: Any, monkeypatch: pytest.MonkeyPatch
) -> Any:
    from twisted.internet import reactor, task

    import mailserv.dns

    monkeypatch.setattr(mailserv.dns, "IDLE_CLOSE", 0.3)
    dns_server.set({"example.test": {"A": ["127.0.0.2"]}})
    resolver = _plain_resolver(dns_server, cache_size=0)
    plain = resolver.plain
    assert plain is not None
    yield resolver.lookup("example.test", "A", dnssec=False)
    sockets = dict(plain.watched)
    assert len(sockets) == 1  # kept open between queries (one per nameserver)
    yield resolver.lookup("example.test", "A", dnssec=False)
    assert plain.watched == sockets
    yield task.deferLater(reactor, 0.5, lambda: None)
    assert not plain.watched  # idle: closed, with a fresh channel for the next lookup
    a = yield resolver.lookup("example.test", "A", dnssec=False)
    assert [r.address for r in a.records] == ["127.0.0.2"] and len(plain.watched) == 1


@pytest_twisted.inlineCallbacks
def test_a_plain_answer_that_cannot_be_read_fails_the_lookup_at_once(
    dns_server: Any, monkeypatch: pytest.MonkeyPatch
) -> Any:
    import time

    import mailserv.dns

    def broken(*args: Any) -> Any:
        raise ValueError("unreadable")

    dns_server.set({"example.test": {"A": ["127.0.0.2"]}})
    resolver = _plain_resolver(dns_server, timeout=5.0)
    monkeypatch.setattr(mailserv.dns, "read_answer", broken)
    started = time.monotonic()
    with pytest.raises(ValueError):
        yield resolver.lookup("example.test", "A", dnssec=False)
    assert time.monotonic() - started < 1.0  # not left to the 5 s timeout


def test_without_c_ares_callbacks_plain_lookups_use_dnspython(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where cffi cannot make the C callback (no executable memory for its closure), the plain
    lookups go through dnspython like the others."""
    from twisted.internet import reactor

    import mailserv.dns

    monkeypatch.setattr(mailserv.dns, "_answered", None)
    config = DNSSection(nameservers=[("127.0.0.1", 53)], timeout=1.0)
    assert DNSResolver(config, NoThreads(reactor)).plain is None


@pytest.mark.parametrize("dnssec", [True, False], ids=["dnspython", "c-ares"])
@pytest.mark.parametrize("rcode", ["SERVFAIL", "REFUSED"])
@pytest_twisted.inlineCallbacks
def test_a_nameserver_answering_servfail_or_refused_is_a_temporary_failure(
    dns_server: Any, dnssec: bool, rcode: str
) -> Any:
    """Not NXDOMAIN, not NODATA: SPF's temperror, DMARC's and DNSBL's tempfail rely on it."""
    import dns.message
    import dns.rcode
    from twisted.internet import reactor
    from twisted.internet.protocol import DatagramProtocol

    class Failing(DatagramProtocol):
        def datagramReceived(self, data: bytes, addr: Any) -> None:
            response = dns.message.make_response(dns.message.from_wire(data))
            response.set_rcode(dns.rcode.from_text(rcode))
            assert self.transport is not None
            self.transport.write(response.to_wire(), addr)

    port = reactor.listenUDP(0, Failing(), interface="127.0.0.1")
    try:
        resolver = _reactor_resolver(
            dns_server, nameservers=[("127.0.0.1", port.getHost().port)], timeout=2.0
        )
        with pytest.raises(TemporaryFailure):
            yield resolver.lookup("example.test", "TXT", dnssec=dnssec)
    finally:
        yield port.stopListening()
