"""A real DNS server for tests: twisted.names on 127.0.0.1, serving zones from a JSON file.

Run as ``python tests/support/dnsserver.py ZONES.json PORTFILE``.  It listens on UDP and TCP on
the same free port of 127.0.0.1, writes that port to PORTFILE, and re-reads ZONES.json whenever
it changes, so a test can declare records while the server runs.  The JSON maps owner names to
record types to lists of values::

    {"example.test": {"MX": [[10, "mx.example.test"]], "A": ["127.0.0.2"], "TXT": ["v=spf1 -all"]},
     "www.example.test": {"CNAME": ["example.test"]},
     "slow.example.test": {"TIMEOUT": true}}

Every type maps to a list of values.

Types: A, AAAA, MX [pref, host], TXT (string or list of strings), CNAME, NS, PTR, TLSA
[usage, selector, mtype, hex], SRV [prio, weight, port, target].  A name with ``"TIMEOUT": true``
is never answered (a resolver sees a timeout).  A name absent from the file is NXDOMAIN; a name
present without the asked type answers NOERROR with no records.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.error import CannotListenError
from twisted.names import common, dns, error, server


def _record(name: str, rtype: str, value: Any, ttl: int = 60) -> dns.RRHeader:
    if rtype == "A":
        payload: Any = dns.Record_A(value, ttl)
    elif rtype == "AAAA":
        payload = dns.Record_AAAA(value, ttl)
    elif rtype == "MX":
        payload = dns.Record_MX(value[0], value[1].encode(), ttl)
    elif rtype == "TXT":
        strings = value if isinstance(value, list) else [value]
        payload = dns.Record_TXT(*[s.encode() for s in strings], ttl=ttl)
    elif rtype == "CNAME":
        payload = dns.Record_CNAME(value.encode(), ttl)
    elif rtype == "NS":
        payload = dns.Record_NS(value.encode(), ttl)
    elif rtype == "PTR":
        payload = dns.Record_PTR(value.encode(), ttl)
    elif rtype == "SRV":
        payload = dns.Record_SRV(value[0], value[1], value[2], value[3].encode(), ttl)
    elif rtype == "TLSA":
        payload = dns.UnknownRecord(
            bytes([value[0], value[1], value[2]]) + bytes.fromhex(value[3]), ttl
        )
        return dns.RRHeader(name.encode(), 52, dns.IN, ttl, payload, auth=True)
    else:
        raise ValueError(f"unsupported record type {rtype}")
    return dns.RRHeader(name.encode(), payload.TYPE, dns.IN, ttl, payload, auth=True)


class ZoneFileResolver(common.ResolverBase):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._mtime = 0.0
        self._zones: dict[str, dict[str, Any]] = {}

    def _load(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError:
            return
        if mtime != self._mtime:
            with open(self.path, encoding="utf-8") as f:
                raw = json.load(f)
            self._zones = {k.lower().rstrip("."): v for k, v in raw.items()}
            self._mtime = mtime

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> defer.Deferred[Any]:
        self._load()
        owner = name.decode("ascii", "replace").lower().rstrip(".")
        zone = self._zones.get(owner)
        if zone is None:
            return defer.fail(error.DomainError(name))
        if zone.get("TIMEOUT"):
            return defer.Deferred()  # never answered
        wanted = dns.QUERY_TYPES.get(type) or dns.EXT_QUERIES.get(type) or ""
        if type == 52:
            wanted = "TLSA"
        answers = [
            _record(owner, rtype, value)
            for rtype, values in zone.items()
            if rtype == wanted or rtype == "CNAME" or type == dns.ALL_RECORDS
            for value in values
        ]
        return defer.succeed((answers, [], []))


def main() -> None:
    zones, portfile = sys.argv[1], sys.argv[2]
    # UDP and TCP on the same port: bind UDP to a free port, then TCP to it (retry on clash).
    factory = server.DNSServerFactory(authorities=[ZoneFileResolver(zones)])
    for _ in range(50):
        # A new protocol per attempt: the one of an abandoned UDP port keeps its transport
        # until the reactor runs, and a protocol cannot be connected twice.
        protocol = dns.DNSDatagramProtocol(factory)
        udp = reactor.listenUDP(0, protocol, interface="127.0.0.1")
        port = udp.getHost().port
        try:
            reactor.listenTCP(port, factory, interface="127.0.0.1")
            break
        except CannotListenError:  # port taken for TCP: try another
            udp.stopListening()
    else:
        raise SystemExit("no free port for UDP and TCP")
    tmp = portfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(port))
    os.replace(tmp, portfile)
    reactor.run()


if __name__ == "__main__":
    socket.setdefaulttimeout(5)
    main()
