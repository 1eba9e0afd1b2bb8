"""The HAProxy PROXY protocol (v1 and v2) in front of any listener, from trusted proxies only.

Twisted's ``HAProxyWrappingFactory`` connects the inner protocol before the
header has arrived: an SMTP greeting goes out and the inner protocol sees the
proxy's address, and nothing checks who may send the header.  This wrapper
(reusing Twisted's v1/v2 parsers) refuses connections from addresses outside
``trusted``, reads the header first (bounded in size and time), and only then
connects the inner protocol, whose ``transport.getPeer()`` is the client the
proxy reported.  A v2 ``LOCAL`` header (a health check) keeps the real peer.
"""

from __future__ import annotations

import ipaddress
from typing import Any, cast

from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

log = Logger()

HEADER_TIMEOUT = 10.0
# v1 is at most 107 bytes; v2 is 16 bytes plus its length field (TLVs from load balancers
# stay small).  Anything longer is refused rather than buffered.
MAX_HEADER = 16 + 4096


class ProxyHeaderProtocol(policies.ProtocolWrapper):
    """Reads the PROXY header, then builds and connects the wrapped protocol.

    The wrapped factory's ``buildProtocol`` gets the client address from the
    header (the proxy's own for a v2 LOCAL header), so per-IP limits in a
    protocol factory count clients, not the proxy.
    """

    transport: Any

    def __init__(self, factory: Any, wrapped: Any) -> None:
        super().__init__(factory, wrapped)
        self._info: Any = None
        self._parser: V1Parser | V2Parser | None = None
        self._seen = 0
        self._timeout: Any = None
        self._connected_inner = False

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._timeout = self.factory.reactor.callLater(HEADER_TIMEOUT, self._header_timeout)

    def _header_timeout(self) -> None:
        self._timeout = None
        log.info("no PROXY header from {peer} in time", peer=self.transport.getPeer())
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._connected_inner:
            self.wrappedProtocol.dataReceived(data)
            return
        self._seen += len(data)
        if self._parser is None:
            if len(data) >= 16 and data[:12] == V2Parser.PREFIX and data[12] & 0xF0 == 0x20:
                self._parser = V2Parser()
            elif len(data) >= 6 and data[:6] == V1Parser.PROXYSTR + b" ":
                self._parser = V1Parser()
            else:
                self._refuse("no PROXY header")
                return
        try:
            info, remaining = self._parser.feed(data)
        except InvalidProxyHeader:
            self._refuse("malformed PROXY header")
            return
        if info is None:
            if self._seen > MAX_HEADER:
                self._refuse("PROXY header too long")
            return
        self._info = info
        if self._timeout is not None:
            self._timeout.cancel()
            self._timeout = None
        wrapped = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if wrapped is None:
            self.transport.loseConnection()
            return
        self.wrappedProtocol = wrapped
        self._connected_inner = True
        self.wrappedProtocol.makeConnection(cast(Any, self))
        if remaining and self._connected_inner and self.connected:
            self.wrappedProtocol.dataReceived(remaining)

    def _refuse(self, why: str) -> None:
        log.warn("{why} from {peer}; closing", why=why, peer=self.transport.getPeer())
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timeout is not None:
            self._timeout.cancel()
            self._timeout = None
        if self._connected_inner:
            super().connectionLost(reason)
        else:
            self.disconnecting = True
            self.factory.unregisterProtocol(self)

    def getPeer(self) -> Any:
        if self._info is not None and self._info.source is not None:
            return self._info.source
        return self.transport.getPeer()

    def getHost(self) -> Any:
        if self._info is not None and self._info.destination is not None:
            return self._info.destination
        return self.transport.getHost()


class TrustedProxyFactory(policies.WrappingFactory):
    """PROXY protocol from ``trusted`` networks only; other peers are refused at once."""

    protocol = ProxyHeaderProtocol

    def __init__(self, wrapped: Any, trusted: list[Any], reactor: Any) -> None:
        super().__init__(wrapped)
        self.trusted = trusted
        self.reactor = reactor

    def buildProtocol(self, addr: Any) -> Any:
        try:
            host = ipaddress.ip_address(getattr(addr, "host", ""))
        except ValueError:
            host = None
        if host is None or not any(host in net for net in self.trusted):
            log.warn("refused a connection from {peer}: not a trusted proxy", peer=addr)
            return None
        # The wrapped protocol is built once the header names the client.
        return self.protocol(self, None)
