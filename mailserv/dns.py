"""The one DNS entry point: dnspython's Resolver in the bounded ``dns`` thread pool.

Every lookup of mailserv (MX for the queue, SPF/DKIM/DMARC/DNSBL for the
filters, TLSA for DANE) goes through ``DNSResolver`` so that operators and
tests can point it at any server (``[dns] nameservers = ["127.0.0.1:5353"]``),
the reactor never blocks, and answers are cached (dnspython's LRU cache,
honouring TTLs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from twisted.internet.defer import Deferred
from zope.interface import implementer

from mailserv.config.sections import DNSSection
from mailserv.errors import TemporaryFailure
from mailserv.interfaces import IReloadable


@dataclass(frozen=True)
class DNSAnswer:
    """The outcome of one lookup.

    ``nxdomain``: the name does not exist.  ``records`` is empty for NODATA.
    ``authenticated``: the AD bit of a validating resolver (DNSSEC, for DANE).
    """

    name: str
    rdtype: str
    records: tuple[Any, ...] = field(default_factory=tuple)
    nxdomain: bool = False
    authenticated: bool = False

    def __bool__(self) -> bool:
        return bool(self.records)


def build_resolver(config: DNSSection) -> dns.resolver.Resolver:
    """A dnspython Resolver from ``[dns]``: the system's when no nameservers are set."""
    if config.nameservers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(host, port) for host, port in config.nameservers
        ]
    else:
        resolver = dns.resolver.Resolver()
    resolver.timeout = config.timeout
    resolver.lifetime = config.timeout
    resolver.use_edns(0, dns.flags.DO, 1232)
    if config.cache_size:
        resolver.cache = dns.resolver.LRUCache(config.cache_size)
    return resolver


@implementer(IReloadable)
class DNSResolver:
    """Asynchronous lookups: ``lookup(name, "MX") -> Deferred[DNSAnswer]``.

    A timeout or a SERVFAIL fails the Deferred with TemporaryFailure; NXDOMAIN
    and NODATA are answers, not errors.
    """

    def __init__(self, config: DNSSection, threads: Any) -> None:
        self.resolver = build_resolver(config)
        self.threads = threads

    def reload(self, config: Any) -> None:
        self.resolver = build_resolver(config.dns)

    def lookup(self, name: str, rdtype: str) -> Deferred[DNSAnswer]:
        return self.threads.run("dns", self.lookup_blocking, name, rdtype)

    def lookup_blocking(self, name: str, rdtype: str) -> DNSAnswer:
        """The same lookup, blocking: only for code already in a thread (dkimpy's dnsfunc)."""
        try:
            answer = self.resolver.resolve(name, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN:
            return DNSAnswer(name, rdtype, nxdomain=True)
        except (
            dns.resolver.NoNameservers,
            dns.exception.Timeout,
            dns.resolver.LifetimeTimeout,
        ) as exc:
            raise TemporaryFailure(f"DNS lookup of {name} {rdtype} failed: {exc}") from None
        except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel):
            return DNSAnswer(name, rdtype, nxdomain=True)
        records = tuple(answer.rrset) if answer.rrset is not None else ()
        authenticated = bool(answer.response.flags & dns.flags.AD)
        return DNSAnswer(name, rdtype, records, authenticated=authenticated)
