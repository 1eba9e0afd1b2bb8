"""TCP transports that send a reply at once instead of on the next reactor iteration.

Twisted's ``FileDescriptor.write`` only appends to a buffer and registers the socket for writing;
the bytes leave on the next reactor iteration, after another ``epoll_wait``, and the socket is
unregistered again once the buffer is empty: two ``epoll_ctl`` calls and one extra iteration for
every reply of a request/response protocol (one SMTP, IMAP or POP3 command). :class:`EagerServer`
tries ``send`` right away when nothing is waiting in the buffer, and hands whatever the kernel did
not take to the ordinary buffered path, so ordering, flow control, producers and ``loseConnection``
behave exactly as before.

:func:`make_eager` switches a listening port returned by a TCP endpoint to this transport; every
listener of :class:`mailserv.service.MailService` goes through it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet import tcp

# Stop reading a client's commands while more than WRITE_HIGH bytes of replies wait to be sent,
# and read again below WRITE_LOW: a client that pipelines commands and never reads the replies
# (RETR or FETCH of a large message, over and over) holds at most about one read's worth of
# replies in memory instead of an unbounded buffer.
WRITE_HIGH = 1 << 20
WRITE_LOW = 256 << 10


def _send_now(conn: Any, data: bytes, producer_ok: bool) -> bytes:
    """Send what the kernel takes of ``data`` now if ``conn`` has nothing buffered; the rest.

    Not when closing, and never after STARTTLS (``conn.TLS``: writes must go through the TLS
    protocol); a direct send with nothing buffered keeps byte order.
    """
    if (
        data
        and type(data) is bytes
        and producer_ok
        and not conn.TLS
        and conn.connected
        and not conn.disconnecting
        and not conn._writeDisconnected
        and not conn._tempDataLen
        and conn.offset == len(conn.dataBuffer)
    ):
        sent = conn.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            return data[sent:]
        # An error is left to the buffered path: doWrite reports the loss as usual.
    return data


class EagerServer(tcp.Server):
    """A TCP server connection whose writes go out immediately when the buffer is empty.

    TCP_NODELAY is set: a reply written in two pieces (untagged lines, then the tagged one)
    leaves as two segments at once, where Nagle would hold the second until the client's
    delayed ACK (up to 40 ms). Twisted's buffered path coalesced such pieces; sending at once
    must not turn them into a stall.

    Back-pressure: above ``WRITE_HIGH`` bytes waiting to be sent the connection stops reading
    (the protocol gets no more commands) until the client has taken all but ``WRITE_LOW``;
    a pause the protocol asked for itself (``pauseProducing``) is kept apart and honoured.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._backlogged = False
        self._paused_by_protocol = False
        try:
            self.setTcpNoDelay(True)
        except OSError:
            pass  # a socket that cannot take it (already reset) fails on its first send

    def write(self, data: bytes) -> None:
        # A registered producer is paced by the buffered path.
        rest = _send_now(self, data, self.producer is None)
        if rest:
            super().write(rest)
            self._check_backlog()

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        chunks = list(iovec)
        if chunks and all(type(c) is bytes for c in chunks):
            self.write(b"".join(chunks))
        else:
            super().writeSequence(chunks)
            self._check_backlog()

    def doWrite(self) -> Any:
        result = super().doWrite()
        self._check_backlog()
        return result

    def pending_bytes(self) -> int:
        """Bytes written by the protocol and not yet taken by the kernel."""
        return len(self.dataBuffer) - self.offset + self._tempDataLen

    def _check_backlog(self) -> None:
        pending = self.pending_bytes()
        if not self._backlogged:
            if pending > WRITE_HIGH:
                self._backlogged = True
                tcp.Server.pauseProducing(self)
        elif pending <= WRITE_LOW:
            self._backlogged = False
            if not self._paused_by_protocol:
                tcp.Server.resumeProducing(self)

    def pauseProducing(self) -> None:
        self._paused_by_protocol = True
        super().pauseProducing()

    def resumeProducing(self) -> None:
        self._paused_by_protocol = False
        if not self._backlogged:
            super().resumeProducing()


def make_eager(port: Any) -> Any:
    """Make a listening ``port`` build :class:`EagerServer` transports, if it is plain TCP."""
    if isinstance(port, tcp.Port) and getattr(port, "transport", None) is tcp.Server:
        port.transport = EagerServer
    return port


class EagerClient(tcp.Client):
    """The client side of :class:`EagerServer`: an outbound connection's writes go out at once
    when nothing is buffered.

    A *streaming* producer may be registered (the SMTP client pauses its message data when the
    buffer fills): with an empty buffer there is nothing to keep in order behind, and a partial
    send hands the rest to the buffered path, which pauses the producer as usual.
    """

    def write(self, data: bytes) -> None:
        rest = _send_now(self, data, self.producer is None or bool(self.streamingProducer))
        if rest:
            super().write(rest)


class EagerConnector(tcp.Connector):
    """``reactor.connectTCP``'s connector, building :class:`EagerClient` transports."""

    def _makeTransport(self) -> EagerClient:
        return EagerClient(self.host, self.port, self.bindAddress, self, self.reactor)


def connect_eager(
    reactor: Any, host: str, port: int, factory: Any, timeout: float = 30.0
) -> EagerConnector:
    """``reactor.connectTCP(host, port, factory, timeout)`` with eager writes (IPv4 or IPv6)."""
    connector = EagerConnector(host, port, factory, timeout, None, reactor)
    connector.connect()
    return connector
