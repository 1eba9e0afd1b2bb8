"""mailserv.net: eager writes on real loopback sockets."""

from __future__ import annotations

import os
from typing import Any

import pytest_twisted
from twisted.internet import defer, protocol, reactor, task, tcp
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


@pytest_twisted.inlineCallbacks
def test_a_client_that_never_reads_stops_being_read() -> Any:
    """Back-pressure: replies above WRITE_HIGH stop command reading until the client reads."""
    import socket

    from mailserv.net import WRITE_HIGH

    reply = os.urandom(256 * 1024)
    state: dict[str, Any] = {"commands": 0, "max_pending": 0, "per_read": 1}

    class Replier(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            state["transport"] = self.transport
            state["per_read"] = max(state["per_read"], data.count(b"\n"))
            for _ in range(data.count(b"\n")):
                state["commands"] += 1
                self.transport.write(reply)
                state["max_pending"] = max(state["max_pending"], self.transport.pending_bytes())

    port = make_eager(
        reactor.listenTCP(0, protocol.Factory.forProtocol(Replier), interface="127.0.0.1")
    )
    sock = socket.create_connection(("127.0.0.1", port.getHost().port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.setblocking(False)
    try:
        for _ in range(200):  # 200 commands = 50 MiB of replies, if all were served
            sock.send(b"x\n")
            yield task.deferLater(reactor, 0.002, lambda: None)
        yield task.deferLater(reactor, 0.2, lambda: None)
        transport = state["transport"]
        served = state["commands"]
        assert served < 40, served  # stopped reading: most commands wait in the kernel
        assert transport not in reactor.getReaders()
        # What is buffered: the threshold plus at most the replies to one read's commands.
        bound = WRITE_HIGH + state["per_read"] * len(reply)
        assert state["max_pending"] <= bound < 20 * 1024 * 1024
        # The client reads: reading resumes and every reply arrives, complete.
        received = 0
        while received < 200 * len(reply):
            try:
                chunk = sock.recv(1 << 20)
            except BlockingIOError:
                yield task.deferLater(reactor, 0.001, lambda: None)
                continue
            assert chunk
            received += len(chunk)
        assert state["commands"] == 200 and received == 200 * len(reply)
        assert state["max_pending"] <= WRITE_HIGH + state["per_read"] * len(reply)
    finally:
        sock.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_back_pressure_keeps_a_pause_the_protocol_asked_for() -> Any:
    """A protocol's own pauseProducing is not undone when the backlog drains."""
    import socket

    reply = os.urandom(2 * 1024 * 1024)
    state: dict[str, Any] = {}

    class Pauser(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            state["transport"] = self.transport
            self.transport.write(reply)  # backlogged: reading stops
            self.transport.pauseProducing()  # and the protocol wants a pause of its own

    port = make_eager(
        reactor.listenTCP(0, protocol.Factory.forProtocol(Pauser), interface="127.0.0.1")
    )
    sock = socket.create_connection(("127.0.0.1", port.getHost().port))
    sock.setblocking(False)
    try:
        sock.send(b"go\n")
        yield task.deferLater(reactor, 0.1, lambda: None)
        received = 0
        while received < len(reply):
            try:
                received += len(sock.recv(1 << 20))
            except BlockingIOError:
                yield task.deferLater(reactor, 0.001, lambda: None)
        yield task.deferLater(reactor, 0.05, lambda: None)
        transport = state["transport"]
        assert transport.pending_bytes() == 0
        assert transport not in reactor.getReaders()  # still paused: the protocol's choice
        transport.resumeProducing()
        assert transport in reactor.getReaders()
    finally:
        sock.close()
        yield port.stopListening()
