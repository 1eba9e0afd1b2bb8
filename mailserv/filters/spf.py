"""SPF (RFC 7208): HELO and MAIL FROM identities, processing limits, Received-SPF.

Evaluation is pyspf's (the reference implementation by the RFC's editors),
which enforces the §4.6.4 limits (10 DNS-querying terms, 2 void lookups) and
the §10.1 total query time.  Its DNS goes through our resolver: pyspf calls a
module-level ``DNSLookup`` that we replace with one reading the resolver of
the current thread, and the whole evaluation runs in the ``dns`` thread pool,
so the reactor never blocks.
"""

from __future__ import annotations

import functools
import ipaddress
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import spf
from twisted.internet import defer
from zope.interface import implementer

from mailserv.config.schema import Section, boolean, duration, list_of, network, option, optional
from mailserv.config.schema import string as string_kind
from mailserv.errors import TemporaryFailure
from mailserv.filters.base import CONTINUE, FilterBase, Verdict
from mailserv.filters.common import (
    MethodResult,
    action_kind,
    cached_answer,
    clean,
    load_options,
    outcome,
    parse_ip,
    resolver_for,
    results_for,
)
from mailserv.interfaces import ISenderFilter

_local = threading.local()
_original_lookup = spf.DNSLookup


def _dns_lookup(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> list[Any]:
    """pyspf's DNS hook: the same answer shapes as its dnspython backend, from our resolver."""
    resolver = getattr(_local, "resolver", None)
    if resolver is None:  # someone else's pyspf call in this process
        return list(_original_lookup(name, qtype, strict, timeout))
    try:
        answer = cached_answer(resolver, name, qtype)
        if answer is None:
            answer = resolver.lookup_blocking(name, qtype)
    except TemporaryFailure as exc:
        raise spf.TempError(f"DNS {exc}") from None
    out: list[Any] = []
    for rdata in answer.records:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            out.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            out.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), rdata.strings))
    return out


spf.DNSLookup = _dns_lookup

MEMO_MAX = 10_000

# RFC 7208 §8 replies with the enhanced codes of RFC 7372 §3.2.
REPLIES = {
    "fail": (550, "5.7.23", "SPF validation failed"),
    "softfail": (550, "5.7.23", "SPF validation failed (softfail)"),
    "permerror": (550, "5.7.24", "SPF validation error"),
    "temperror": (451, "4.4.3", "Temporary SPF validation error"),
}


class SPFOptions(Section):
    """Keys of ``filter = "spf"``: what to do with each result (RFC 7208 §8)."""

    fail: str = option(action_kind, "reject")
    softfail: str = option(action_kind, "tag")
    permerror: str = option(action_kind, "tag")
    temperror: str = option(action_kind, "tempfail")
    helo_fail: str = option(action_kind, "reject")
    check_helo: bool = option(boolean, True)
    skip_authenticated: bool = option(boolean, True)
    trusted_networks: list[Any] = option(list_of(network), list)
    receiver: str | None = option(optional(string_kind), None)
    query_time: float = option(duration, 20.0)
    # Results of the same (client, HELO, sender) are reused this long (0: never).
    cache_for: float = option(duration, 60.0)


@dataclass(frozen=True)
class SPFCheck:
    """The result of one identity (RFC 7208 §2.3 helo, §2.4 mailfrom)."""

    identity: str  # "helo" | "mailfrom"
    result: str  # pass fail softfail neutral none permerror temperror
    explanation: str
    domain: str
    header: str  # Received-SPF value (RFC 7208 §9.1)


def evaluate(
    resolver: Any,
    ip: str,
    sender: str,
    helo: str,
    receiver: str,
    query_time: float,
    identity: str,
) -> SPFCheck:
    """Run one SPF evaluation (blocking: call it in the dns pool)."""
    _local.resolver = resolver
    try:
        if identity == "helo":
            query = spf.query(i=ip, s="", h=helo, receiver=receiver, querytime=query_time)
        else:
            query = spf.query(i=ip, s=sender, h=helo, receiver=receiver, querytime=query_time)
        try:
            result, _code, explanation = query.check()
        except spf.TempError as exc:
            result, explanation = "temperror", str(exc)
        header = query.get_header(result, receiver)
        return SPFCheck(identity, result, str(explanation), str(query.o), str(header))
    finally:
        _local.resolver = None


def evaluate_identities(
    resolver: Any,
    ip: str,
    sender: str,
    helo: str,
    receiver: str,
    query_time: float,
    check_helo: bool,
    check_mailfrom: bool,
) -> tuple[SPFCheck | None, SPFCheck | None]:
    """The HELO and MAIL FROM checks in one thread job (blocking)."""
    common = (resolver, ip, sender, helo, receiver, query_time)
    helo_check = evaluate(*common, "helo") if check_helo else None
    if helo_check is not None and helo_check.result == "fail" and not check_mailfrom:
        return helo_check, None
    mail_check = evaluate(*common, "mailfrom") if check_mailfrom else None
    return helo_check, mail_check


