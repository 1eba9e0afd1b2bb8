"""The filter chain: stages, verdicts, per-filter timeouts, fail-closed, pipelines from config."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer

from mailserv.address import Address
from mailserv.config import parse_config
from mailserv.envelope import Envelope, Message, Recipient, Session
from mailserv.errors import ConfigError, SMTPReply
from mailserv.filters.base import ACCEPT, CONTINUE, FILTER_FAILURE, Action, Verdict
from mailserv.filters.chain import FilterChain
from mailserv.filters.policy import MessageSize, RelayControl
from mailserv.filters.registry import build_filter, build_pipeline
from mailserv.interfaces import IMessageFilter, IRecipientFilter, ISenderFilter
from mailserv.testing import FakeSMTPService

SESSION = Session(id="s", listener="mx", protocol="smtp", peer_host="192.0.2.1")


def _envelope() -> Envelope:
    return Envelope(id="s.1", mail_from=Address("a", "remote.test"))


@implementer(ISenderFilter, IRecipientFilter)
class Fixed:
    def __init__(self, name: str, verdict: Any, timeout: float = 10.0) -> None:
        self.name = name
        self.verdict = verdict
        self.timeout = timeout
        self.calls = 0

    def check_sender(self, session: Any, envelope: Any) -> Any:
        self.calls += 1
        if isinstance(self.verdict, BaseException):
            raise self.verdict
        return self.verdict

    def check_recipient(self, session: Any, envelope: Any, rcpt: Any) -> Any:
        return self.check_sender(session, envelope)


def _run(chain: FilterChain) -> Any:
    results: list[Any] = []
    chain.sender(SESSION, _envelope()).addCallback(results.append)
    return results[0] if results else None


def test_first_final_verdict_wins_and_headers_accumulate() -> None:
    clock = Clock()
    a = Fixed("a", Verdict.cont(("X-A", "1")))
    b = Fixed("b", Verdict.reject(550, "5.7.1", "no"))
    c = Fixed("c", CONTINUE)
    result = _run(FilterChain([a, b, c], clock))
    assert result.verdict.action is Action.REJECT and result.verdict.filter == "b"
    assert result.headers == [("X-A", "1")]
    assert result.trail == ["a:continue", "b:reject"]
    assert c.calls == 0


def test_accept_ends_the_stage() -> None:
    later = Fixed("later", Verdict.reject(550, "5.7.1", "no"))
    result = _run(FilterChain([Fixed("ok", ACCEPT), later], Clock()))
    assert result.verdict.action is Action.ACCEPT and later.calls == 0


def test_exception_fails_closed() -> None:
    result = _run(FilterChain([Fixed("boom", RuntimeError("bug"))], Clock()))
    assert result.verdict.action is Action.TEMPFAIL
    assert (
        result.verdict.smtp_reply()
        == FILTER_FAILURE
        == SMTPReply(451, "4.3.0", "Temporary filter failure, try again later")
    )


def test_non_verdict_fails_closed() -> None:
    result = _run(FilterChain([Fixed("wrong", "yes")], Clock()))
    assert result.verdict.action is Action.TEMPFAIL


def test_timeout_fails_closed() -> None:
    clock = Clock()
    slow = Fixed("slow", defer.Deferred(), timeout=3.0)
    results: list[Any] = []
    FilterChain([slow], clock).sender(SESSION, _envelope()).addCallback(results.append)
    assert results == []
    clock.advance(2.9)
    assert results == []
    clock.advance(0.2)
    assert results[0].verdict.action is Action.TEMPFAIL


def test_filters_only_run_at_their_stages() -> None:
    @implementer(IMessageFilter)
    class OnlyMessage:
        name = "m"

        def check_message(self, session: Any, envelope: Any, message: Any) -> Verdict:
            return Verdict(Action.QUARANTINE, reason="spam")

    chain = FilterChain([OnlyMessage()], Clock())
    assert not chain.has_stage("sender") and chain.has_stage("message")
    assert _run(chain).verdict is CONTINUE
    out: list[Any] = []
    chain.message(SESSION, _envelope(), Message(None, 0, data=b"")).addCallback(out.append)
    assert out[0].verdict.action is Action.QUARANTINE


CONFIG = """
config_version = 1
hostname = "mx.example.org"
domains = ["example.org"]
state_dir = "{state}"
[store]
path = "{state}/{{localpart}}"
[[pipelines.inbound]]
filter = "size"
max_size = "1K"
[[pipelines.typo]]
filter = "sise"
max_size = 5
"""


def test_pipeline_from_config(tmp_path: Any) -> None:
    config = parse_config(CONFIG.format(state=tmp_path))
    service = FakeSMTPService(config, Clock())
    chain = build_pipeline("inbound", service, Clock())
    [size] = chain.filters
    assert isinstance(size, MessageSize) and size.max_size == 1024
    env = _envelope()
    env.size = 2000
    assert _run(chain).verdict is CONTINUE
    out: list[Any] = []
    chain.sender(SESSION, env).addCallback(out.append)
    assert out[0].verdict.smtp_reply() == SMTPReply(
        552, "5.3.4", "Message size exceeds fixed limit"
    )
    with pytest.raises(ConfigError) as err:
        build_pipeline("typo", service, Clock())
    assert "unknown filter 'sise' (did you mean 'size'?)" in str(err.value)
    assert "pipelines.typo[0]" in str(err.value)
    with pytest.raises(ConfigError, match="unknown options"):
        build_filter("size", {"max_size": 1, "bogus": 2}, service, "p[0]")
    assert build_pipeline(None, service, Clock()).filters == []


def test_relay_control(tmp_path: Any) -> None:
    config = parse_config(CONFIG.format(state=tmp_path))
    service = FakeSMTPService(config, Clock())
    mx = RelayControl({}, service)
    sub = RelayControl({"allow_authenticated": True}, service)
    authed = Session(id="t", listener="sub", protocol="submission", peer_host="192.0.2.1")
    authed.auth_user = "alice"
    remote = Recipient(Address("x", "remote.test"))
    local = Recipient(Address("x", "example.org"))
    percent = Recipient(Address("x%remote.test", "example.org"))
    assert mx.check_recipient(SESSION, _envelope(), local) is CONTINUE
    assert mx.check_recipient(SESSION, _envelope(), remote).action is Action.REJECT
    assert mx.check_recipient(authed, _envelope(), remote).action is Action.REJECT
    assert mx.check_recipient(SESSION, _envelope(), percent).action is Action.REJECT
    assert sub.check_recipient(authed, _envelope(), remote) is CONTINUE
    assert sub.check_recipient(SESSION, _envelope(), remote).action is Action.REJECT


def test_relay_control_follows_a_reloaded_config(tmp_path: Any) -> None:
    config = parse_config(CONFIG.format(state=tmp_path))
    service = FakeSMTPService(config, Clock())
    relay = RelayControl({}, service)
    rcpt = Recipient(Address("x", "new.example"))
    assert relay.check_recipient(SESSION, _envelope(), rcpt).action is Action.REJECT
    service.config = parse_config(
        CONFIG.format(state=tmp_path).replace('["example.org"]', '["example.org", "new.example"]')
    )
    assert relay.check_recipient(SESSION, _envelope(), rcpt) is CONTINUE


class _Recorder:
    def __init__(self, addresses: set[str]) -> None:
        self.addresses = addresses
        self.asked: list[str] = []

    def allowed(self, address: str) -> Any:
        self.asked.append(address)
        return defer.succeed(address in self.addresses)


def test_relay_control_pop_before_smtp(tmp_path: Any) -> None:
    """A client that logged in over POP3/IMAP recently may relay through the MX (Courier, James)."""
    config = parse_config(CONFIG.format(state=tmp_path))
    service = FakeSMTPService(config, Clock())
    service.pop_before_smtp = _Recorder({"192.0.2.1"})  # type: ignore[attr-defined]
    mx = RelayControl({}, service)
    remote = Recipient(Address("x", "remote.test"))
    results: list[Any] = []
    defer.maybeDeferred(mx.check_recipient, SESSION, _envelope(), remote).addCallback(
        results.append
    )
    assert results == [CONTINUE]
    stranger = Session(id="u", listener="mx", protocol="smtp", peer_host="198.51.100.7")
    defer.maybeDeferred(mx.check_recipient, stranger, _envelope(), remote).addCallback(
        results.append
    )
    assert results[1].action is Action.REJECT
    # routing tricks stay refused even for a POP-before-SMTP client
    tricky = Recipient(Address("x%y.test", "remote.test"))
    defer.maybeDeferred(mx.check_recipient, SESSION, _envelope(), tricky).addCallback(
        results.append
    )
    assert results[2].action is Action.REJECT
    # local recipients never ask
    service.pop_before_smtp.asked.clear()  # type: ignore[attr-defined]
    local = Recipient(Address("x", "example.org"))
    assert mx.check_recipient(SESSION, _envelope(), local) is CONTINUE
    assert service.pop_before_smtp.asked == []  # type: ignore[attr-defined]


def test_filters_that_run_first_go_before_the_policy_filters() -> None:
    """A listener's chain is builtin + pipeline; ``runs_first`` filters come before both."""
    relay, exists = Fixed("relay", CONTINUE), Fixed("recipient", CONTINUE)
    trap = Fixed("spamtrap", Verdict.reject(550, "5.1.1", "trap"))
    trap.runs_first = True  # type: ignore[attr-defined]
    later = Fixed("later", CONTINUE)
    chain = FilterChain([relay, exists], Clock(), "builtin") + FilterChain(
        [later, trap], Clock(), "inbound"
    )
    assert [f.name for f in chain.filters] == ["spamtrap", "relay", "recipient", "later"]
    assert chain.name == "inbound"
    result = _run(chain)
    assert result.verdict.filter == "spamtrap" and relay.calls == 0


