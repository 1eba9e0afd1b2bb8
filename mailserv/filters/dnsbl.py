"""DNS blocklists of client addresses (RFC 5782), IPv4 and IPv6, several zones with weights.

The lookups start when the client connects (the banner is not delayed unless
``stage = "connect"``); the verdict is given at RCPT (so that postmaster@ and
abuse@ stay reachable, RFC 5321 §4.5.1) or at the connection, and tags or
quarantine reasons are added with the message.  An A answer counts only
when it matches the zone's return codes (default 127.0.0.0/8 without the
127.255.255.0/24 "query refused" codes of RFC 5782 §2.1 practice); the reason
is the zone's TXT record for the same name.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailserv.config.schema import (
    Context,
    Invalid,
    Section,
    boolean,
    choice,
    hostname,
    integer,
    list_of,
    network,
    option,
    string,
)
from mailserv.errors import TemporaryFailure
from mailserv.filters.base import CONTINUE, FilterBase, Verdict
from mailserv.filters.common import (
    Pending,
    action_kind,
    cached_answer,
    clean,
    connection_marks,
    header_name,
    load_options,
    lookup,
    outcome,
    outcomes,
    parse_ip,
    resolver_for,
    results_for,
)
from mailserv.interfaces import IConnectionFilter, IMessageFilter, IRecipientFilter

log = Logger()

DEFAULT_CODES = (ipaddress.ip_network("127.0.0.0/8"),)
ERROR_CODES = ipaddress.ip_network("127.255.255.0/24")


@dataclass(frozen=True)
class Zone:
    zone: str
    weight: int = 1
    codes: tuple[Any, ...] = DEFAULT_CODES


class ZoneOptions(Section):
    zone: str = option(hostname)
    weight: int = option(integer(-100, 100), 1)
    codes: list[Any] = option(list_of(network), list)


def zone_kind(value: Any, ctx: Context, key: str) -> Zone:
    """``"zone.example"`` or ``{zone = "...", weight = 2, codes = ["127.0.0.2"]}``."""
    if isinstance(value, str):
        return Zone(hostname(value, ctx, key))
    if isinstance(value, dict):
        loaded = ZoneOptions.load(value, ctx, key)
        if loaded is None:
            raise Invalid("invalid zone table")
        return Zone(loaded.zone, loaded.weight, tuple(loaded.codes) or DEFAULT_CODES)
    raise Invalid("expected a zone name or a table {zone, weight, codes}")


@dataclass(frozen=True)
class Listing:
    zone: str
    weight: int
    codes: tuple[str, ...]
    reason: str


@dataclass
class LookupResult:
    listings: list[Listing] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def score(self) -> int:
        return sum(item.weight for item in self.listings)


def reversed_name(address: str) -> str | None:
    """RFC 5782 §2.1 (IPv4 octets) and §2.4 (IPv6 nibbles), reversed, without the arpa suffix."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return _strip_arpa(ip.reverse_pointer)


def _strip_arpa(pointer: str) -> str:
    for suffix in (".in-addr.arpa", ".ip6.arpa"):
        if pointer.endswith(suffix):
            return pointer[: -len(suffix)]
    return pointer


def _listing(zone: Zone, answer: Any) -> list[str]:
    """The return codes of an A answer that count for ``zone`` (RFC 5782 §2.1)."""
    codes = []
    for rdata in answer.records:
        ip = parse_ip(rdata.address)
        if ip is None:
            continue
        if ip in ERROR_CODES:
            log.warn("blocklist {zone} answered error code {code}", zone=zone.zone, code=str(ip))
            continue
        if any(ip in net for net in zone.codes):
            codes.append(str(ip))
    return codes


def _reason(txt: Any) -> str:
    for rdata in txt.records:
        return clean(b"".join(rdata.strings).decode("utf-8", "replace"), 200)
    return ""


def query_zone(resolver: Any, name: str, zone: Zone) -> Any:
    """Deferred Listing | None for ``name.zone``; TemporaryFailure propagates."""
    return lookup(resolver, f"{name}.{zone.zone}", "A").addCallback(_listed, resolver, name, zone)


def _listed(answer: Any, resolver: Any, name: str, zone: Zone) -> Any:
    codes = _listing(zone, answer)
    if not codes:
        return None
    listing = Listing(zone.zone, zone.weight, tuple(codes), "")

    def with_reason(txt: Any) -> Listing:
        return Listing(zone.zone, zone.weight, tuple(codes), _reason(txt))

    def without_reason(failure: Any) -> Listing:
        failure.trap(TemporaryFailure)
        return listing

    return lookup(resolver, f"{name}.{zone.zone}", "TXT").addCallbacks(with_reason, without_reason)


def cached_result(resolver: Any, name: str, zones: list[Zone]) -> LookupResult | None:
    """The LookupResult of ``name`` when every answer it needs is cached, else None."""
    result = LookupResult()
    for zone in zones:
        answer = cached_answer(resolver, f"{name}.{zone.zone}", "A")
        if answer is None:
            return None
        codes = _listing(zone, answer)
        if not codes:
            continue
        txt = cached_answer(resolver, f"{name}.{zone.zone}", "TXT")
        if txt is None:
            return None
        result.listings.append(Listing(zone.zone, zone.weight, tuple(codes), _reason(txt)))
    return result