@functools.lru_cache(maxsize=1024)
def _checkable_helo(helo: str | None) -> bool:
    """RFC 7208 §2.3: only a host name (not an address literal) is a HELO identity.

    Memoised: asked for every MAIL FROM of a session, with the session's one HELO name
    (ipaddress's parse of a host name fails through an exception, ~5 us).
    """
    if not helo or helo.startswith("[") or "." not in helo:
        return False
    try:
        ipaddress.ip_address(helo)
    except ValueError:
        return True
    return False


@implementer(ISenderFilter)
class SPFFilter(FilterBase):
    """Check the client against the SPF record of the HELO and MAIL FROM domains."""

    name = "spf"
    default_timeout = 30.0

    def __init__(self, options: Mapping[str, Any] | None = None, service: Any = None) -> None:
        super().__init__(options, service)
        self.config = load_options(SPFOptions, self.options)
        self.resolver = resolver_for(service)
        self.receiver = self.config.receiver or str(service.config.hostname)
        self.clock = service.reactor
        self._memo: OrderedDict[tuple[Any, ...], tuple[float, Any]] = OrderedDict()

    def _skip(self, session: Any) -> bool:
        if self.config.skip_authenticated and session.auth_user is not None:
            return True
        ip = parse_ip(session.peer_host)
        if ip is None:
            return True
        # Mail from this host itself is not checked (as policyd-spf does).
        return ip.is_loopback or any(ip in net for net in self.config.trusted_networks)

    def check_sender(self, session: Any, envelope: Any) -> Any:
        """The verdict at once when a recent result is reused, else a Deferred of it."""
        if self._skip(session):
            return CONTINUE
        helo = session.helo or ""
        checks = self._evaluate(
            session.peer_host,
            envelope.sender,
            helo,
            self.config.check_helo and _checkable_helo(helo),
            envelope.mail_from is not None,
        )
        if isinstance(checks, defer.Deferred):
            return checks.addCallback(self._verdict, session, envelope, helo)
        return self._verdict(checks, session, envelope, helo)

    def _verdict(self, checks: Any, session: Any, envelope: Any, helo: str) -> Verdict:
        results = results_for(session, envelope)
        headers: list[tuple[str, str]] = []
        helo_check, mail_check = checks
        if helo_check is not None:
            check = helo_check
            results.spf.append(
                MethodResult("spf", check.result, [("smtp.helo", helo)], clean(check.explanation))
            )
            if envelope.mail_from is None:
                results.spf_mailfrom, results.spf_domain = check.result, check.domain
                headers.append(("Received-SPF", clean(check.header, 900)))
            if check.result == "fail":
                verdict = self._act(self.config.helo_fail, check, results, tuple(headers))
                if verdict.final:
                    return verdict
        if mail_check is not None:
            check = mail_check
            results.spf_mailfrom, results.spf_domain = check.result, check.domain
            results.spf.append(
                MethodResult(
                    "spf",
                    check.result,
                    [("smtp.mailfrom", envelope.mail_from.domain)],
                    clean(check.explanation),
                )
            )
            headers.append(("Received-SPF", clean(check.header, 900)))
            action = getattr(self.config, check.result, None)
            if action is not None:
                return self._act(action, check, results, tuple(headers))
        return Verdict.cont(*headers)

    def _evaluate(
        self, ip: str, sender: str, helo: str, check_helo: bool, check_mailfrom: bool
    ) -> Any:
        """Both checks in one dns-pool job, reusing a recent result for the same inputs.

        The checks at once when reused, else a Deferred of them.
        """
        key = (ip, sender.lower(), helo.lower(), check_helo, check_mailfrom)
        now = self.clock.seconds()
        memo = self._memo.get(key)
        if memo is not None and memo[0] > now:
            return memo[1]
        return self._evaluate_now(key, now, ip, sender, helo, check_helo, check_mailfrom)

    @defer.inlineCallbacks
    def _evaluate_now(
        self,
        key: tuple[Any, ...],
        now: float,
        ip: str,
        sender: str,
        helo: str,
        check_helo: bool,
        check_mailfrom: bool,
    ) -> Any:
        checks = yield self.resolver.threads.run(
            "dns",
            evaluate_identities,
            self.resolver,
            ip,
            sender,
            helo,
            self.receiver,
            self.config.query_time,
            check_helo,
            check_mailfrom,
        )
        temporary = any(c is not None and c.result == "temperror" for c in checks)
        if self.config.cache_for > 0 and not temporary:
            self._memo[key] = (now + self.config.cache_for, checks)
            self._memo.move_to_end(key)
            while len(self._memo) > MEMO_MAX:
                self._memo.popitem(last=False)
        return checks

    def _act(
        self, action: str, check: SPFCheck, results: Any, headers: tuple[tuple[str, str], ...]
    ) -> Verdict:
        code, enhanced, text = REPLIES.get(check.result, REPLIES["fail"])
        reason = f"SPF {check.identity} {check.result}: {clean(check.explanation, 120)}"
        verdict = outcome(
            action,
            reason,
            (code, enhanced, f"{text}: {clean(check.explanation, 120)}"),
            headers,
            results.quarantine.append,
        )
        if verdict.final:
            return verdict
        return Verdict(headers=headers, reason=reason)