class _InlineThreads:
    def __init__(self) -> None:
        self.jobs = 0

    def run(self, pool: str, fn: Any, *args: Any) -> Any:
        assert pool == "crypto"
        self.jobs += 1
        return defer.maybeDeferred(fn, *args)


@implementer(IMessageFilter)
class _Worker:
    """A message filter whose blocking work the chain runs in its one job per message."""

    def __init__(self, name: str, threads: _InlineThreads, work: Any) -> None:
        self.name, self.threads, self.work, self.timeout = name, threads, work, 10.0

    def message_job(self, session: Any, envelope: Any, message: Any) -> Any:
        return self.work

    def check_message(self, session: Any, envelope: Any, message: Any) -> Any:
        from mailserv.filters.common import prepared, then

        job = prepared(session, envelope, self.name)
        assert job is not None
        return then(job, lambda value: Verdict.cont(("X-" + self.name, value)))


def test_message_jobs_of_all_filters_run_as_one_thread_job_and_fail_closed() -> None:
    threads = _InlineThreads()

    def broken() -> str:
        raise RuntimeError("bug in the job")

    good = _Worker("good", threads, lambda: "yes")
    bad = _Worker("bad", threads, broken)
    session = Session(id="s2", listener="mx", protocol="smtp", peer_host="192.0.2.1")
    out: list[Any] = []
    chain = FilterChain([good, bad], Clock())
    chain.message(session, _envelope(), Message(None, 0, data=b"")).addCallback(out.append)
    assert threads.jobs == 1
    assert out[0].headers == [("X-good", "yes")]
    assert out[0].verdict.action is Action.TEMPFAIL and out[0].verdict.filter == "bad"


