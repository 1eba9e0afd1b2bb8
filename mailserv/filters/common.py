"""What the built-in filters share: option validation, the resolver, per-message results.

Filters keep no per-message state on themselves (ARCHITECTURE.md "Filters"):
what one filter learns for another (SPF and DKIM results for DMARC, a DNSBL
hit for the tarpit, quarantine reasons for the quarantine filter) lives in
``session.notes``, keyed by the envelope id for per-message results.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

from mailserv.config.schema import Context, Invalid, Section, choice
from mailserv.errors import ConfigError, ConfigProblem
from mailserv.filters.base import Action, Verdict

_S = TypeVar("_S", bound=Section)

# What a filter may do with a finding: reject | tempfail | quarantine | tag | ignore.
ACTIONS = ("reject", "tempfail", "quarantine", "tag", "ignore")
action_kind = choice(*ACTIONS)


def load_options(section: type[_S], options: Mapping[str, Any]) -> _S:
    """Validate a pipeline entry's keys with ``section``.

    Raises ConfigError whose keys are relative to the entry (``zones[1]``);
    the registry prefixes them with ``pipelines.NAME[i]``.
    """
    ctx = Context()
    loaded = section.load(dict(options), ctx, "")
    if loaded is None or ctx.problems:
        raise ConfigError(ctx.problems or [ConfigProblem("", "", "invalid options")])
    return loaded


def config_error(key: str, message: str) -> ConfigError:
    return ConfigError([ConfigProblem("", key, message)])


def regex_kind(value: Any, ctx: Context, key: str) -> str:
    """A regular expression that compiles (with the ``regex`` module, as the rules run it)."""
    import regex

    if not isinstance(value, str):
        raise Invalid(f"expected a regular expression string, got {value!r}")
    try:
        regex.compile(value)
    except regex.error as exc:
        raise Invalid(f"bad regular expression: {exc}") from None
    return value


# --------------------------------------------------------------------------
# Client addresses (parsed once per address, not once per filter call)


@functools.lru_cache(maxsize=4096)
def parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``ipaddress.ip_address(host)``, None when ``host`` is not an address (cached)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


# --------------------------------------------------------------------------
# Service plumbing

_resolvers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def resolver_for(service: Any) -> Any:
    """The service's mailserv.dns.DNSResolver (``service.dns``), built once if it has none."""
    resolver = getattr(service, "dns", None)
    if resolver is not None:
        return resolver
    try:
        return _resolvers[service]
    except KeyError:
        from mailserv.dns import DNSResolver

        resolver = DNSResolver(service.config.dns, service.threads)
        _resolvers[service] = resolver
        return resolver


def authserv_id(service: Any, configured: str | None) -> str:
    """RFC 8601 §2.5: the authserv-id, by default the server's host name."""
    return configured or str(service.config.hostname)


def state_path(service: Any, name: str) -> str:
    directory = os.path.join(str(service.config.state_dir), "filters")
    os.makedirs(directory, mode=0o750, exist_ok=True)
    return os.path.join(directory, name)


# --------------------------------------------------------------------------
# Results shared between the filters of one message


@dataclass
class MethodResult:
    """One RFC 8601 resinfo: ``method=result (comment) ptype.property=value ...``."""

    method: str
    result: str
    properties: list[tuple[str, str]] = field(default_factory=list)
    comment: str = ""
    reason: str = ""

    def render(self) -> str:
        out = f"{self.method}={self.result}"
        if self.comment:
            out += f" ({_comment_text(self.comment)})"
        if self.reason:
            out += f" reason={quote_value(self.reason)}"
        for prop, value in self.properties:
            out += f" {prop}={quote_value(value)}"
        return out


