"""DMARC (RFC 7489): policy discovery, SPF and DKIM identifier alignment, p/sp/pct.

Runs at the message stage after the ``spf`` and ``dkim`` filters of the same
pipeline, whose results it reads.  The organizational domain (§3.2) comes
from the Public Suffix List shipped with the ``publicsuffixlist`` package
(a bundled snapshot; nothing is fetched at run time).
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from mailserv.address import AddressError, normalise_domain
from mailserv.config.schema import Section, boolean, option
from mailserv.errors import TemporaryFailure
from mailserv.filters.base import CONTINUE, FilterBase, Verdict
from mailserv.filters.common import (
    MethodResult,
    Pending,
    action_kind,
    cached_answer,
    load_options,
    lookup,
    outcome,
    resolver_for,
    results_for,
)
from mailserv.interfaces import IMessageFilter

PREFETCHED = "dmarc_prefetched"  # session note: (envelope id, From domain, Pending policy)


@functools.lru_cache(maxsize=1)
def _psl() -> Any:
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


@functools.lru_cache(maxsize=8192)
def organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2: the public suffix plus one label (the domain itself if it is a suffix).

    Cached: the list is the package's bundled snapshot, fixed for the process.
    """
    domain = domain.lower().rstrip(".")
    return str(_psl().privatesuffix(domain) or domain)


