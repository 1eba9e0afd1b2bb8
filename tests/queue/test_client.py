"""The hardened SMTP client driven over StringTransport with a Clock: exact bytes both ways."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailserv.queue.client import (
    DotStuffer,
    Reply,
    Session,
    SMTPClientError,
    SMTPClientProtocol,
    Timeouts,
    Transaction,
)


def stuff(chunks: list[bytes]) -> bytes:
    s = DotStuffer()
    return b"".join(s.feed(c) for c in chunks) + s.end()


MESSAGE = (
    b"Subject: dots\r\n\r\n.\r\n..\r\n.hidden\r\nmid . dot\r\n"
    b"\r\n.\r\nQUIT\r\n.\r\nlast line without dot\r\n"
)
EXPECTED = (
    b"Subject: dots\r\n\r\n..\r\n...\r\n..hidden\r\nmid . dot\r\n"
    b"\r\n..\r\nQUIT\r\n..\r\nlast line without dot\r\n.\r\n"
)


def test_dot_stuffing_on_every_chunk_boundary() -> None:
    """Defect 1: a "." line must be stuffed wherever the chunks are cut (RFC 5321 §4.5.2)."""
    for cut in range(len(MESSAGE) + 1):
        assert stuff([MESSAGE[:cut], MESSAGE[cut:]]) == EXPECTED, cut
    for cut1 in range(0, len(MESSAGE), 3):
        for cut2 in range(cut1, len(MESSAGE), 5):
            chunks = [MESSAGE[:cut1], MESSAGE[cut1:cut2], MESSAGE[cut2:]]
            assert stuff(chunks) == EXPECTED, (cut1, cut2)
    assert stuff([bytes([b]) for b in MESSAGE]) == EXPECTED


def test_dot_stuffing_completes_an_unterminated_last_line() -> None:
    assert stuff([b"a\r\n.b"]) == b"a\r\n..b\r\n.\r\n"
    assert stuff([b"a\r"]) == b"a\r\n.\r\n"
    assert stuff([b""]) == b".\r\n"


def test_bare_lf_is_sent_as_crlf_and_stuffed() -> None:
    assert stuff([b"a\n.b\n", b".c\n"]) == b"a\r\n..b\r\n..c\r\n.\r\n"
    assert stuff([b"a\r", b"\n.b\r\n"]) == b"a\r\n..b\r\n.\r\n"


class Peer:
    """The server side of a StringTransport conversation."""

    def __init__(self, **timeouts: float) -> None:
        self.clock = Clock()
        self.protocol = SMTPClientProtocol(self.clock, Timeouts(**timeouts))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def say(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def sent(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return bytes(value)


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def txn(data: bytes = b"Subject: x\r\n\r\nbody\r\n", size: int = 7, **kw: Any) -> Transaction:
    return Transaction(
        sender=kw.pop("sender", "a@here.test"),
        recipients=kw.pop(
            "recipients", [("b@there.test", None, None), ("c@there.test", None, None)]
        ),
        chunks=lambda: _chunks(data, size),
        size=len(data),
        **kw,
    )


def test_reply_parsing_multiline_and_enhanced_codes() -> None:
    peer = Peer()
    got: list[Reply] = []
    peer.protocol.greeting.addCallback(got.append)
    peer.say(b"220-first\r\n220-second\r\n220 third\r\n")
    assert got == [Reply(220, ("first", "second", "third"))]
    assert Reply(550, ("5.1.1 no such user",)).enhanced() == "5.1.1"
    assert Reply(550, ("no code",)).enhanced("5.0.0") == "5.0.0"


def test_malformed_or_overlong_reply_closes_the_connection() -> None:
    peer = Peer()
    failures: list[Any] = []
    peer.protocol.greeting.addErrback(failures.append)
    peer.say(b"2x0 what\r\n")
    assert peer.transport.disconnecting or peer.protocol.closed
    peer.protocol.connectionLost()
    assert failures and failures[0].check(SMTPClientError)
    peer = Peer()
    failures = []
    peer.protocol.greeting.addErrback(failures.append)
    peer.say(b"220 " + b"x" * 10_000)
    assert peer.protocol.closed


def test_greeting_timeout() -> None:
    peer = Peer(greeting=300)
    failures: list[Any] = []
    peer.protocol.greeting.addErrback(failures.append)
    peer.clock.advance(299)
    assert not failures
    peer.clock.advance(2)
    peer.protocol.connectionLost()
    assert "timeout waiting for the greeting" in str(failures[0].value)


def test_ehlo_helo_fallback_and_pipelined_transaction() -> None:
    peer = Peer()
    session = Session(peer.protocol, "me.here.test", "mx.there.test")
    opened = defer.ensureDeferred(session.open())
    peer.say(b"220 mx ESMTP\r\n")
    assert peer.sent() == b"EHLO me.here.test\r\n"
    peer.say(b"500 what is EHLO\r\n")
    assert peer.sent() == b"HELO me.here.test\r\n"
    peer.say(b"250 mx\r\n")
    assert opened.called and session.extensions.keywords == {}

    peer = Peer()
    session = Session(peer.protocol, "me.here.test", "mx.there.test")
    opened = defer.ensureDeferred(session.open())
    peer.say(b"220 mx ESMTP\r\n")
    peer.sent()
    peer.say(b"250-mx\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-DSN\r\n250 8BITMIME\r\n")
    assert opened.called
    t = txn(envid="e 1", ret="HDRS")
    t.recipients[0] = ("b@there.test", ["SUCCESS", "FAILURE"], "rfc822;b@there.test")
    result = defer.ensureDeferred(session.send(t))
    # RFC 2920: MAIL, every RCPT and DATA go in one write.
    assert peer.sent() == (
        b"MAIL FROM:<a@here.test> SIZE=20 RET=HDRS ENVID=e+201\r\n"
        b"RCPT TO:<b@there.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@there.test\r\n"
        b"RCPT TO:<c@there.test>\r\n"
        b"DATA\r\n"
    )
    peer.say(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
    assert peer.sent() == b"Subject: x\r\n\r\nbody\r\n.\r\n"
    peer.say(b"250 2.0.0 queued\r\n")
    replies = result.result
    assert replies["b@there.test"].code == 250
    assert str(replies["c@there.test"]) == "550 5.1.1 no"


def test_size_and_smtputf8_requirements_bounce_before_mail() -> None:
    peer = Peer()
    session = Session(peer.protocol, "me", "mx.there.test")
    defer.ensureDeferred(session.open())
    peer.say(b"220 mx\r\n")
    peer.say(b"250-mx\r\n250 SIZE 10\r\n")
    peer.sent()
    result = defer.ensureDeferred(session.send(txn()))
    assert peer.sent() == b""
    assert result.result["b@there.test"].code == 552
    utf = txn(sender="ü@here.test", smtputf8=True)
    result = defer.ensureDeferred(session.send(utf))
    assert result.result["b@there.test"].enhanced() == "5.6.7"
    result = defer.ensureDeferred(session.send(txn(body="8BITMIME")))
    assert result.result["b@there.test"].enhanced() == "5.6.3"


def test_without_pipelining_one_command_at_a_time_and_rset_after_failure() -> None:
    peer = Peer()
    session = Session(peer.protocol, "me", "mx.there.test")
    defer.ensureDeferred(session.open())
    peer.say(b"220 mx\r\n250 mx\r\n")
    peer.sent()
    result = defer.ensureDeferred(session.send(txn()))
    assert peer.sent() == b"MAIL FROM:<a@here.test>\r\n"
    peer.say(b"250 ok\r\n")
    assert peer.sent() == b"RCPT TO:<b@there.test>\r\n"
    peer.say(b"450 4.2.0 later\r\n")
    assert peer.sent() == b"RCPT TO:<c@there.test>\r\n"
    peer.say(b"550 5.1.1 no\r\n")
    assert peer.sent() == b"RSET\r\n"
    peer.say(b"250 ok\r\n")
    assert result.result["b@there.test"].temporary
    assert result.result["c@there.test"].permanent


def test_stripped_starttls_never_falls_back_to_plaintext_when_required() -> None:
    """Defect 7: when the policy requires TLS and STARTTLS is not offered, no MAIL is sent."""
    for mode in ("encrypt", "verify", "dane"):
        peer = Peer()
        session = Session(peer.protocol, "me", "mx.there.test", tls=mode, tls_context=object())
        opened = defer.ensureDeferred(session.open())
        failures: list[Any] = []
        opened.addErrback(failures.append)
        peer.say(b"220 mx\r\n")
        peer.sent()
        peer.say(b"250-mx\r\n250 PIPELINING\r\n")
        assert failures and failures[0].value.enhanced == "4.7.5"
        assert b"MAIL" not in peer.sent()


def test_refused_starttls_is_an_error_when_required() -> None:
    peer = Peer()
    session = Session(peer.protocol, "me", "mx.there.test", tls="verify", tls_context=object())
    opened = defer.ensureDeferred(session.open())
    failures: list[Any] = []
    opened.addErrback(failures.append)
    peer.say(b"220 mx\r\n250-mx\r\n250 STARTTLS\r\n")
    assert peer.sent().endswith(b"STARTTLS\r\n")
    peer.say(b"454 4.7.0 no TLS today\r\n")
    assert failures and "TLS is required" in str(failures[0].value)


def test_data_block_timeout_and_final_dot_timeout() -> None:
    peer = Peer(final_dot=600)
    session = Session(peer.protocol, "me", "mx.there.test")
    defer.ensureDeferred(session.open())
    peer.say(b"220 mx\r\n250-mx\r\n250 PIPELINING\r\n")
    peer.sent()
    result = defer.ensureDeferred(session.send(txn(recipients=[("b@there.test", None, None)])))
    failures: list[Any] = []
    result.addErrback(failures.append)
    peer.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert peer.sent().endswith(b".\r\n")
    peer.clock.advance(599)
    assert not failures
    peer.clock.advance(2)
    peer.protocol.connectionLost()
    assert "timeout waiting for the DATA reply" in str(failures[0].value)


def test_lost_connection_fails_every_outstanding_command() -> None:
    peer = Peer()
    failures: list[Any] = []
    peer.say(b"220 mx\r\n")
    for d in peer.protocol.commands([("NOOP", 10), ("NOOP", 10)]):
        d.addErrback(failures.append)
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    peer.protocol.connectionLost(Failure(ConnectionLost()))
    assert len(failures) == 2


@pytest.mark.parametrize("cut", [1, 2, 3, 4, 5, 7, 16, 64])
def test_body_sent_stuffed_whatever_the_read_size(cut: int) -> None:
    peer = Peer()
    session = Session(peer.protocol, "me", "mx.there.test")
    defer.ensureDeferred(session.open())
    peer.say(b"220 mx\r\n250-mx\r\n250 PIPELINING\r\n")
    peer.sent()
    defer.ensureDeferred(session.send(txn(MESSAGE, cut, recipients=[("b@t.test", None, None)])))
    assert peer.sent().startswith(b"MAIL FROM:")
    peer.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert peer.sent() == EXPECTED


def test_chunking_sends_bdat_pipelined_without_stuffing() -> None:
    """RFC 3030: with CHUNKING and PIPELINING the message goes as BDAT, unstuffed, no 354."""
    peer = Peer()
    session = Session(peer.protocol, "me", "mx.there.test")
    defer.ensureDeferred(session.open())
    peer.say(b"220 mx\r\n250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
    peer.sent()
    data = b"Subject: x\r\n\r\n.dot\r\n"
    result = defer.ensureDeferred(session.send(txn(data, 8)))
    assert peer.sent() == (
        b"MAIL FROM:<a@here.test>\r\nRCPT TO:<b@there.test>\r\nRCPT TO:<c@there.test>\r\n"
        b"BDAT 8\r\nSubject:BDAT 8\r\n x\r\n\r\n.dBDAT 4 LAST\r\not\r\n"
    )
    peer.say(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n250 8 octets\r\n250 8 octets\r\n")
    assert not result.called
    peer.say(b"250 2.0.0 queued\r\n")
    assert str(result.result["b@there.test"]) == "250 2.0.0 queued"
    assert str(result.result["c@there.test"]) == "550 5.1.1 no"


def test_chunking_failed_chunk_decides() -> None:
    peer = Peer()
    session = Session(peer.protocol, "me", "mx.there.test")
    defer.ensureDeferred(session.open())
    peer.say(b"220 mx\r\n250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
    peer.sent()
    result = defer.ensureDeferred(
        session.send(txn(b"a\r\nb\r\n", 3, recipients=[("b@t.test", None, None)]))
    )
    peer.say(b"250 ok\r\n250 ok\r\n452 4.3.1 disk full\r\n250 ok\r\n")
    assert result.result["b@t.test"].temporary


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_outbound_connections_send_at_once_without_buffering() -> None:
    """The client's writes leave at once when nothing is buffered (mailserv.net.EagerClient):
    no extra reactor iteration and epoll_ctl pair per pipelined group or message body."""
    from twisted.internet import protocol, reactor

    from mailserv.queue.client import SMTPClientProtocol, Timeouts
    from mailserv.queue.deliver import Deliverer

    received: list[bytes] = []

    class Greeter(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.write(b"220 hello\r\n")

        def dataReceived(self, data: bytes) -> None:
            received.append(data)

    factory = protocol.Factory.forProtocol(Greeter)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        client = SMTPClientProtocol(reactor, Timeouts())
        deliverer = Deliverer.__new__(Deliverer)
        deliverer.reactor = reactor
        deliverer.timeouts = Timeouts(connect=5)
        await deliverer._connect_tcp("127.0.0.1", port.getHost().port, client)
        await client.greeting
        client.transport.write(b"EHLO x\r\n")
        assert client.transport.dataBuffer == b"" and not client.transport._tempDataBuffer
        client.abort()
    finally:
        await port.stopListening()


def test_the_last_data_and_the_dot_go_out_in_one_write() -> None:
    """With eager writes and no Nagle, a separate 3-byte "." would be its own segment (or,
    with Nagle, wait for a delayed ACK): the last chunk carries the end of data."""
    peer = Peer()
    peer.say(b"220 hello\r\n")
    writes: list[bytes] = []
    real_write = peer.transport.write

    def recording(data: bytes) -> None:
        writes.append(data)
        real_write(data)

    peer.transport.write = recording  # type: ignore[method-assign]
    d = defer.ensureDeferred(peer.protocol.send_body(_chunks(b"Subject: x\r\n\r\n.hi\r\n", 100)))
    assert writes == [b"Subject: x\r\n\r\n..hi\r\n.\r\n"]
    got: list[Reply] = []
    d.addCallback(got.append)
    peer.say(b"250 ok\r\n")
    assert got == [Reply(250, ("ok",))]
