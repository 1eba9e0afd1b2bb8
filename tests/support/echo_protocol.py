"""A protocol for testing the service plumbing: greets with the peer it sees, then echoes lines."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver


class Echo(LineReceiver):
    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        secure = ISSLTransport.providedBy(self.transport)
        self.sendLine(f"hello {peer.host}:{peer.port} tls={secure}".encode())

    def lineReceived(self, line: bytes) -> None:
        if line == b"STARTTLS":
            self.sendLine(b"go ahead")
            self.transport.startTLS(self.factory.service.tls_options())
        else:
            self.sendLine(line)


def build_factory(service: Any, name: str, listener: Any) -> Factory:
    factory = Factory.forProtocol(Echo)
    factory.service = service  # type: ignore[attr-defined]
    return factory
