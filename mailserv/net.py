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


class EagerServer(tcp.Server):
    """A TCP server connection whose writes go out immediately when the buffer is empty.

    TCP_NODELAY is set: a reply written in two pieces (untagged lines, then the tagged one)
    leaves as two segments at once, where Nagle would hold the second until the client's
    delayed ACK (up to 40 ms). Twisted's buffered path coalesced such pieces; sending at once
    must not turn them into a stall.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        try:
            self.setTcpNoDelay(True)
        except OSError:
            pass  # a socket that cannot take it (already reset) fails on its first send

    def _idle(self) -> bool:
        # Nothing buffered, no producer to pace, not closing: a direct send keeps byte order.
        # After STARTTLS (self.TLS) writes must go through the TLS protocol: never eager.
        return (
            not self.TLS
            and bool(self.connected)
            and not self.disconnecting
            and not self._writeDisconnected
            and self.producer is None
            and not self._tempDataLen
            and self.offset == len(self.dataBuffer)
        )

    def write(self, data: bytes) -> None:
        if data and type(data) is bytes and self._idle():
            sent = self.writeSomeData(data)
            if isinstance(sent, int) and sent > 0:
                if sent == len(data):
                    return
                data = data[sent:]
            # An error is left to the buffered path: doWrite reports the loss as usual.
        super().write(data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        chunks = list(iovec)
        if chunks and all(type(c) is bytes for c in chunks):
            self.write(b"".join(chunks))
        else:
            super().writeSequence(chunks)


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

    def _may_send_now(self) -> bool:
        return (
            not self.TLS
            and bool(self.connected)
            and not self.disconnecting
            and not self._writeDisconnected
            and (self.producer is None or bool(self.streamingProducer))
            and not self._tempDataLen
            and self.offset == len(self.dataBuffer)
        )

    def write(self, data: bytes) -> None:
        if type(data) is bytes and data and self._may_send_now():
            sent = self.writeSomeData(data)
            data = data[sent:] if isinstance(sent, int) and sent > 0 else data
            if not data:
                return
        super().write(data)


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
