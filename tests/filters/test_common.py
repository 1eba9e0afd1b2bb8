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
