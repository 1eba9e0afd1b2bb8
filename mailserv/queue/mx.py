"""Where mail for a domain goes: MX resolution (RFC 5321 §5.1, RFC 7505).

- MX records sorted by preference, random order among equal preferences.
- No MX at all: the domain itself is the implicit MX (its A/AAAA records).
- A null MX (``MX 0 .``, RFC 7505) means the domain accepts no mail: 556 5.1.10
  at once, never a connection to 0.0.0.0 (defect 7).
- Unusable addresses (unspecified, multicast, broadcast) are dropped; if an
  MX host is one of our own addresses, it and every MX host of equal or worse
  preference are dropped (§5.1), and nothing left is a loop (5.4.6).
- Every host keeps all its addresses (IPv6 and IPv4) so that the client can
  try each before deferring.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer

from mailserv.errors import SMTPReply, TemporaryFailure


@dataclass
class MXHost:
    """One MX host: its name, preference and addresses (in the order to try)."""

    name: str
    preference: int
    addresses: list[str] = field(default_factory=list)
    # DNSSEC: the address records were validated (RFC 7672 §2.2.2).
    secure: bool = False


@dataclass
class MXRoute:
    """The hosts for a domain, best first; ``secure``: the MX lookup was DNSSEC-validated."""

    domain: str
    hosts: list[MXHost]
    secure: bool = False
    implicit: bool = False


def usable_address(text: str) -> bool:
    """False for addresses no one can deliver to: 0.0.0.0, ::, multicast, broadcast."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    if address.is_unspecified or address.is_multicast:
        return False
    return not (address.version == 4 and address.is_reserved)  # 240/4 and 255.255.255.255


def _name(value: Any) -> str:
    return str(value).rstrip(".").lower()


def order_mx(records: Sequence[tuple[int, str]], rng: random.Random) -> list[tuple[int, str]]:
    """Sort by preference, shuffling hosts of equal preference (RFC 5321 §5.1)."""
    shuffled = list(records)
    rng.shuffle(shuffled)
    return sorted(shuffled, key=lambda r: r[0])


class MXResolver:
    """``resolve(domain) -> Deferred[MXRoute]``; fails with SMTPReply or TemporaryFailure.

    ``resolver`` is a mailserv.dns.DNSResolver (or anything with ``lookup``);
    ``is_own(address)`` tells whether an address is one of ours.
    """

    def __init__(
        self,
        resolver: Any,
        is_own: Callable[[str], bool] = lambda address: False,
        ipv6_first: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.resolver = resolver
        self.is_own = is_own
        self.ipv6_first = ipv6_first
        self.rng = rng or random.Random()  # noqa: S311 - load spreading, not secrets

    def resolve(self, domain: str) -> defer.Deferred[MXRoute]:
        return defer.ensureDeferred(self._resolve(domain.lower().rstrip(".")))

    async def _resolve(self, domain: str) -> MXRoute:
        if domain.startswith("[") and domain.endswith("]"):
            literal = domain[1:-1]
            if literal.lower().startswith("ipv6:"):
                literal = literal[5:]
            if not usable_address(literal) or self.is_own(literal):
                raise SMTPReply(550, "5.4.6", f"address literal {domain} is not usable")
            return MXRoute(domain, [MXHost(literal, 0, [literal])])
        answer = await self.resolver.lookup(domain, "MX")
        if answer.nxdomain:
            raise SMTPReply(550, "5.1.2", f"domain {domain} does not exist (NXDOMAIN)")
        records = [(int(r.preference), _name(r.exchange)) for r in answer.records]
        if not records:
            host = MXHost(domain, 0)
            await self.addresses(host)
            if not host.addresses:
                raise SMTPReply(550, "5.1.2", f"domain {domain} has no MX and no address records")
            route = MXRoute(domain, [host], answer.authenticated, implicit=True)
            return self._without_self(route)
        real = [(pref, name) for pref, name in records if name not in ("", ".")]
        if not real:
            # RFC 7505 §3: a null MX is the only MX of a domain that accepts no mail.
            raise SMTPReply(556, "5.1.10", f"domain {domain} accepts no mail (null MX)")
        hosts = [MXHost(name, pref) for pref, name in order_mx(real, self.rng)]
        await defer.gatherResults(
            [defer.ensureDeferred(self.addresses(h)) for h in hosts], consumeErrors=True
        ).addErrback(_unwrap)
        route = MXRoute(domain, [h for h in hosts if h.addresses], answer.authenticated)
        if not route.hosts:
            raise TemporaryFailure(f"no MX host of {domain} has a usable address")
        return self._without_self(route)

    def _without_self(self, route: MXRoute) -> MXRoute:
        """RFC 5321 §5.1: drop ourselves and every MX not better than us."""
        for i, host in enumerate(route.hosts):
            if any(self.is_own(a) for a in host.addresses):
                kept = [h for h in route.hosts[:i] if h.preference < host.preference]
                if not kept:
                    raise SMTPReply(550, "5.4.6", f"mail for {route.domain} loops back to myself")
                route.hosts = kept
                break
        return route

    async def addresses(self, host: MXHost) -> None:
        kinds = ("AAAA", "A") if self.ipv6_first else ("A", "AAAA")
        results = await defer.DeferredList(
            [self.resolver.lookup(host.name, kind) for kind in kinds], consumeErrors=True
        )
        addresses: list[str] = []
        secure = True
        failures = 0
        for ok, answer in results:
            if not ok:
                failures += 1
                continue
            secure = secure and answer.authenticated
            addresses.extend(str(r.address) for r in answer.records)
        if failures == len(kinds):
            raise TemporaryFailure(f"address lookup of {host.name} failed")
        host.addresses = [a for a in dict.fromkeys(addresses) if usable_address(a)]
        host.secure = secure and failures == 0


def _unwrap(failure: Any) -> Any:
    """gatherResults wraps the first error in FirstError: raise the error itself."""
    if failure.check(defer.FirstError):
        return failure.value.subFailure
    return failure