def aligned(a: str, b: str, mode: str) -> bool:
    """RFC 7489 §3.1: strict = identical domains; relaxed = same organizational domain."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if mode == "s":
        return a == b
    return organizational_domain(a) == organizational_domain(b)


@dataclass(frozen=True)
class Policy:
    """A parsed DMARC record (RFC 7489 §6.3)."""

    p: str
    sp: str
    pct: int
    adkim: str
    aspf: str
    found_at: str  # the domain whose _dmarc record this is


@functools.lru_cache(maxsize=1024)
def parse_record(text: str, found_at: str) -> Policy | None:
    """Tag-value list of §6.4; None when it is not a usable DMARC record.

    Memoised (the same few records come with most mail; a Policy is immutable):
    the record itself still comes from DNS each time, per its TTL.
    """
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, eq, value = part.partition("=")
        if eq:
            tags.setdefault(key.strip().lower(), value.strip())
    if tags.get("v") != "DMARC1" or not text.lstrip().startswith("v"):
        return None
    p = tags.get("p", "").lower()
    if p not in ("none", "quarantine", "reject"):
        # §6.6.3: a record with a bad p= but an rua= is treated as p=none.
        if "rua" not in tags:
            return None
        p = "none"
    sp = tags.get("sp", "").lower()
    if sp not in ("none", "quarantine", "reject"):
        sp = p
    try:
        pct = int(tags.get("pct", "100"))
    except ValueError:
        pct = 100
    pct = min(max(pct, 0), 100)
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    return Policy(
        p,
        sp,
        pct,
        adkim if adkim in ("r", "s") else "r",
        aspf if aspf in ("r", "s") else "r",
        found_at,
    )


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOMAIN = (
    r"([A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+)"
)
_LOCAL = rf"{_ATOM}(?:\.{_ATOM})*"
# ``Display Name <local@domain>`` (atoms only in the name) or ``local@domain``.
_SIMPLE_FROM = re.compile(
    rf"[ \t]*(?:(?:{_ATOM}(?: {_ATOM})* ?)?<{_LOCAL}@{_DOMAIN}>|{_LOCAL}@{_DOMAIN})[ \t]*"
)


def from_domain(message: Any) -> str | None:
    """RFC 7489 §6.6.1: the domain of the single author address, None if not exactly one."""
    values = message.header("From")
    if len(values) != 1:
        return None
    text = values[0].decode("utf-8", "replace").replace("\r\n", "")
    simple = _SIMPLE_FROM.fullmatch(text)
    if simple is None:
        return _parsed_from_domain(text)
    # The common plain forms, without the full RFC 5322 parser.
    return _normalised(simple.group(1) or simple.group(2))


def _parsed_from_domain(text: str) -> str | None:
    addresses = [addr for _name, addr in getaddresses([text]) if addr]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None
    return _normalised(addresses[0].rpartition("@")[2].strip().rstrip(">"))


def _normalised(domain: str) -> str | None:
    try:
        return normalise_domain(domain)[0]
    except AddressError:
        return None


def policy_of(answer: Any, domain: str) -> Policy | None:
    """The policy in the TXT answer of ``_dmarc.<domain>`` (§6.6.3 steps 3-5)."""
    records = []
    for rdata in answer.records:
        text = b"".join(rdata.strings).decode("utf-8", "replace")
        if text.startswith("v=DMARC1"):
            records.append(text)
    if len(records) != 1:  # none, or several: no policy (§6.6.3 step 5)
        return None
    return parse_record(records[0], domain)


class DMARCOptions(Section):
    """Keys of ``filter = "dmarc"``: what each published policy leads to here."""

    reject: str = option(action_kind, "reject")
    quarantine: str = option(action_kind, "quarantine")
    temperror: str = option(action_kind, "tempfail")
    permerror: str = option(action_kind, "ignore")
    # Authenticated submissions are our own users' mail: no DMARC verdict on them.
    skip_authenticated: bool = option(boolean, True)


_WEAKER = {"reject": "quarantine", "quarantine": "none", "none": "none"}


@implementer(IMessageFilter)
class DMARCFilter(FilterBase):
    """Evaluate the From domain's DMARC policy against the SPF and DKIM results."""

    name = "dmarc"
    default_timeout = 20.0

    def __init__(
        self,
        options: Mapping[str, Any] | None = None,
        service: Any = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(options, service)
        self.config = load_options(DMARCOptions, self.options)
        self.resolver = resolver_for(service)
        self.random = rng or random.Random()  # noqa: S311 - pct sampling, not security

    def discover(self, domain: str) -> Any:
        """§6.6.3: the record of the From domain, else of its organizational domain.

        Policy | None at once when the answers are cached, else a Deferred of it.
        """
        answer = cached_answer(self.resolver, f"_dmarc.{domain}", "TXT")
        if answer is not None:
            policy = policy_of(answer, domain)
            if policy is not None:
                return policy
            org = organizational_domain(domain)
            if org == domain:
                return None
            answer = cached_answer(self.resolver, f"_dmarc.{org}", "TXT")
            if answer is not None:
                return policy_of(answer, org)
        return self._discover(domain)

    def _discover(self, domain: str) -> Any:
        return self._lookup(domain).addCallback(self._or_organizational, domain)

    def _or_organizational(self, policy: Policy | None, domain: str) -> Any:
        if policy is None:
            org = organizational_domain(domain)
            if org != domain:
                return self._lookup(org)
        return policy

    def _lookup(self, domain: str) -> Any:
        return lookup(self.resolver, f"_dmarc.{domain}", "TXT").addCallback(policy_of, domain)

    def prefetch(self, session: Any, envelope: Any, message: Any) -> None:
        """Start the policy lookup when the message stage starts (the chain calls this
        beside the DKIM key's lookup), so that check_message, which must wait for the
        DKIM and SPF results, finds the answer there or on its way: the lookups of a
        message overlap instead of following each other."""
        if self.config.skip_authenticated and session.auth_user is not None:
            return
        domain = from_domain(message)
        if domain is None:
            return
        try:
            policy = self.discover(domain)
        except TemporaryFailure:
            return  # check_message asks again and reports it
        if isinstance(policy, defer.Deferred):
            policy = Pending(policy)
        session.notes[PREFETCHED] = (envelope.id, domain, policy)

    def check_message(self, session: Any, envelope: Any, message: Any) -> Any:
        results = results_for(session, envelope)
        if self.config.skip_authenticated and session.auth_user is not None:
            return CONTINUE
        domain = from_domain(message)
        if domain is None:
            results.dmarc = MethodResult(
                "dmarc", "permerror", comment="not exactly one author address"
            )
            return self._act(self.config.permerror, "From header unusable", results)
        props = [("header.from", domain)]
        started = session.notes.pop(PREFETCHED, None)
        try:
            if started is not None and started[:2] == (envelope.id, domain):
                policy = started[2]
                if isinstance(policy, Pending):  # a failed lookup goes through _lookup_failed
                    policy = policy.get()
            else:
                policy = self.discover(domain)  # at once when the records are cached
        except TemporaryFailure:
            return self._temperror(results, props)
        if isinstance(policy, defer.Deferred):
            return policy.addCallbacks(
                self._evaluate,
                self._lookup_failed,
                callbackArgs=(domain, props, results),
                errbackArgs=(results, props),
            )
        return self._evaluate(policy, domain, props, results)

    def _lookup_failed(self, failure: Any, results: Any, props: list[tuple[str, str]]) -> Verdict:
        failure.trap(TemporaryFailure)
        return self._temperror(results, props)

    def _temperror(self, results: Any, props: list[tuple[str, str]]) -> Verdict:
        results.dmarc = MethodResult("dmarc", "temperror", props, "policy lookup failed")
        return self._act(self.config.temperror, "DMARC policy lookup failed", results)

    def _evaluate(
        self, policy: Policy | None, domain: str, props: list[tuple[str, str]], results: Any
    ) -> Verdict:
        """§6.6.2 alignment, §6.6.4 pct, and the verdict for ``policy``."""
        if policy is None:
            results.dmarc = MethodResult("dmarc", "none", props)
            return CONTINUE
        spf_ok = results.spf_mailfrom == "pass" and aligned(
            results.spf_domain or "", domain, policy.aspf
        )
        dkim_ok = any(aligned(d, domain, policy.adkim) for d in results.dkim_pass_domains)
        requested = policy.p if policy.found_at == domain else policy.sp
        if spf_ok or dkim_ok:
            results.dmarc = MethodResult(
                "dmarc", "pass", props, f"p={policy.p} sp={policy.sp} dis=none"
            )
            return CONTINUE
        applied = requested
        if policy.pct < 100 and self.random.randrange(100) >= policy.pct:
            applied = _WEAKER[requested]  # §6.6.4: sampled out, next weaker policy
        results.dmarc = MethodResult(
            "dmarc", "fail", props, f"p={policy.p} sp={policy.sp} dis={applied}"
        )
        if applied == "none":
            return CONTINUE
        action = self.config.reject if applied == "reject" else self.config.quarantine
        return outcome(
            action,
            f"DMARC policy of {domain} is {applied}",
            (550, "5.7.1", f"Rejected by DMARC policy of {domain}"),
            (),
            results.quarantine.append,
        )

    def _act(self, action: str, reason: str, results: Any) -> Verdict:
        return outcome(action, reason, (550, "5.7.1", reason), (), results.quarantine.append)
