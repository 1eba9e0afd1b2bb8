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
    """A TCP server connection whose writes go out immediately when the buffer is empty."""

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