@dataclass
class MessageResults:
    """Everything the authentication filters found for one envelope."""

    envelope_id: str
    spf: list[MethodResult] = field(default_factory=list)  # helo and mailfrom
    spf_mailfrom: str = "none"  # the result DMARC uses (RFC 7489 §3.1.2)
    spf_domain: str = ""
    dkim: list[MethodResult] = field(default_factory=list)
    dkim_pass_domains: list[str] = field(default_factory=list)  # d= of full-body passes
    dmarc: MethodResult | None = None
    arc: MethodResult | None = None
    other: list[MethodResult] = field(default_factory=list)
    quarantine: list[str] = field(default_factory=list)
    forged_removed: int = 0

    def all(self) -> list[MethodResult]:
        out = list(self.spf) + list(self.dkim)
        if self.dmarc is not None:
            out.append(self.dmarc)
        if self.arc is not None:
            out.append(self.arc)
        return out + list(self.other)


def results_for(session: Any, envelope: Any) -> MessageResults:
    """The MessageResults of the current envelope (a new one for each transaction)."""
    current = session.notes.get("auth_results")
    if current is None or current.envelope_id != envelope.id:
        current = MessageResults(envelope.id)
        session.notes["auth_results"] = current
    return current


def connection_marks(session: Any) -> dict[str, Any]:
    """Per-connection findings (DNSBL hits, tags, quarantine reasons, tarpit flags)."""
    marks: dict[str, Any] = session.notes.setdefault("filter_marks", {})
    return marks


def quarantine_reasons(session: Any, envelope: Any) -> list[str]:
    """Connection-level then message-level quarantine reasons, in order."""
    marks = connection_marks(session)
    return list(marks.get("quarantine", [])) + results_for(session, envelope).quarantine


def outcome(
    action: str,
    reason: str,
    reply: tuple[int, str, str] | None,
    headers: tuple[tuple[str, str], ...] = (),
    mark: Callable[[str], None] | None = None,
) -> Verdict:
    """A Verdict for a configured ``action`` when a filter found something.

    ``quarantine`` is not returned as a QUARANTINE verdict (that would end the
    stage and skip later filters): the reason is recorded with ``mark`` and the
    ``quarantine`` filter, which the registry puts last, turns it into one.
    """
    if action == "reject":
        code, enhanced, text = reply or (550, "5.7.1", reason)
        return Verdict.reject(code, enhanced, text, reason)
    if action == "tempfail":
        code, enhanced, text = reply or (451, "4.7.1", reason)
        if code >= 500:
            code, enhanced = 451, "4" + enhanced[1:]
        return Verdict.tempfail(code, enhanced, text, reason)
    if action == "quarantine" and mark is not None:
        mark(reason)
    if action in ("tag", "quarantine"):
        return Verdict(Action.CONTINUE, headers=headers, reason=reason)
    return Verdict(Action.CONTINUE, reason=reason)


# --------------------------------------------------------------------------
# Header text helpers