def query_zones(resolver: Any, name: str, zones: list[Zone]) -> Any:
    """Deferred LookupResult of ``name`` in every zone, in parallel; never fails.

    Answered at once when every answer is in the resolver's cache.
    """
    cached = cached_result(resolver, name, zones)
    if cached is not None:
        return defer.succeed(cached)
    return _query_zones(resolver, name, zones)


def _query_zones(resolver: Any, name: str, zones: list[Zone]) -> Any:
    return outcomes([query_zone(resolver, name, zone) for zone in zones]).addCallback(
        _gathered, zones
    )


def _gathered(outcomes: list[tuple[bool, Any]], zones: list[Zone]) -> LookupResult:
    result = LookupResult()
    for zone, (ok, value) in zip(zones, outcomes, strict=True):
        if ok and value is not None:
            result.listings.append(value)
        elif not ok:
            result.errors.append(zone.zone)
            log.warn(
                "blocklist lookup in {zone} failed: {error}",
                zone=zone.zone,
                error=value.getErrorMessage(),
            )
    return result


class DNSBLOptions(Section):
    """Keys of ``filter = "dnsbl"``."""

    zones: list[Zone] = option(list_of(zone_kind, nonempty=True))
    threshold: int = option(integer(1), 1)
    action: str = option(action_kind, "reject")
    stage: str = option(choice("rcpt", "connect"), "rcpt")
    on_dns_error: str = option(choice("ignore", "tempfail"), "ignore")
    ipv6: bool = option(boolean, True)
    allowlist: list[Any] = option(list_of(network), list)
    exempt_recipients: list[str] = option(list_of(string), lambda: ["postmaster", "abuse"])
    header: str = option(header_name, "X-Mailserv-DNSBL")


@implementer(IConnectionFilter, IRecipientFilter, IMessageFilter)
class DNSBLFilter(FilterBase):
    """Look the client address up in DNS blocklists and act on a listing."""

    name = "dnsbl"
    default_timeout = 15.0

    def __init__(self, options: Mapping[str, Any] | None = None, service: Any = None) -> None:
        super().__init__(options, service)
        self.config = load_options(DNSBLOptions, self.options)
        self.resolver = resolver_for(service)
        self.exempt = {r.lower() for r in self.config.exempt_recipients}
        self._key = f"dnsbl:{id(self)}"

    def _name(self, session: Any) -> str | None:
        ip = parse_ip(session.peer_host)
        if ip is None:
            return None
        if any(ip in net for net in self.config.allowlist):
            return None
        if ip.version == 6 and ip.ipv4_mapped is None and not self.config.ipv6:
            return None
        return reversed_name(session.peer_host)

    def _pending(self, session: Any) -> Pending:
        marks = connection_marks(session)
        pending = marks.get(self._key)
        if pending is None:
            name = self._name(session)
            d = (
                query_zones(self.resolver, name, self.config.zones)
                if name is not None
                else defer.succeed(LookupResult())
            )
            pending = marks[self._key] = Pending(d)
            pending.wait().addCallback(self._record, session)
        return pending

    def _record(self, result: LookupResult, session: Any) -> None:
        if result.score >= self.config.threshold:
            marks = connection_marks(session)
            marks["listed"] = True  # read by the tarpit
            marks.setdefault("dnsbl_listings", []).extend(result.listings)

    def check_connect(self, session: Any) -> Any:
        pending = self._pending(session)
        if self.config.stage != "connect":
            return CONTINUE
        return pending.wait().addCallback(self._refusal, session)

    def check_recipient(self, session: Any, envelope: Any, rcpt: Any) -> Any:
        if self.config.stage != "rcpt" or rcpt.address.local.lower() in self.exempt:
            return CONTINUE
        return self._pending(session).wait().addCallback(self._refusal, session)

    def _refusal(self, result: LookupResult, session: Any) -> Verdict:
        if result.errors and self.config.on_dns_error == "tempfail":
            return Verdict.tempfail(451, "4.4.3", "Blocklist lookup failed, try again later")
        if result.score < self.config.threshold or self.config.action not in (
            "reject",
            "tempfail",
        ):
            return CONTINUE
        first = result.listings[0]
        text = f"Client host [{session.peer_host}] blocked using {first.zone}"
        if first.reason:
            text += f"; {first.reason}"
        return outcome(self.config.action, text, (554, "5.7.1", text))

    def check_message(self, session: Any, envelope: Any, message: Any) -> Any:
        pending = self._pending(session)
        if pending.done and isinstance(pending.result, LookupResult):
            return self._tag(pending.result, session, envelope)
        return pending.wait().addCallback(self._tag, session, envelope)

    def _tag(self, result: LookupResult, session: Any, envelope: Any) -> Verdict:
        if result.score < self.config.threshold or self.config.action in ("reject", "tempfail"):
            return CONTINUE
        text = ", ".join(f"{item.zone} ({'/'.join(item.codes)})" for item in result.listings)
        reason = f"client {session.peer_host} listed in {text}"
        return outcome(
            self.config.action,
            reason,
            None,
            ((self.config.header, clean(reason, 300)),),
            results_for(session, envelope).quarantine.append,
        )
