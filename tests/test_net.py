"""mailserv.net: eager writes on real loopback sockets."""

from __future__ import annotations

import os
from typing import Any

import pytest_twisted
from twisted.internet import defer, protocol, reactor, tcp
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from mailserv.net import EagerServer, make_eager


class Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(bytes(self.data))


class Scripted(protocol.Protocol):
    """On the first byte received, run ``script(transport)`` and record writer registration."""

    def __init__(self, script: Any, seen: dict[str, Any]) -> None:
        self.script = script
        self.seen = seen

    def dataReceived(self, data: bytes) -> None:
        if "ran" not in self.seen:
            self.seen["ran"] = True
            self.seen["transport"] = type(self.transport)
            self.seen["nodelay"] = self.transport.getTcpNoDelay()
            self.script(self.transport)
            self.seen["writing"] = self.transport in reactor.getWriters()


def _listen(script: Any, seen: dict[str, Any]) -> Any:
    factory = protocol.Factory.forProtocol(lambda: Scripted(script, seen))
    return make_eager(reactor.listenTCP(0, factory, interface="127.0.0.1"))


@defer.inlineCallbacks
def _exchange(script: Any) -> Any:
    seen: dict[str, Any] = {}
    port = _listen(script, seen)
    try:
        client = Collect()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        yield connectProtocol(endpoint, client)
        client.transport.write(b"go")
        data = yield client.done
    finally:
        yield port.stopListening()
    return data, seen


@pytest_twisted.inlineCallbacks
def test_a_reply_leaves_at_once_without_registering_for_write() -> Any:
    def script(transport: Any) -> None:
        transport.write(b"+OK hello\r\n")
        transport.writeSequence([b"+OK ", b"two\r\n"])
        reactor.callLater(0, transport.loseConnection)

    data, seen = yield _exchange(script)
    assert seen["transport"] is EagerServer
    assert seen["writing"] is False  # sent directly: no epoll registration, no extra iteration
    assert seen["nodelay"]  # a reply in two writes must not wait for a delayed ACK (Nagle)
    assert data == b"+OK hello\r\n+OK two\r\n"


@pytest_twisted.inlineCallbacks
def test_large_writes_keep_order_when_the_kernel_takes_only_part() -> Any:
    big = os.urandom(8 * 1024 * 1024)

    def script(transport: Any) -> None:
        transport.write(b"A" * 10)
        transport.write(big)  # more than the socket buffer: the rest is buffered
        transport.write(b"tail")  # must queue behind the buffered rest, not jump ahead
        transport.loseConnection()

    data, seen = yield _exchange(script)
    assert seen["writing"] is True
    assert data == b"A" * 10 + big + b"tail"


@pytest_twisted.inlineCallbacks
def test_write_after_lose_connection_is_not_sent_early_or_lost() -> Any:
    def script(transport: Any) -> None:
        transport.write(b"first\r\n")
        transport.loseConnection()
        transport.write(b"second\r\n")  # Twisted still sends what was written before the close

    data, _ = yield _exchange(script)
    assert data == b"first\r\nsecond\r\n"


@pytest_twisted.inlineCallbacks
def test_a_registered_producer_keeps_the_buffered_path() -> Any:
    chunks = [os.urandom(65536) for _ in range(64)]

    class Push:
        def __init__(self, transport: Any) -> None:
            self.transport = transport
            self.left = list(chunks)

        def resumeProducing(self) -> None:
            if self.left:
                self.transport.write(self.left.pop(0))
            else:
                self.transport.unregisterProducer()
                self.transport.loseConnection()

        def stopProducing(self) -> None:
            self.left = []

    def script(transport: Any) -> None:
        transport.registerProducer(Push(transport), False)

    data, _ = yield _exchange(script)
    assert data == b"".join(chunks)


def test_make_eager_leaves_other_ports_alone() -> None:
    class Other:
        transport = object

    other = Other()
    assert make_eager(other) is other and other.transport is object
    port = tcp.Port(0, protocol.Factory())  # not listening; only the class matters
    assert make_eager(port).transport is EagerServer