_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`{|}~@/]+\Z")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def clean(text: str, limit: int = 200) -> str:
    """Text from the network made safe for a header: no controls, bounded length."""
    if not text.isprintable():  # controls are never printable: most text needs no pass
        text = _UNSAFE.sub("?", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quote_value(value: str) -> str:
    """An RFC 2045 token or a quoted-string (RFC 8601 §2.2 ``value``)."""
    value = clean(value)
    if _TOKEN.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment_text(text: str) -> str:
    return clean(text).replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def header_comment(text: str) -> str:
    """``(text)`` with parentheses escaped (RFC 5322 §3.2.2)."""
    return f"({_comment_text(text)})"


# --------------------------------------------------------------------------
# DNS answers already in the resolver's cache, without a thread-pool round trip


# Per dnspython cache object (a reloaded resolver starts empty): the DNSAnswer
# made from each cache entry read, until the entry's expiry (its TTL).  A
# repeated lookup is then one dict read, instead of building a dns.name, hashing
# and comparing it in dnspython's cache (most of the cost of a cached lookup).
# A flush of the whole cache (dnspython's LRUCache.flush() gives it a new
# ``data`` dict) empties this memo too.
_answers: weakref.WeakKeyDictionary[Any, tuple[Any, dict[tuple[str, str], tuple[float, Any]]]] = (
    weakref.WeakKeyDictionary()
)
ANSWERS_MAX = 10_000


def cached_answer(resolver: Any, name: str, rdtype: str) -> Any:
    """The DNSAnswer of ``name``/``rdtype`` if the resolver's cache holds it, else None.

    The plain lookups' cache first (A, AAAA and TXT looked up by ``lookup``
    below, through c-ares), then dnspython's (answers of ``lookup_blocking``:
    SPF, dkimpy).  Both honour TTLs and can be read from any thread; anything
    not cached goes through ``lookup`` as usual.
    """
    plain = getattr(resolver, "plain", None)
    if plain is not None and plain.cache is not None:
        found = plain.cache.get(name, rdtype)
        if found is not None:
            return found
    cache = getattr(getattr(resolver, "resolver", None), "cache", None)
    if not cache:
        return None
    generation = getattr(cache, "data", None)
    try:
        seen_generation, memo = _answers[cache]
        if seen_generation is not generation:
            raise KeyError(cache)
    except KeyError:
        memo = {}
        _answers[cache] = (generation, memo)
    except TypeError:  # a cache object that cannot be weakly referenced
        memo = {}
    found = memo.get((name, rdtype))
    if found is not None and found[0] > time.time():
        return found[1]
    expires, answer = _from_cache(cache, name, rdtype)
    if answer is not None:
        if len(memo) >= ANSWERS_MAX:
            memo.clear()
        memo[(name, rdtype)] = (expires, answer)
    return answer


def _from_cache(cache: Any, name: str, rdtype: str) -> tuple[float, Any]:
    """(expiry, DNSAnswer) of a dnspython cache entry, (0, None) when there is none."""
    key, negative_key = _cache_keys(name, rdtype)
    if key is None:
        return 0.0, None
    answer = cache.get(key)
    if answer is None:
        negative = cache.get(negative_key)
        if negative is not None and negative.response.rcode() == _rcode_nxdomain():
            from mailserv.dns import DNSAnswer

            return negative.expiration, DNSAnswer(name, rdtype, nxdomain=True)
        return 0.0, None
    return answer.expiration, _answer_of(name, rdtype, answer)


def _cache_keys(name: str, rdtype: str) -> tuple[Any, Any]:
    import dns.exception
    import dns.name
    import dns.rdataclass
    import dns.rdatatype

    try:
        qname = dns.name.from_text(name)
        key = (qname, dns.rdatatype.from_text(rdtype), dns.rdataclass.IN)
    except (dns.exception.DNSException, ValueError):
        return None, None
    return key, (qname, dns.rdatatype.ANY, dns.rdataclass.IN)


def _rcode_nxdomain() -> Any:
    import dns.rcode

    return dns.rcode.NXDOMAIN


def _answer_of(name: str, rdtype: str, answer: Any) -> Any:
    import dns.flags

    from mailserv.dns import DNSAnswer

    records = tuple(answer.rrset) if answer.rrset is not None else ()
    return DNSAnswer(
        name, rdtype, records, authenticated=bool(answer.response.flags & dns.flags.AD)
    )


def lookup(resolver: Any, name: str, rdtype: str) -> Any:
    """``resolver.lookup`` answered on the spot when the answer is cached (Deferred).

    The filters never read the AD bit: their lookups are plain ones
    (``dnssec=False``: A, AAAA and TXT through c-ares, mailserv/dns.py).
    """
    cached = cached_answer(resolver, name, rdtype)
    if cached is not None:
        return defer.succeed(cached)
    return resolver.lookup(name, rdtype, dnssec=False)


def gather(deferreds: list[Any]) -> Any:
    """``gatherResults(deferreds)`` for Deferreds that never fail, without its DeferredList
    when there is only one (a single lookup per message is the common case: ~6 us less)."""
    if len(deferreds) == 1:
        return deferreds[0].addCallback(_listed)
    return defer.gatherResults(deferreds)


def _listed(value: Any) -> list[Any]:
    return [value]


def outcomes(deferreds: list[Any]) -> Any:
    """``DeferredList(deferreds, consumeErrors=True)``: ``[(True, value) | (False, failure)]``,
    without the DeferredList when there is only one Deferred."""
    if len(deferreds) == 1:
        return deferreds[0].addCallbacks(_succeeded, _failed)
    return defer.DeferredList(deferreds, consumeErrors=True)


def _succeeded(value: Any) -> list[tuple[bool, Any]]:
    return [(True, value)]


def _failed(failure: Any) -> list[tuple[bool, Any]]:
    return [(False, failure)]


INLINE_LIMIT = 16 * 1024


def in_memory(message: Any) -> bool:
    """True for a small message held in memory: linear work on it may run on the reactor."""
    return getattr(message, "path", "") is None and message.size <= INLINE_LIMIT


def run_on_message(
    threads: Any, pool: str, fn: Callable[..., Any], message: Any, *args: Any
) -> Any:
    """``fn(message, *args)``: called at once for a small message held in memory
    (linear work on bytes already in memory, no I/O), else a Deferred of it run in
    the ``pool`` thread pool.  Callers ``yield`` it in inlineCallbacks either way."""
    if in_memory(message):
        return fn(message, *args)
    return threads.run(pool, fn, message, *args)


_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}\Z")


def header_name(value: Any, ctx: Context, key: str) -> str:
    """An RFC 5322 §2.2 field name (printable ASCII without colon or space)."""
    if not isinstance(value, str) or not _FIELD_NAME.match(value):
        raise Invalid(f"expected a header field name such as 'X-Spam-Flag', got {value!r}")
    return value


class Pending:
    """A result that several later callers wait for (each gets its own Deferred).

    ``d``: a Deferred of it, or the result itself (done at once).
    """

    def __init__(self, d: Any) -> None:
        self.done = False
        self.result: Any = None
        self._waiters: list[Any] = []
        if isinstance(d, defer.Deferred):
            d.addBoth(self._fire)
        else:
            self.done, self.result = True, d

    def _fire(self, result: Any) -> None:
        self.done, self.result = True, result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(result)

    def get(self) -> Any:
        """The result when it has come (and is not a failure), else ``wait()``: a
        failure reaches the caller as its Deferred's errback."""
        if self.done and not isinstance(self.result, Failure):
            return self.result
        return self.wait()

    def wait(self) -> Any:
        if self.done:
            return defer.succeed(self.result)
        waiter: defer.Deferred[Any] = defer.Deferred()
        self._waiters.append(waiter)
        return waiter


# --------------------------------------------------------------------------
# One thread job per message for the CPU-bound work of the message stage

PREPARED = "prepared_jobs"

# Reactor time the inline attempts of one message's jobs may take together (seconds).
INLINE_BUDGET = 0.005


class NeedsThread(Exception):
    """Raised by a job's inline attempt that cannot finish within the reactor's bounds
    (a key that was not looked up beforehand, a key too costly to verify with, a rule
    still running when the budget ran out): the job is run again in the pool."""


class Job:
    """A message-stage job: ``blocking()`` runs in the ``crypto`` pool; ``inline(deadline)``,
    when given, is tried first on the reactor and raises NeedsThread when it cannot finish
    by ``deadline`` (time.monotonic) without blocking."""

    __slots__ = ("blocking", "inline")

    def __init__(
        self, blocking: Callable[[], Any], inline: Callable[[float], Any] | None = None
    ) -> None:
        self.blocking = blocking
        self.inline = inline

    def __call__(self) -> Any:
        return self.blocking()


def run_jobs(jobs: Mapping[str, Callable[[], Any]]) -> dict[str, tuple[bool, Any]]:
    """Run each job (blocking); ``name -> (True, value)`` or ``(False, exception)``."""
    out: dict[str, tuple[bool, Any]] = {}
    for name, job in jobs.items():
        try:
            out[name] = (True, job())
        except Exception as exc:  # given to the filter, which fails closed with it
            out[name] = (False, exc)
    return out


def run_inline(
    jobs: Mapping[str, Any], budget: float = INLINE_BUDGET
) -> tuple[dict[str, tuple[bool, Any]], dict[str, Any]]:
    """Try the inline attempts of ``jobs`` on the reactor, in order, within ``budget``.

    Returns (outcomes of the jobs done, jobs left for the pool): a job without
    an inline attempt, one whose attempt raised NeedsThread, and every job
    after the budget ran out go to the pool.  Any other exception is that
    job's outcome, as in the pool.
    """
    done: dict[str, tuple[bool, Any]] = {}
    rest: dict[str, Any] = {}
    deadline = time.monotonic() + budget
    for name, job in jobs.items():
        inline = getattr(job, "inline", None)
        if inline is None or time.monotonic() >= deadline:
            rest[name] = job
            continue
        try:
            done[name] = (True, inline(deadline))
        except NeedsThread:
            rest[name] = job
        except Exception as exc:  # given to the filter, which fails closed with it
            done[name] = (False, exc)
    return done, rest


def start_jobs(threads: Any, session: Any, envelope: Any, jobs: Mapping[str, Any]) -> None:
    """Run the message-stage ``jobs`` of several filters: inline or in one ``crypto`` job.

    The chain calls this before the first filter of the message stage; each
    filter picks its result with ``prepared``.  A job may be a Deferred of
    its callable (DKIM looks its keys up on the reactor first): the jobs run
    when all of those fired; one that failed is that filter's result.  Jobs
    whose inline attempt finishes within INLINE_BUDGET run on the reactor
    (a small message in memory: no thread hand-over, ~0.1 ms of CPU less per
    message); the others go to the pool together, as one thread job.
    """
    waiting = {name: job for name, job in jobs.items() if isinstance(job, defer.Deferred)}
    if waiting:
        d = _when_ready(threads, dict(jobs), waiting)
    else:
        d = _run(threads, dict(jobs))
    session.notes[PREPARED] = (envelope.id, Pending(d), frozenset(jobs))


def _run(threads: Any, jobs: dict[str, Any]) -> Any:
    """The outcomes of ``jobs``: at once when all ran inline, else a Deferred of them."""
    done, rest = run_inline(jobs)
    if not rest:
        return done
    pooled = threads.run("crypto", run_jobs, rest)
    return pooled.addCallback(lambda out: {**done, **out}) if done else pooled


def _when_ready(threads: Any, ready: dict[str, Any], waiting: dict[str, Any]) -> Any:
    failed: dict[str, tuple[bool, Any]] = {}

    def got(job: Any, name: str) -> None:
        ready[name] = job

    def lost(failure: Any, name: str) -> None:
        del ready[name]
        failed[name] = (False, failure.value)

    def run(_: Any) -> Any:
        out = _run(threads, ready) if ready else {}
        if not failed:
            return out
        return then(out, lambda outcomes: {**outcomes, **failed})

    waits = [
        job.addCallbacks(got, lost, callbackArgs=(name,), errbackArgs=(name,))
        for name, job in waiting.items()
    ]
    return gather(waits).addCallback(run)


def prepared(session: Any, envelope: Any, name: str) -> Any:
    """The result of filter ``name``'s job started by ``start_jobs``, or None.

    The value itself when the job has finished (a job's exception is raised):
    inline jobs, and the filters after the first that waited, go on without a
    Deferred; else a Deferred of it (``then`` takes both).
    None when no job was started for this filter and message, or when the
    message was rewritten since (forged Authentication-Results removed): the
    filter then does its work itself, on the message as it is now.
    """
    entry = session.notes.get(PREPARED)
    if entry is None or entry[0] != envelope.id or name not in entry[2]:
        return None
    if results_for(session, envelope).forged_removed:
        return None
    return then(entry[1].get(), _pick, name)


def then(result: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(result, *args)``: now, or when ``result`` fires if it is a Deferred."""
    if isinstance(result, defer.Deferred):
        return result.addCallback(fn, *args)
    return fn(result, *args)


def _pick(outcomes: dict[str, tuple[bool, Any]], name: str) -> Any:
    ok, value = outcomes[name]
    if not ok:
        raise value
    return value