def test_a_message_job_may_wait_for_a_deferred_before_the_thread_job_starts() -> None:
    """``message_job`` may return a Deferred of its callable (DKIM fetching keys first)."""
    threads = _InlineThreads()
    ready: defer.Deferred[Any] = defer.Deferred()
    waiting = _Worker("waiting", threads, ready)
    other = _Worker("other", threads, lambda: "now")
    session = Session(id="s3", listener="mx", protocol="smtp", peer_host="192.0.2.1")
    out: list[Any] = []
    chain = FilterChain([waiting, other], Clock())
    chain.message(session, _envelope(), Message(None, 0, data=b"")).addCallback(out.append)
    assert threads.jobs == 0 and not out
    ready.callback(lambda: "fetched")
    assert threads.jobs == 1
    assert out[0].headers == [("X-waiting", "fetched"), ("X-other", "now")]
    failing: defer.Deferred[Any] = defer.Deferred()
    chain = FilterChain([_Worker("failing", threads, failing), other], Clock())
    chain.message(session, _envelope(), Message(None, 0, data=b"")).addCallback(out.append)
    failing.errback(RuntimeError("could not prepare"))
    assert out[1].verdict.action is Action.TEMPFAIL and out[1].verdict.filter == "failing"


def test_prefetches_start_before_the_first_message_filter_runs() -> None:
    """A filter's ``prefetch`` (DMARC's policy lookup) is called when the message stage
    starts, before the filters ahead of it have answered; one that raises is only logged."""
    events: list[str] = []
    hold: defer.Deferred[Any] = defer.Deferred()

    @implementer(IMessageFilter)
    class Slow:
        name, timeout = "slow", 10.0

        def check_message(self, session: Any, envelope: Any, message: Any) -> Any:
            events.append("slow runs")
            return hold

    @implementer(IMessageFilter)
    class Fetching:
        timeout = 10.0

        def __init__(self, name: str, broken: bool = False) -> None:
            self.name, self.broken = name, broken

        def prefetch(self, session: Any, envelope: Any, message: Any) -> None:
            events.append(f"{self.name} prefetch")
            if self.broken:
                raise RuntimeError("bug in prefetch")

        def check_message(self, session: Any, envelope: Any, message: Any) -> Any:
            events.append(f"{self.name} runs")
            return CONTINUE

    out: list[Any] = []
    chain = FilterChain([Slow(), Fetching("broken", True), Fetching("late")], Clock())
    chain.message(SESSION, _envelope(), Message(None, 0, data=b"")).addCallback(out.append)
    assert events == ["broken prefetch", "late prefetch", "slow runs"]
    hold.callback(CONTINUE)
    assert events[3:] == ["broken runs", "late runs"]
    assert out[0].verdict.action is Action.CONTINUE


