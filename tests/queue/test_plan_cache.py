"""Deliverer.plan: concurrent deliveries to one domain share one set of lookups."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock

from mailserv.config.sections import QueueSection
from mailserv.errors import TemporaryFailure
from mailserv.queue.deliver import Deliverer
from mailserv.queue.mx import MXHost, MXRoute


class SlowMX:
    """An MX resolver whose answers arrive when the test says so; counts lookups."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.pending: list[defer.Deferred[MXRoute]] = []

    def resolve(self, domain: str) -> defer.Deferred[MXRoute]:
        self.calls.append(domain)
        d: defer.Deferred[MXRoute] = defer.Deferred()
        self.pending.append(d)
        return d


def deliverer(mx: Any) -> Deliverer:
    config = QueueSection()
    config.mta_sts = config.dane = False
    return Deliverer(config, "ms.example.test", mx, Clock(), None)


def test_concurrent_plans_for_one_domain_share_one_lookup() -> None:
    mx = SlowMX()
    d = deliverer(mx)
    first = defer.ensureDeferred(d.plan("remote.test"))
    second = defer.ensureDeferred(d.plan("remote.test"))
    other = defer.ensureDeferred(d.plan("other.test"))
    assert mx.calls == ["remote.test", "other.test"]
    route = MXRoute("remote.test", [MXHost("mx.remote.test", 10, ["127.0.0.2"])])
    mx.pending[0].callback(route)
    plans1, plans2 = first.result, second.result
    assert [p.host.name for p in plans1] == ["mx.remote.test"]
    assert plans2 == plans1
    assert not other.called
    # Cached afterwards: no further lookup.
    third = defer.ensureDeferred(d.plan("remote.test"))
    assert third.result == plans1 and len(mx.calls) == 2


def test_a_failed_plan_fails_every_waiter_and_is_not_cached() -> None:
    mx = SlowMX()
    d = deliverer(mx)
    first = defer.ensureDeferred(d.plan("remote.test"))
    second = defer.ensureDeferred(d.plan("remote.test"))
    mx.pending[0].errback(TemporaryFailure("DNS timeout"))
    for waiting in (first, second):
        failure = waiting.result
        waiting.addErrback(lambda _: None)
        assert failure.check(TemporaryFailure)
    defer.ensureDeferred(d.plan("remote.test"))
    assert mx.calls == ["remote.test", "remote.test"]
