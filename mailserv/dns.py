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

Plain lookups (``lookup(name, rdtype, dnssec=False)``: the filters' A, AAAA
and TXT lookups, which never read the AD bit) go through c-ares (pycares)
instead: the same nameservers, timeout and answers (NXDOMAIN, NODATA, a
timeout or a failing server as TemporaryFailure, TCP when the UDP answer is
truncated), the DNS messages made and read in C, which is what an uncached
lookup costs in dnspython (its message code is ~120 of its ~290 us of CPU;
c-ares's whole lookup is ~75 us).  c-ares's sockets are watched by the
reactor (its ``sock_state_cb``); c-ares's own query cache is off and the
answers are kept in ``PlainCache`` (ours: the TTLs as dnspython keeps them,
``cache_size`` entries, none when it is 0).
"""

from __future__ import annotations

import itertools
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from time import monotonic
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
import dns.ttl
import pycares
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.internet.protocol import ClientFactory
from twisted.protocols.basic import Int16StringReceiver
from twisted.python import log, threadable
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
        self.plain: PlainResolver | None = self._plain(config)

    def _plain(self, config: DNSSection) -> PlainResolver | None:
        """c-ares for the plain lookups: only on a reactor, for plain-DNS nameservers."""
        if self.reactor is None or not self._native or _answered is None:
            return None
        return PlainResolver(self.reactor, nameservers_of(self.resolver), config)

    def reload(self, config: Any) -> None:
        resolver = build_resolver(config.dns)
        self.resolver, self._native = resolver, _reactor_capable(resolver)
        old, self.plain = self.plain, self._plain(config.dns)
        if old is not None:
            old.retire()

    def lookup(self, name: str, rdtype: str, dnssec: bool = True) -> Deferred[DNSAnswer]:
        """``dnssec=False``: the caller does not read ``authenticated`` (always False then),
        so A, AAAA and TXT may go through c-ares."""
        # A name that is not ASCII (an IDN) takes dnspython's IDNA rules, not c-ares's.
        if not dnssec and self.plain is not None and rdtype in PLAIN_TYPES and name.isascii():
            return self.plain.lookup(name, rdtype)
        if self.reactor is None or not self._native:
            return self.threads.run("dns", self.lookup_blocking, name, rdtype)
        return _Lookup(self.reactor, self.resolver, name, rdtype).start()

    def cached(self, name: str, rdtype: str) -> DNSAnswer | None:
        """The cached answer of a plain lookup (``dnssec=False``), else None."""
        plain = self.plain
        if plain is None or plain.cache is None:
            return None
        return plain.cache.get(name, rdtype)

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


# --------------------------------------------------------------------------
# Plain lookups through c-ares


@dataclass(frozen=True, slots=True)
class AddressRecord:
    """An A or AAAA record of a plain lookup (``address`` as dnspython's rdata has it)."""

    address: str

    def to_text(self) -> str:
        return self.address


@dataclass(frozen=True, slots=True)
class TXTRecord:
    """A TXT record of a plain lookup: its character strings, as dnspython's ``strings``."""

    strings: tuple[bytes, ...]

    def to_text(self) -> str:
        return " ".join('"' + s.decode("latin-1").replace('"', '\\"') + '"' for s in self.strings)


_ffi: Any = pycares._ffi  # type: ignore[attr-defined]
_lib: Any = pycares._lib  # type: ignore[attr-defined]

PLAIN_TYPES = {
    "A": _lib.ARES_REC_TYPE_A,
    "AAAA": _lib.ARES_REC_TYPE_AAAA,
    "TXT": _lib.ARES_REC_TYPE_TXT,
}
_ANSWER, _AUTHORITY = _lib.ARES_SECTION_ANSWER, _lib.ARES_SECTION_AUTHORITY
_CNAME, _SOA = _lib.ARES_REC_TYPE_CNAME, _lib.ARES_REC_TYPE_SOA
_SUCCESS, _NXDOMAIN, _NODATA = _lib.ARES_SUCCESS, _lib.ARES_ENOTFOUND, _lib.ARES_ENODATA
_BAD_NAME = _lib.ARES_EBADNAME
# A channel being destroyed cancels its queries (from pycares's shutdown thread): the
# lookups' own timers end them.
_CANCELLED = (_lib.ARES_ECANCELLED, _lib.ARES_EDESTRUCTION)
_SOCKET_BAD = pycares.ARES_SOCKET_BAD
ARES_OPT_UDP_MAX_QUERIES = 1 << 19  # ares.h; pycares exports neither
ARES_OPT_QUERY_CACHE = 1 << 21
UDP_MAX_QUERIES = 200
IDLE_CLOSE = 30.0  # seconds without a lookup before a channel's sockets are closed


def nameservers_of(resolver: dns.resolver.Resolver) -> list[str]:
    """dnspython's nameservers (from ``[dns]`` or resolv.conf) as c-ares's ``host:port``."""
    out = []
    for ns in resolver.nameservers:  # plain DNS only (_reactor_capable)
        if isinstance(ns, str):
            host, port = ns, 53
        else:
            assert isinstance(ns, dns.nameserver.Do53Nameserver)
            host, port = ns.address, ns.port
        out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return out


class PlainCache:
    """Answers of plain lookups until their expiry: positive ones for the smallest TTL of
    the records and CNAMEs read, NXDOMAIN and NODATA for the SOA's negative TTL (RFC 2308)
    and, without an SOA, as long as the cache keeps them: what dnspython's cache does.
    At most ``size`` entries; when full, the oldest entry goes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: dict[tuple[str, str], tuple[float, DNSAnswer]] = {}

    def get(self, name: str, rdtype: str) -> DNSAnswer | None:
        found = self.entries.get((name, rdtype))
        if found is None:
            return None
        if found[0] > monotonic():
            return found[1]
        self.entries.pop((name, rdtype), None)
        return None

    def put(self, answer: DNSAnswer, ttl: float) -> None:
        entries = self.entries
        if len(entries) >= self.size:
            try:
                del entries[next(iter(entries))]
            except (StopIteration, KeyError, RuntimeError):
                pass
        entries[(answer.name, answer.rdtype)] = (monotonic() + ttl, answer)


# One C callback for every plain query (an ffi closure is costly to make): its argument is
# the query's number in _pending.
_pending: dict[int, _PlainLookup] = {}
# Queries whose lookup timed out before c-ares gave up on them: c-ares ends them on a
# later ``process`` (PlainResolver.sweep), or they would keep their socket open.
_orphans: dict[int, PlainResolver] = {}
_numbers = itertools.count(1)


def _on_answer(arg: Any, status: int, timeouts: int, record: Any) -> None:
    if status in _CANCELLED:
        return
    number = int(_ffi.cast("uintptr_t", arg))
    lookup = _pending.pop(number, None)
    if lookup is None:  # ended by its timer
        plain = _orphans.pop(number, None)
        if plain is not None:
            plain.orphans -= 1
        return
    try:
        lookup.answered(status, record)
    except Exception:  # never out through C: the lookup fails with it
        if lookup.deferred.called:
            log.err(None, "reading a DNS answer")
        else:
            lookup.deferred.errback()


try:
    _answered: Any = _ffi.callback("ares_callback_dnsrec", _on_answer)
except (MemoryError, OSError):  # no executable memory for cffi's closure: dnspython only
    _answered = None


def _name(pointer: Any) -> str:
    return _ffi.string(pointer).decode("ascii", "replace").lower().rstrip(".")  # type: ignore[no-any-return]


def _rdata(rr: Any, rtype: int) -> Any:
    if rtype == _lib.ARES_REC_TYPE_A:
        addr = _ffi.buffer(_lib.ares_dns_rr_get_addr(rr, _lib.ARES_RR_A_ADDR), 4)
        return AddressRecord(socket.inet_ntop(socket.AF_INET, addr[:]))
    if rtype == _lib.ARES_REC_TYPE_AAAA:
        addr = _ffi.buffer(_lib.ares_dns_rr_get_addr6(rr, _lib.ARES_RR_AAAA_ADDR), 16)
        return AddressRecord(socket.inet_ntop(socket.AF_INET6, addr[:]))
    size = _ffi.new("size_t *")
    strings = []
    for i in range(_lib.ares_dns_rr_get_abin_cnt(rr, _lib.ARES_RR_TXT_DATA)):
        data = _lib.ares_dns_rr_get_abin(rr, _lib.ARES_RR_TXT_DATA, i, size)
        strings.append(_ffi.buffer(data, size[0])[:] if data != _ffi.NULL else b"")
    return TXTRecord(tuple(strings))


def read_answer(name: str, rdtype: str, status: int, record: Any) -> tuple[DNSAnswer, float]:
    """(answer, TTL) of a c-ares response to ``name``/``rdtype``, read as dnspython's
    ``resolve_chaining`` reads one: the CNAME chain from the name asked, the records of the
    type asked at its end, the smallest TTL on the way; NXDOMAIN and NODATA with the SOA's
    negative TTL."""
    wanted = PLAIN_TYPES[rdtype]
    owner = name.lower().rstrip(".")
    ttl = float(dns.ttl.MAX_TTL)
    cnames: dict[str, tuple[str, int]] = {}
    found: dict[str, list[tuple[Any, int]]] = {}
    for i in range(_lib.ares_dns_record_rr_cnt(record, _ANSWER)):
        rr = _lib.ares_dns_record_rr_get_const(record, _ANSWER, i)
        rtype = _lib.ares_dns_rr_get_type(rr)
        if rtype == wanted:
            found.setdefault(_name(_lib.ares_dns_rr_get_name(rr)), []).append(
                (_rdata(rr, rtype), _lib.ares_dns_rr_get_ttl(rr))
            )
        elif rtype == _CNAME:
            target = _name(_lib.ares_dns_rr_get_str(rr, _lib.ARES_RR_CNAME_CNAME))
            cnames[_name(_lib.ares_dns_rr_get_name(rr))] = (target, _lib.ares_dns_rr_get_ttl(rr))
    for _ in range(16):
        if owner in found or owner not in cnames:
            break
        owner, cname_ttl = cnames[owner]
        ttl = min(ttl, cname_ttl)
    rrset = found.get(owner)
    if rrset and status == _SUCCESS:
        ttl = min(ttl, *(t for _, t in rrset))
        return DNSAnswer(name, rdtype, tuple(r for r, _ in rrset)), ttl
    for i in range(_lib.ares_dns_record_rr_cnt(record, _AUTHORITY)):
        rr = _lib.ares_dns_record_rr_get_const(record, _AUTHORITY, i)
        if _lib.ares_dns_rr_get_type(rr) == _SOA:
            minimum = _lib.ares_dns_rr_get_u32(rr, _lib.ARES_RR_SOA_MINIMUM)
            ttl = min(ttl, _lib.ares_dns_rr_get_ttl(rr), minimum)
            break
    return DNSAnswer(name, rdtype, nxdomain=status == _NXDOMAIN), ttl


def _channel(state: Callable[[int, bool, bool], None], servers: list[str], timeout: float) -> Any:
    """A pycares Channel reporting its sockets to ``state``, c-ares's query cache off.

    pycares sets no query cache option, so c-ares's default (answers kept up to an hour)
    would apply even with ``cache_size = 0``: the channel pycares made is made again with
    the same options (``ares_save_options``) and ``qcache_max_ttl = 0``.  One try per
    nameserver, each with the whole timeout, as dnspython's resolver with lifetime =
    timeout does; EDNS with a 1232-byte payload, TCP when an answer is truncated.

    Sockets stay open between queries (``STAYOPEN``: a UDP socket, its connect and its
    registration with the reactor cost ~20 us per lookup when c-ares closes it each time
    it goes idle), a UDP socket is replaced after ``UDP_MAX_QUERIES`` queries (a new
    source port, against spoofed answers), and PlainResolver closes an idle channel's.
    """
    flags = pycares.ARES_FLAG_EDNS | pycares.ARES_FLAG_NOSEARCH | pycares.ARES_FLAG_STAYOPEN
    # Any: its _channel (the c-ares channel pointer) is swapped below.
    channel: Any = pycares.Channel(sock_state_cb=state, timeout=timeout, tries=1, flags=flags)
    options = _ffi.new("struct ares_options *")
    mask = _ffi.new("int *")
    if _lib.ares_save_options(channel._channel[0], options, mask) != _SUCCESS:
        raise pycares.AresError("ares_save_options failed")
    try:
        options.qcache_max_ttl = 0
        options.udp_max_queries = UDP_MAX_QUERIES
        raw = _ffi.new("ares_channel *")
        optmask = mask[0] | ARES_OPT_QUERY_CACHE | ARES_OPT_UDP_MAX_QUERIES
        optmask &= ~_lib.ARES_OPT_SERVERS
        if _lib.ares_init_options(raw, options, optmask) != _SUCCESS:
            raise pycares.AresError("ares_init_options failed")
    finally:
        _lib.ares_destroy_options(options)
    original, channel._channel = channel._channel, raw
    _lib.ares_destroy(original[0])  # no query, no socket yet
    if servers:
        channel.servers = servers
    return channel


@implementer(IReadDescriptor, IWriteDescriptor)
class _AresSocket:
    """One of c-ares's sockets, watched by the reactor for c-ares."""

    def __init__(self, plain: PlainResolver, fd: int) -> None:
        self.plain = plain
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "DNS (c-ares)"

    def doRead(self) -> None:
        self.plain.process(self.fd, _SOCKET_BAD)

    def doWrite(self) -> None:
        self.plain.process(_SOCKET_BAD, self.fd)

    def connectionLost(self, reason: Any) -> None:
        # The reactor dropped the socket on an error (an ICMP refusal as EPOLLERR): c-ares
        # reads the error itself (and tries the next nameserver).
        self.plain.watched.pop(self.fd, None)
        self.plain.process(self.fd, _SOCKET_BAD)


class PlainResolver:
    """A c-ares channel on the reactor for the plain lookups of one ``[dns]`` config.

    Every lookup has the same timeout, so their deadlines come in the order they
    started: one timer for the oldest lookup still waiting, not one per lookup.
    """

    def __init__(self, reactor: Any, servers: list[str], config: DNSSection) -> None:
        self.reactor = reactor
        self.timeout = config.timeout
        self.cache = PlainCache(config.cache_size) if config.cache_size else None
        self.watched: dict[int, _AresSocket] = {}
        self.waiting: deque[_PlainLookup] = deque()  # by deadline; ended ones left for the timer
        self.timer: Any = None
        self.in_flight = 0
        self.orphans = 0
        self.sweeper: Any = None
        self.idler: Any = None
        self.last_start = 0.0
        self.retiring = False
        self.servers = servers
        self.channel: Any = None
        self.raw: Any = None
        self._open()

    def _open(self) -> None:
        self.channel = _channel(self._socket_state, self.servers, self.timeout)
        # The c-ares channel itself, for ares_query_dnsrec and ares_process_fd (pycares's
        # methods take a lock and a context manager per call; only the reactor uses it).
        self.raw = self.channel._channel[0]

    def _socket_state(self, fd: int, readable: bool, writable: bool) -> None:
        if threadable.ioThread is not None and not threadable.isInIOThread():
            return  # a channel destroyed by pycares's thread: its sockets were let go
        watched = self.watched.get(fd)
        if watched is None:
            if not (readable or writable):
                return
            watched = self.watched[fd] = _AresSocket(self, fd)
        if readable:
            self.reactor.addReader(watched)
        else:
            self.reactor.removeReader(watched)
        if writable:
            self.reactor.addWriter(watched)
        else:
            self.reactor.removeWriter(watched)
        if not (readable or writable):
            del self.watched[fd]

    def process(self, read_fd: int, write_fd: int) -> None:
        if self.channel is not None:
            _lib.ares_process_fd(self.raw, read_fd, write_fd)

    def lookup(self, name: str, rdtype: str) -> Deferred[DNSAnswer]:
        if self.cache is not None:
            cached = self.cache.get(name, rdtype)
            if cached is not None:
                return succeed(cached)
        return _PlainLookup(self, name, rdtype).start()

    def started(self, lookup: _PlainLookup, now: float) -> None:
        self.in_flight += 1
        self.last_start = now
        self.waiting.append(lookup)
        if self.timer is None:
            self.timer = self.reactor.callLater(self.timeout, self._deadlines)
        if self.idler is None:
            self.idler = self.reactor.callLater(IDLE_CLOSE, self._idle)

    def _idle(self) -> None:
        """After IDLE_CLOSE seconds without a lookup, the channel (and its sockets, kept open
        between queries) is replaced by a fresh one, which opens sockets when next asked."""
        self.idler = None
        if self.channel is None:
            return
        quiet = monotonic() - self.last_start
        if quiet < IDLE_CLOSE or self.in_flight or self.orphans:
            self.idler = self.reactor.callLater(max(IDLE_CLOSE - quiet, 0.01), self._idle)
            return
        self.close()
        self._open()

    def _deadlines(self) -> None:
        """Lookups past their deadline fail (c-ares's own timeouts processed first)."""
        self.timer = None
        self.process(_SOCKET_BAD, _SOCKET_BAD)
        waiting, now = self.waiting, monotonic()
        while waiting and (waiting[0].ended or waiting[0].deadline <= now):
            lookup = waiting.popleft()
            if not lookup.ended:
                lookup.timed_out()
        if waiting and self.channel is not None:
            self.timer = self.reactor.callLater(waiting[0].deadline - now, self._deadlines)

    def orphaned(self, number: int) -> None:
        """A lookup timed out while c-ares still waits for its answer (another nameserver)."""
        _orphans[number] = self
        self.orphans += 1
        if self.sweeper is None:
            self.sweeper = self.reactor.callLater(0, self.sweep)

    def sweep(self) -> None:
        """c-ares's timeouts processed until no timed-out query is left in the channel."""
        self.sweeper = None
        self.process(_SOCKET_BAD, _SOCKET_BAD)
        if self.orphans > 0 and self.channel is not None:
            delay = self.channel.timeout(self.timeout) + 0.001
            self.sweeper = self.reactor.callLater(delay, self.sweep)

    def ended(self) -> None:
        self.in_flight -= 1
        if self.retiring and not self.in_flight:
            self.reactor.callLater(0, self.close)

    def retire(self) -> None:
        """Replaced by a reload: closed once its lookups have ended."""
        self.retiring = True
        if not self.in_flight:
            self.close()

    def close(self) -> None:
        channel, self.channel = self.channel, None
        if channel is None:
            return
        for timer in (self.sweeper, self.timer, self.idler):
            if timer is not None and timer.active():
                timer.cancel()
        self.sweeper = self.timer = self.idler = None
        for number in [n for n, plain in _orphans.items() if plain is self]:
            del _orphans[number]
        for watched in list(self.watched.values()):
            self.reactor.removeReader(watched)
            self.reactor.removeWriter(watched)
        self.watched.clear()
        channel.close()


class _PlainLookup:
    """One plain lookup: a c-ares query, failed at its deadline by PlainResolver's timer."""

    __slots__ = ("deadline", "deferred", "ended", "name", "number", "plain", "rdtype")

    def __init__(self, plain: PlainResolver, name: str, rdtype: str) -> None:
        self.plain = plain
        self.name = name
        self.rdtype = rdtype
        self.deferred: Deferred[DNSAnswer] = Deferred()
        self.number = 0
        self.deadline = 0.0
        self.ended = False

    def start(self) -> Deferred[DNSAnswer]:
        plain = self.plain
        self.number = number = next(_numbers)
        now = monotonic()
        self.deadline = now + plain.timeout
        _pending[number] = self
        plain.started(self, now)
        status = _lib.ares_query_dnsrec(
            plain.raw,
            self.name.encode("ascii"),
            _lib.ARES_CLASS_IN,
            PLAIN_TYPES[self.rdtype],
            _answered,
            _ffi.cast("void *", number),
            _ffi.NULL,
        )
        if status != _SUCCESS and _pending.pop(number, None) is not None:
            self.answered(status, _ffi.NULL)
        return self.deferred

    def timed_out(self) -> None:
        if _pending.pop(self.number, None) is not None:
            self.plain.orphaned(self.number)
            self._end()
            self.deferred.errback(
                TemporaryFailure(f"DNS lookup of {self.name} {self.rdtype} failed: timed out")
            )

    def _end(self) -> None:
        self.ended = True
        self.plain.ended()

    def answered(self, status: int, record: Any) -> None:
        self._end()
        if status in (_SUCCESS, _NXDOMAIN, _NODATA) and record != _ffi.NULL:
            answer, ttl = read_answer(self.name, self.rdtype, status, record)
            cache = self.plain.cache
            if cache is not None and ttl > 0:
                cache.put(answer, ttl)
            self.deferred.callback(answer)
        elif status == _BAD_NAME:
            self.deferred.callback(DNSAnswer(self.name, self.rdtype, nxdomain=True))
        else:
            reason = _ffi.string(_lib.ares_strerror(status)).decode("ascii", "replace")
            self.deferred.errback(
                TemporaryFailure(f"DNS lookup of {self.name} {self.rdtype} failed: {reason}")
            )