def test_jobs_that_finish_inline_run_on_the_reactor_and_the_others_in_one_thread_job() -> None:
    """A Job's inline attempt runs on the reactor; one that raises NeedsThread is run
    again in the pool with the jobs that have no inline attempt, as one thread job;
    any other exception of an inline attempt is that filter's failure (fail closed)."""
    from mailserv.filters.common import Job, NeedsThread

    threads = _InlineThreads()
    calls: list[str] = []

    def job(name: str, inline: Any) -> Job:
        def blocking() -> str:
            calls.append(f"{name} in the pool")
            return f"{name} pooled"

        return Job(blocking, inline)

    def finishes(deadline: float) -> str:
        calls.append("quick inline")
        return "done inline"

    def too_long(deadline: float) -> str:
        calls.append("slow inline")
        raise NeedsThread("budget")

    def broken(deadline: float) -> str:
        raise RuntimeError("bug in the inline attempt")

    session = Session(id="s4", listener="mx", protocol="smtp", peer_host="192.0.2.1")
    quick = _Worker("quick", threads, job("quick", finishes))
    out: list[Any] = []
    FilterChain([quick], Clock()).message(
        session, _envelope(), Message(None, 0, data=b"")
    ).addCallback(out.append)
    assert threads.jobs == 0 and calls == ["quick inline"]
    assert out[0].headers == [("X-quick", "done inline")]

    calls.clear()
    slow = _Worker("slow", threads, job("slow", too_long))
    plain = _Worker("plain", threads, job("plain", None))
    bad = _Worker("bad", threads, job("bad", broken))
    chain = FilterChain([quick, slow, plain, bad], Clock())
    chain.message(session, _envelope(), Message(None, 0, data=b"")).addCallback(out.append)
    assert threads.jobs == 1
    assert calls == ["quick inline", "slow inline", "slow in the pool", "plain in the pool"]
    assert out[1].headers == [
        ("X-quick", "done inline"),
        ("X-slow", "slow pooled"),
        ("X-plain", "plain pooled"),
    ]
    assert out[1].verdict.action is Action.TEMPFAIL and out[1].verdict.filter == "bad"


def test_inline_attempts_stop_when_the_budget_is_spent() -> None:
    """Once the inline budget is spent, the remaining jobs go to the pool untried."""
    from mailserv.filters import common

    clock = [0.0]
    tried: list[str] = []

    def attempt(name: str, cost: float) -> Any:
        def inline(deadline: float) -> str:
            tried.append(name)
            clock[0] += cost
            return name

        return common.Job(lambda: f"{name} pooled", inline)

    jobs = {"a": attempt("a", 0.004), "b": attempt("b", 0.002), "c": attempt("c", 0.0)}
    real = common.time.monotonic
    common.time.monotonic = lambda: clock[0]  # type: ignore[assignment]
    try:
        done, rest = common.run_inline(jobs, budget=0.005)
    finally:
        common.time.monotonic = real  # type: ignore[assignment]
    assert tried == ["a", "b"]
    assert done == {"a": (True, "a"), "b": (True, "b")}
    assert list(rest) == ["c"]
    assert common.run_jobs(rest) == {"c": (True, "c pooled")}


def test_a_finished_job_is_picked_without_a_deferred() -> None:
    """``prepared`` gives a finished job's value itself (its exception raised when it
    failed) and a Deferred only while the job runs; ``then`` takes either."""
    from mailserv.filters.common import Job, prepared, start_jobs, then

    def broken(deadline: float) -> str:
        raise ValueError("bad input")

    threads = _InlineThreads()
    session = Session(id="s5", listener="mx", protocol="smtp", peer_host="192.0.2.1")
    envelope = _envelope()
    later: defer.Deferred[Any] = defer.Deferred()
    jobs = {"now": Job(lambda: "pooled", lambda deadline: "inline"), "bad": Job(str, broken)}
    start_jobs(threads, session, envelope, jobs)
    assert prepared(session, envelope, "now") == "inline"
    with pytest.raises(ValueError, match="bad input"):
        prepared(session, envelope, "bad")
    assert then("inline", str.upper) == "INLINE"
    start_jobs(threads, session, envelope, {"waits": later})
    pending = prepared(session, envelope, "waits")
    assert isinstance(pending, defer.Deferred) and not pending.called
    out: list[Any] = []
    then(pending, str.upper).addCallback(out.append)
    later.callback(Job(lambda: "pooled"))
    assert out == ["POOLED"] and threads.jobs == 1
