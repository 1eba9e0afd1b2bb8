"""The filter chain: runs the filters of a pipeline stage by stage.

Each filter call gets its own deadline; a filter that times out, raises or
returns something that is not a Verdict gives TEMPFAIL (451 4.3.0) and a
logged failure: the chain fails closed (ARCHITECTURE.md "Filters").  The
first verdict other than CONTINUE ends the stage; headers of every filter
that spoke are collected in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailserv.filters.base import FILTER_FAILURE, Action, StageResult, Verdict
from mailserv.interfaces import (
    IConnectionFilter,
    IHeloFilter,
    IMessageFilter,
    IRecipientFilter,
    ISenderFilter,
)

log = Logger()

STAGES = {
    "connect": (IConnectionFilter, "check_connect"),
    "helo": (IHeloFilter, "check_helo"),
    "sender": (ISenderFilter, "check_sender"),
    "recipient": (IRecipientFilter, "check_recipient"),
    "message": (IMessageFilter, "check_message"),
}


def _filter_name(flt: Any) -> str:
    return str(getattr(flt, "name", type(flt).__name__))


class FilterChain:
    """An ordered list of filters, run per stage with per-filter timeouts."""

    def __init__(self, filters: Sequence[Any], reactor: Any, name: str = "") -> None:
        self.name = name
        self.filters = list(filters)
        self._reactor = reactor
        self._by_stage = {
            stage: [f for f in self.filters if iface.providedBy(f)]
            for stage, (iface, _m) in STAGES.items()
        }

    def __add__(self, other: FilterChain) -> FilterChain:
        return FilterChain(self.filters + other.filters, self._reactor, other.name or self.name)

    def has_stage(self, stage: str) -> bool:
        return bool(self._by_stage[stage])

    def connect(self, session: Any) -> defer.Deferred[StageResult]:
        return self.run("connect", session)

    def helo(self, session: Any) -> defer.Deferred[StageResult]:
        return self.run("helo", session)

    def sender(self, session: Any, envelope: Any) -> defer.Deferred[StageResult]:
        return self.run("sender", session, envelope)

    def recipient(self, session: Any, envelope: Any, rcpt: Any) -> defer.Deferred[StageResult]:
        return self.run("recipient", session, envelope, rcpt)

    def message(self, session: Any, envelope: Any, message: Any) -> defer.Deferred[StageResult]:
        return self.run("message", session, envelope, message)

    def run(self, stage: str, *args: Any) -> defer.Deferred[StageResult]:
        """Run ``stage`` over the filters that implement it; Deferred[StageResult]."""
        if not self._by_stage[stage]:
            return defer.succeed(StageResult())
        return self._run(stage, *args)

    @defer.inlineCallbacks
    def _run(self, stage: str, *args: Any) -> Any:
        result = StageResult()
        method_name = STAGES[stage][1]
        for flt in self._by_stage[stage]:
            verdict = yield self._call(flt, method_name, args)
            if verdict.action is not Action.CONTINUE or verdict.headers:
                result.trail.append(f"{verdict.filter}:{verdict.action.value}")
            result.headers.extend(verdict.headers)
            if verdict.final:
                result.verdict = verdict
                break
        return result

    def _call(self, flt: Any, method_name: str, args: tuple[Any, ...]) -> defer.Deferred[Verdict]:
        name = _filter_name(flt)
        timeout = float(getattr(flt, "timeout", 10.0))
        d = defer.maybeDeferred(getattr(flt, method_name), *args)
        if not d.called:  # a filter that answered at once needs no timer
            d.addTimeout(timeout, self._reactor)

        def check(value: Any) -> Verdict:
            if not isinstance(value, Verdict):
                raise TypeError(f"filter {name} returned {type(value).__name__}, not a Verdict")
            if not value.filter:
                value = Verdict(value.action, value.reply, value.headers, value.reason, name)
            return value

        def failed(failure: Failure) -> Verdict:
            log.failure(
                "filter {filter} failed at {stage}; failing closed",
                failure,
                filter=name,
                stage=method_name,
            )
            return Verdict(Action.TEMPFAIL, FILTER_FAILURE, reason="filter failure", filter=name)

        d.addCallback(check)
        d.addErrback(failed)
        return d


EMPTY_CHAIN_NAME = "(none)"


def empty_chain(reactor: Any) -> FilterChain:
    return FilterChain([], reactor, EMPTY_CHAIN_NAME)
