"""Shared filter plumbing: cached DNS answers on the spot, header quoting, results."""

from __future__ import annotations

from typing import Any

import pytest_twisted

from mailserv.filters.common import MethodResult, cached_answer, lookup, quote_value


@pytest_twisted.inlineCallbacks
def test_cached_answers_need_no_thread(filter_env: Any, dns_server: Any) -> Any:
    dns_server.set({"a.example.test": {"A": ["127.0.0.2"]}})
    resolver = filter_env.service.dns
    assert cached_answer(resolver, "a.example.test", "A") is None
    first = yield lookup(resolver, "a.example.test", "A")  # through the dns pool
    d = lookup(resolver, "a.example.test", "A")
    assert d.called  # answered from the cache, on the spot
    second = yield d
    assert [r.address for r in second.records] == [r.address for r in first.records]
    missing = yield lookup(resolver, "b.example.test", "A")
    assert missing.nxdomain
    d = lookup(resolver, "b.example.test", "A")
    assert d.called and (yield d).nxdomain


def test_values_and_comments_are_quoted_for_headers() -> None:
    assert quote_value("example.org") == "example.org"
    assert quote_value('a b"c') == '"a b\\"c"'
    assert quote_value("x\r\ny") == '"x??y"'
    result = MethodResult("spf", "fail", [("smtp.mailfrom", "evil (x).test")], "bad (really)")
    assert result.render() == 'spf=fail (bad \\(really\\)) smtp.mailfrom="evil (x).test"'


@pytest_twisted.inlineCallbacks
def test_filter_lookups_are_plain_lookups_through_c_ares(filter_env: Any, dns_server: Any) -> Any:
    """The filters never read the AD bit: A, AAAA and TXT go through c-ares (mailserv/dns.py)
    and its cache, which ``cached_answer`` reads; NXDOMAIN is an answer there too."""
    dns_server.set({"a.example.test": {"A": ["127.0.0.2"], "TXT": ["hello"]}})
    resolver = filter_env.service.dns
    txt = yield lookup(resolver, "a.example.test", "TXT")
    assert [r.strings for r in txt.records] == [(b"hello",)] and not txt.authenticated
    assert resolver.cached("a.example.test", "TXT") == txt
    assert cached_answer(resolver, "a.example.test", "TXT") == txt
    missing = yield lookup(resolver, "b.example.test", "A")
    assert missing.nxdomain and resolver.cached("b.example.test", "A") == missing


@pytest_twisted.inlineCallbacks
def test_dkim_keys_are_fetched_through_c_ares(filter_env: Any, dns_server: Any) -> Any:
    from mailserv.filters.dkim import fetch_keys

    dns_server.set({"sel._domainkey.example.test": {"TXT": ["v=DKIM1; p=abc"]}})
    resolver = filter_env.service.dns
    keys = yield fetch_keys(resolver, ["sel._domainkey.example.test"])
    answer = keys["sel._domainkey.example.test"]
    assert resolver.cached("sel._domainkey.example.test", "TXT") == answer
    assert fetch_keys(resolver, ["sel._domainkey.example.test"]) is None  # cached now


def test_gather_and_outcomes_match_twisteds_combinators_for_one_or_more_deferreds() -> None:
    from twisted.internet import defer
    from twisted.python.failure import Failure

    from mailserv.filters.common import gather, outcomes

    def result(d: Any) -> Any:
        out: list[Any] = []
        d.addBoth(out.append)
        return out[0]

    for values in ([1], [1, 2, 3]):
        ds = [defer.Deferred() for _ in values]
        gathered = gather(ds)
        for d, v in zip(ds, values, strict=True):
            d.callback(v)
        assert result(gathered) == values

    boom = Failure(ValueError("boom"))
    for n in (1, 2):
        ds = [defer.Deferred() for _ in range(n)]
        listed = outcomes(ds)
        ds[0].errback(boom)
        for d in ds[1:]:
            d.callback("ok")
        got = result(listed)
        assert got[0][0] is False and got[0][1].check(ValueError)
        assert got[1:] == [(True, "ok")] * (n - 1)
