"""Defects 2-6 of ARCHITECTURE.md: each scenario fixed in SMTPServer, and shown on stock Twisted.

Every ``*_stock`` test runs the same bytes against an unmodified
``twisted.mail.smtp.ESMTP`` and asserts the defect is there, so the matching
test of our server is known to fail on stock Twisted.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from twisted.mail import imap4, smtp
from zope.interface import alsoProvides, implementer

from mailserv.testing import tls_string_transport
from tests.smtp.conftest import SMTPEnv


@implementer(smtp.IMessage)
class _Msg:
    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> Any:
        return defer.fail(OSError("disk full")) if self.fail else defer.succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(smtp.IMessageDelivery)
class _Delivery:
    def __init__(
        self, pending: list[defer.Deferred[Any]] | None = None, fail: bool = False
    ) -> None:
        self.pending = pending
        self.fail = fail

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> bytes:
        return b"Received: stock"

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: Any) -> Any:
        if self.pending is None:
            return lambda: _Msg(self.fail)
        d: defer.Deferred[Any] = defer.Deferred()
        self.pending.append(d)
        return d.addCallback(lambda _: lambda: _Msg(self.fail))


class _NoRealm:
    def requestAvatar(self, *args: Any) -> Any:
        raise NotImplementedError


def _stock(delivery: Any = None, transport: Any = None, **kw: Any) -> tuple[Any, Any]:
    proto = smtp.ESMTP(**kw)
    proto.delivery = delivery or _Delivery()
    proto.host = b"stock.example"
    t = transport or StringTransport()
    proto.makeConnection(t)
    t.clear()
    proto.dataReceived(b"EHLO c.example\r\n")
    t.clear()
    return proto, t


# -- defect 2: over-long DATA line --------------------------------------------


def test_defect2_long_data_line_stock() -> None:
    proto, t = _stock()
    proto.dataReceived(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    t.clear()
    proto.dataReceived(b"x" * 20000 + b"\r\n")
    proto.dataReceived(b"RSET\r\n")
    assert b"I remember nothing" in t.value()  # the rest of the body ran as a command


def test_defect2_long_data_line_fixed(env: SMTPEnv) -> None:
    c = env.connect()
    c.cmd(b"MAIL FROM:<a@remote.test>")
    c.cmd(b"RCPT TO:<alice@example.org>")
    c.cmd(b"DATA")
    c.send(b"x" * 20000 + b"\r\n")
    c.send(b"RSET\r\n")
    assert c.read() == b""


# -- defect 3: STARTTLS command injection, STARTTLS on implicit TLS ---------------


def test_defect3_starttls_injection_stock() -> None:
    proto, t = _stock(transport=tls_string_transport(), contextFactory=object())
    proto.dataReceived(b"STARTTLS\r\nRSET\r\n")
    assert t.value().startswith(b"220 ") and b"I remember nothing" in t.value()


def test_defect3_starttls_injection_fixed(env: SMTPEnv) -> None:
    c = env.connect()
    c.send(b"STARTTLS\r\nRSET\r\n")
    assert c.read() == b"220 2.0.0 Ready to start TLS\r\n"


def test_defect3_implicit_tls_readvertises_starttls_stock() -> None:
    transport = tls_string_transport()
    alsoProvides(transport, ISSLTransport)
    proto, t = _stock(transport=transport, contextFactory=object())
    proto.dataReceived(b"EHLO c.example\r\n")
    assert b"STARTTLS" in t.value()


def test_defect3_implicit_tls_fixed(env: SMTPEnv) -> None:
    c = env.connect("submission", ehlo=False, tls_mode="implicit")
    alsoProvides(c.transport, ISSLTransport)
    c.proto._tls = True
    assert b"STARTTLS" not in c.cmd(b"EHLO c.example")


# -- defect 4: AUTH in plaintext, malformed PLAIN raises -------------------------


def test_defect4_auth_stock() -> None:
    proto, t = _stock(chal={b"PLAIN": imap4.PLAINCredentials})
    proto.portal = Portal(_NoRealm(), [InMemoryUsernamePasswordDatabaseDontUse()])
    proto.dataReceived(b"EHLO c.example\r\n")
    assert b"AUTH PLAIN" in t.value()  # offered without TLS, to anyone
    with pytest.raises(Exception):  # noqa: B017 - any exception escapes to the transport
        proto.dataReceived(b"AUTH PLAIN " + base64.b64encode(b"no-nuls") + b"\r\n")


def test_defect4_auth_fixed(env: SMTPEnv) -> None:
    c = env.connect("submission", ehlo=False)
    assert b"AUTH" not in c.cmd(b"EHLO c.example")
    c2 = env.connect("submission", peer="127.0.0.1")
    assert c2.cmd(b"AUTH PLAIN " + base64.b64encode(b"no-nuls")) == (
        b"501 5.5.2 Malformed authentication data\r\n"
    )


# -- defect 5: pipelined replies reordered; end-of-data failure is permanent -----


def test_defect5_reordered_replies_stock() -> None:
    pending: list[defer.Deferred[Any]] = []
    proto, t = _stock(_Delivery(pending))
    proto.dataReceived(
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<one@d.example>\r\nRCPT TO:<two@d.example>\r\n"
    )
    t.clear()
    assert len(pending) == 2  # both checks run at once
    pending[1].errback(smtp.SMTPBadRcpt(b"two@d.example"))
    pending[0].callback(None)
    replies = t.value().split(b"\r\n")
    # RCPT two's refusal comes before RCPT one's acceptance: out of command order.
    assert replies[0].startswith(b"550") and replies[1].startswith(b"250")


def test_defect5_end_of_data_failure_stock() -> None:
    proto, t = _stock(_Delivery(fail=True))
    proto.dataReceived(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    t.clear()
    proto.dataReceived(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert t.value().startswith(b"550 ")


def test_defect5_fixed(env: SMTPEnv) -> None:
    env.store.failures["alice@example.org"] = OSError("disk full")
    c = env.connect()
    assert c.transaction().startswith(b"451 4.3.0")
    # Reordering: see test_server.test_pipelined_replies_keep_order_with_async_checks.


# -- defect 6: extensions, parameters and commands missing -----------------------


def test_defect6_stock() -> None:
    proto, t = _stock()
    proto.dataReceived(b"EHLO c.example\r\n")
    ehlo = t.value()
    for ext in (b"SIZE", b"8BITMIME", b"PIPELINING", b"ENHANCEDSTATUSCODES", b"SMTPUTF8"):
        assert ext not in ehlo
    t.clear()
    proto.dataReceived(b"NOOP\r\n")
    assert t.value().startswith(b"500")
    t.clear()
    proto.dataReceived(b"MAIL FROM:<a@b.example> SIZE=999999999999 BOGUS=1\r\n")
    assert t.value().startswith(b"250")  # parameters ignored


def test_defect6_fixed(env: SMTPEnv) -> None:
    c = env.connect(ehlo=False)
    ehlo = c.cmd(b"EHLO c.example")
    for ext in (b"SIZE", b"8BITMIME", b"PIPELINING", b"ENHANCEDSTATUSCODES", b"SMTPUTF8"):
        assert ext in ehlo
    for ext in (b"CHUNKING", b"DSN"):
        assert ext in ehlo
    assert c.cmd(b"NOOP") == b"250 2.0.0 OK\r\n"
    assert c.cmd(b"MAIL FROM:<a@b.example> SIZE=999999999999").startswith(b"552 5.3.4")
    assert c.cmd(b"MAIL FROM:<a@b.example> BOGUS=1").startswith(b"555 5.5.4")
