"""The one DNS entry point: dnspython's resolution logic, queries sent from the reactor.

Every lookup of mailserv (MX for the queue, SPF/DKIM/DMARC/DNSBL for the
filters, TLSA for DANE) goes through ``DNSResolver`` so that operators and
tests can point it at any server (``[dns] nameservers = ["127.0.0.1:5353"]``),
the reactor never blocks, and answers are cached (dnspython's LRU cache,
honouring TTLs, NXDOMAIN cached as dnspython does).

``lookup`` runs dnspython's own resolution state machine (``_Resolution``,
the one its asyncio resolver uses: cache, nameserver order and retries,
backoff, SERVFAIL and FORMERR handling, the lifetime) with the queries sent
by Twisted: a UDP socket per query, connected to the nameserver, and the
same query again over TCP when the UDP answer is truncated.  dnspython only
makes and parses the wire format, so a lookup costs no thread round trip.
``lookup_blocking`` (for code already in a thread: dkimpy, pyspf) is
dnspython's blocking resolver on the same cache.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.flags
import dns.inet
import dns.message
import dns.name
import dns.nameserver
import dns.query
import dns.rdataclass
import dns.rdatatype
import dns.resolver
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import ClientFactory
from twisted.protocols.basic import Int16StringReceiver
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


def answer_of(name: str, rdtype: str, answer: dns.resolver.Answer) -> DNSAnswer:
    """Our DNSAnswer of a dnspython Answer (cached or fresh)."""
    records = tuple(answer.rrset) if answer.rrset is not None else ()
    authenticated = bool(answer.response.flags & dns.flags.AD)
    return DNSAnswer(name, rdtype, records, authenticated=authenticated)


def failed_lookup(name: str, rdtype: str, exc: BaseException) -> DNSAnswer:
    """The answer a failed resolution stands for: NXDOMAIN (or a name that cannot
    exist) is an answer; no nameserver answering in time is a TemporaryFailure;
    anything else is re-raised."""
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return DNSAnswer(name, rdtype, nxdomain=True)
    if isinstance(
        exc, dns.resolver.NoNameservers | dns.exception.Timeout | dns.resolver.LifetimeTimeout
    ):
        raise TemporaryFailure(f"DNS lookup of {name} {rdtype} failed: {exc}") from None
    if isinstance(exc, dns.name.NameTooLong | dns.name.LabelTooLong | dns.name.EmptyLabel):
        return DNSAnswer(name, rdtype, nxdomain=True)
    raise exc


def _reactor_capable(resolver: dns.resolver.Resolver) -> bool:
    """True when every nameserver is plain DNS (UDP/TCP) and no TSIG is set.

    Nameservers read from resolv.conf are address strings, which dnspython
    turns into plain-DNS nameservers; other strings are URLs (DNS over HTTPS).
    """
    return resolver.keyname is None and all(
        dns.inet.is_address(ns)
        if isinstance(ns, str)
        else type(ns) is dns.nameserver.Do53Nameserver
        for ns in resolver.nameservers
    )


@implementer(IReloadable)
class DNSResolver:
    """Asynchronous lookups: ``lookup(name, "MX") -> Deferred[DNSAnswer]``.

    A timeout or a SERVFAIL fails the Deferred with TemporaryFailure; NXDOMAIN
    and NODATA are answers, not errors.  The reactor is ``reactor`` or the
    thread pools' (``threads.reactor``); without one, or for nameservers that
    are not plain DNS (DoH, DoT) or with TSIG, lookups run dnspython's
    blocking resolver in the ``dns`` thread pool.
    """

    def __init__(self, config: DNSSection, threads: Any, reactor: Any = None) -> None:
        self.threads = threads
        self.reactor = reactor if reactor is not None else getattr(threads, "reactor", None)
        self.resolver = build_resolver(config)
        self._native = _reactor_capable(self.resolver)

    def reload(self, config: Any) -> None:
        resolver = build_resolver(config.dns)
        self.resolver, self._native = resolver, _reactor_capable(resolver)

    def lookup(self, name: str, rdtype: str) -> Deferred[DNSAnswer]:
        if self.reactor is None or not self._native:
            return self.threads.run("dns", self.lookup_blocking, name, rdtype)
        return _Lookup(self.reactor, self.resolver, name, rdtype).start()

    def lookup_blocking(self, name: str, rdtype: str) -> DNSAnswer:
        """The same lookup, blocking: only for code already in a thread (dkimpy's dnsfunc)."""
        try:
            answer = self.resolver.resolve(name, rdtype, raise_on_no_answer=False, search=False)
        except Exception as exc:
            return failed_lookup(name, rdtype, exc)
        return answer_of(name, rdtype, answer)


class _Lookup:
    """One resolution: dnspython's ``_Resolution`` driven by Twisted I/O.

    The same steps as ``dns.asyncresolver.Resolver.resolve``: the next name
    (or the cached answer), the next nameserver (with its backoff), one query
    with what is left of the lifetime as its timeout, and the result handed
    back to the resolution, which caches it and says what comes next.
    """

    def __init__(self, reactor: Any, resolver: dns.resolver.Resolver, name: str, rdtype: str):
        self.reactor = reactor
        self.resolver = resolver
        self.name = name
        self.rdtype = rdtype
        self.deferred: Deferred[DNSAnswer] = Deferred()
        self.request: Any = None

    def start(self) -> Deferred[DNSAnswer]:
        try:
            self.resolution = dns.resolver._Resolution(
                self.resolver, self.name, self.rdtype, dns.rdataclass.IN, False, False, False
            )
            self.started = time.time()
            self._next_request()
        except Exception as exc:
            self._failed(exc)
        return self.deferred

    def _next_request(self) -> None:
        request, answer = self.resolution.next_request()
        if answer is not None:  # cached (an Answer with no records is still an answer)
            self._answered(answer)
            return
        self.request = request
        self._next_nameserver()

    def _next_nameserver(self) -> None:
        nameserver, tcp, backoff = self.resolution.next_nameserver()
        if backoff:
            self.reactor.callLater(backoff, self._step, self._send, nameserver, tcp)
        else:
            self._send(nameserver, tcp)

    def _step(self, fn: Any, *args: Any) -> None:
        """``fn(*args)`` from a timer or a socket: any exception ends the lookup."""
        try:
            fn(*args)
        except Exception as exc:
            self._failed(exc)

    def _send(self, nameserver: Any, tcp: bool) -> None:
        self.request.set_random_id()
        timeout = self.resolver._compute_timeout(self.started, None, self.resolution.errors)
        query = _TCPQuery if tcp else _UDPQuery
        query(self.reactor, self.request, nameserver.address, nameserver.port, timeout, self)

    def response(self, response: dns.message.Message | None, exc: Exception | None) -> None:
        """The outcome of one query (called by _UDPQuery/_TCPQuery, once)."""
        self._step(self._result, response, exc)

    def _result(self, response: dns.message.Message | None, exc: Exception | None) -> None:
        answer, done = self.resolution.query_result(response, exc)
        if answer is not None:
            self._answered(answer)
        elif done:
            self._next_request()
        else:
            self._next_nameserver()

    def _answered(self, answer: dns.resolver.Answer) -> None:
        self.deferred.callback(answer_of(self.name, self.rdtype, answer))

    def _failed(self, exc: Exception) -> None:
        try:
            answer = failed_lookup(self.name, self.rdtype, exc)
        except Exception:
            self.deferred.errback()
            return
        self.deferred.callback(answer)


class _Query:
    """One query to one nameserver with a deadline; reports to ``lookup.response`` once."""

    def __init__(self, reactor: Any, lookup: _Lookup, request: Any, timeout: float) -> None:
        self.lookup = lookup
        self.request = request
        self.done = False
        self.timer = reactor.callLater(timeout, self.finish, None, dns.exception.Timeout())

    def finish(self, response: Any, exc: Exception | None) -> None:
        if self.done:
            return
        self.done = True
        if self.timer.active():
            self.timer.cancel()
        self.close()
        self.lookup.response(response, exc)

    def close(self) -> None:
        raise NotImplementedError

    def parse(self, wire: bytes, truncation: bool) -> Any:
        return dns.message.from_wire(
            wire,
            keyring=self.request.keyring,
            request_mac=self.request.request_mac,
            raise_on_truncation=truncation,
        )


@implementer(IReadDescriptor)
class _UDPQuery(_Query):
    """The query in a datagram from a fresh socket connected to the nameserver.

    As ``dns.query.udp`` with ``ignore_errors``: a datagram that does not
    parse or answers another query is ignored (the wait goes on); a
    truncated answer to this query raises ``Truncated`` (the resolution then
    asks over TCP).  The connected socket takes datagrams from the
    nameserver only, and an ICMP refusal ends the query at once.  A plain
    socket watched by the reactor, not a ``listenUDP`` port (which logs two
    lines per port).
    """

    def __init__(
        self, reactor: Any, request: Any, host: str, port: int, timeout: float, lookup: _Lookup
    ) -> None:
        _Query.__init__(self, reactor, lookup, request, timeout)
        self.reactor = reactor
        self.wire = request.to_wire()
        self.sock: socket.socket | None = None
        try:
            sock = socket.socket(
                socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM
            )
        except OSError as exc:
            self.finish(None, exc)
            return
        self.sock = sock
        try:
            sock.setblocking(False)
            sock.connect((host, port))
            sock.send(self.wire)
        except OSError as exc:
            self.finish(None, exc)
            return
        reactor.addReader(self)

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def logPrefix(self) -> str:
        return "DNS query"

    def doRead(self) -> None:
        while not self.done and self.sock is not None:
            try:
                data = self.sock.recv(65535)
            except BlockingIOError:
                return
            except OSError as exc:  # ECONNREFUSED: the nameserver's port is closed
                self.finish(None, exc)
                return
            self._datagram(data)

    def _datagram(self, data: bytes) -> None:
        if data[:2] != self.wire[:2]:  # not the answer to this query's id
            return
        try:
            response = self.parse(data, True)
        except dns.message.Truncated as exc:
            if self.request.is_response(exc.message()):
                self.finish(None, exc)
            return
        except Exception:  # malformed: ignored, as dns.query.udp(ignore_errors=True) does
            return
        if self.request.is_response(response):
            self.finish(response, None)

    def connectionLost(self, reason: Any) -> None:
        # The reactor dropped the socket on an error (an ICMP refusal as EPOLLERR).
        self.finish(None, ConnectionRefusedError("nameserver port unreachable"))

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            self.reactor.removeReader(self)
            sock.close()


class _TCPQuery(_Query, ClientFactory):
    """The query over TCP (RFC 7766), as ``dns.query.tcp``: a length-prefixed message each way."""

    noisy = False  # no "Starting factory" log line per query

    def __init__(
        self, reactor: Any, request: Any, host: str, port: int, timeout: float, lookup: _Lookup
    ) -> None:
        _Query.__init__(self, reactor, lookup, request, timeout)
        self.wire = request.to_wire()
        self.stream: _TCPStream | None = None
        self.connector = reactor.connectTCP(host, port, self, timeout=max(timeout, 0.001))

    def buildProtocol(self, addr: Any) -> _TCPStream:
        self.stream = _TCPStream(self)
        return self.stream

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.finish(None, ConnectionError(reason.getErrorMessage()))

    def clientConnectionLost(self, connector: Any, reason: Any) -> None:
        self.finish(None, EOFError("the nameserver closed the connection"))

    def received(self, wire: bytes) -> None:
        try:
            response = self.parse(wire, False)
        except Exception as exc:
            self.finish(None, exc)
            return
        if not self.request.is_response(response):
            self.finish(None, dns.query.BadResponse())
            return
        self.finish(response, None)

    def close(self) -> None:
        if self.stream is not None and self.stream.transport is not None:
            self.stream.transport.loseConnection()
        else:
            self.connector.disconnect()


class _TCPStream(Int16StringReceiver):
    def __init__(self, query: _TCPQuery) -> None:
        self.query = query

    def connectionMade(self) -> None:
        self.sendString(self.query.wire)

    def stringReceived(self, string: bytes) -> None:
        self.query.received(string)
