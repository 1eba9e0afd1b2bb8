"""The filter chain: runs the filters of a pipeline stage by stage.

Each filter call gets its own deadline; a filter that times out, raises or
returns something that is not a Verdict gives TEMPFAIL (451 4.3.0) and a
logged failure: the chain fails closed (ARCHITECTURE.md "Filters").  The
first verdict other than CONTINUE ends the stage; headers of every filter
that spoke are collected in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from inspect import iscoroutine
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailserv.filters.base import FILTER_FAILURE, Action, StageResult, Verdict
from mailserv.filters.common import start_jobs
from mailserv.interfaces import (
    IConnectionFilter,
    IHeloFilter,
    IMessageFilter,
    IRecipientFilter,
    ISenderFilter,
)

log = Logger()
_CONTINUE = Action.CONTINUE

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
        """``self``'s filters then ``other``'s, except filters with ``runs_first = True``.

        Those go before all others, in their order: a listener's chain is its
        built-in policy filters (relay control, recipient existence) plus its
        pipeline, and a spam trap must see RCPT to trap addresses that are no
        user and maybe no local domain before the policy refuses them
        (as Postfix puts check_recipient_access before reject_unauth_destination).
        """
        both = self.filters + other.filters
        first = [f for f in both if getattr(f, "runs_first", False)]
        rest = [f for f in both if not getattr(f, "runs_first", False)]
        return FilterChain(first + rest, self._reactor, other.name or self.name)

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
        """Run ``stage`` over the filters that implement it; Deferred[StageResult].

        Filters that answer at once (a Verdict, not a Deferred) are run in a
        plain loop: no Deferred, generator or timer per call.  The first
        filter that returns a Deferred gets its timeout and the rest of the
        stage continues when it fires.
        """
        filters = self._by_stage[stage]
        if not filters:
            return defer.succeed(StageResult())
        result = StageResult()
        if stage == "message":
            self._start_jobs(filters, *args)
        pending = self._loop(filters, 0, STAGES[stage][1], args, result)
        if pending is None:
            return defer.succeed(result)
        return pending

    @staticmethod
    def _start_jobs(filters: list[Any], session: Any, envelope: Any, message: Any) -> None:
        """Start the blocking work of the message stage's filters.

        A filter with ``message_job(session, envelope, message)`` returns a
        job (or None, or a Deferred of a job); mailserv.filters.common.start_jobs
        runs them on the reactor within the inline budget, the others in one
        ``crypto`` pool job instead of one round trip each, and each filter
        awaits its own result under its own timeout.  A filter
        with ``prefetch(session, envelope, message)`` starts its lookups here,
        so that they overlap with those of the filters before it.
        """
        jobs: dict[str, Any] = {}
        threads = None
        for flt in filters:
            fetch = getattr(flt, "prefetch", None)
            if fetch is not None:  # DNS the filter will need, started now (DMARC's policy)
                try:
                    fetch(session, envelope, message)
                except Exception:  # the filter looks it up itself when it runs
                    log.failure("prefetch of {filter} failed", filter=_filter_name(flt))
            make = getattr(flt, "message_job", None)
            if make is None:
                continue
            try:
                job = make(session, envelope, message)
            except Exception:  # the filter meets the same problem when it runs
                log.failure("message job of {filter} not started", filter=_filter_name(flt))
                continue
            if job is not None:
                jobs[_filter_name(flt)] = job
                threads = threads or flt.threads
        if jobs:
            start_jobs(threads, session, envelope, jobs)

    def _loop(
        self,
        filters: list[Any],
        start: int,
        method_name: str,
        args: tuple[Any, ...],
        result: StageResult,
    ) -> defer.Deferred[StageResult] | None:
        """Run ``filters[start:]``; None when the stage finished synchronously."""
        for i in range(start, len(filters)):
            flt = filters[i]
            try:
                value = getattr(flt, method_name)(*args)
            except Exception:
                value = self._failed(Failure(), _filter_name(flt), method_name)
            if value.__class__ is Verdict and value.action is _CONTINUE and not value.headers:
                continue  # the common answer: nothing to record
            if iscoroutine(value):
                value = defer.Deferred.fromCoroutine(value)
            if isinstance(value, defer.Deferred):
                d = self._guard(value, flt, method_name)
                return d.addCallback(self._resume, filters, i, method_name, args, result)
            if self._take(self._checked(value, flt, method_name), result):
                return None
        return None

    def _resume(
        self,
        verdict: Verdict,
        filters: list[Any],
        i: int,
        method_name: str,
        args: tuple[Any, ...],
        result: StageResult,
    ) -> Any:
        if self._take(verdict, result):
            return result
        pending = self._loop(filters, i + 1, method_name, args, result)
        return result if pending is None else pending

    @staticmethod
    def _take(verdict: Verdict, result: StageResult) -> bool:
        """Add ``verdict`` to ``result``; True when it ends the stage."""
        if verdict.action is not Action.CONTINUE or verdict.headers:
            result.trail.append(f"{verdict.filter}:{verdict.action.value}")
        result.headers.extend(verdict.headers)
        if verdict.final:
            result.verdict = verdict
            return True
        return False

    def _checked(self, value: Any, flt: Any, method_name: str) -> Verdict:
        if isinstance(value, Verdict):
            if value.filter:
                return value
            name = _filter_name(flt)
            return Verdict(value.action, value.reply, value.headers, value.reason, name)
        if isinstance(value, Failure):
            return self._failed(value, _filter_name(flt), method_name)
        name = _filter_name(flt)
        try:
            raise TypeError(f"filter {name} returned {type(value).__name__}, not a Verdict")
        except TypeError:
            return self._failed(Failure(), name, method_name)

    def _guard(self, d: defer.Deferred[Any], flt: Any, method_name: str) -> defer.Deferred[Verdict]:
        """The filter's own deadline, the Verdict check and fail-closed, on its Deferred."""
        if not d.called:  # a filter that answered at once needs no timer
            d.addTimeout(float(getattr(flt, "timeout", 10.0)), self._reactor)
        d.addCallbacks(
            self._checked,
            self._failed,
            callbackArgs=(flt, method_name),
            errbackArgs=(_filter_name(flt), method_name),
        )
        return d

    @staticmethod
    def _failed(failure: Failure, name: str, method_name: str) -> Verdict:
        log.failure(
            "filter {filter} failed at {stage}; failing closed",
            failure,
            filter=name,
            stage=method_name,
        )
        return Verdict(Action.TEMPFAIL, FILTER_FAILURE, reason="filter failure", filter=name)


EMPTY_CHAIN_NAME = "(none)"


def empty_chain(reactor: Any) -> FilterChain:
    return FilterChain([], reactor, EMPTY_CHAIN_NAME)
