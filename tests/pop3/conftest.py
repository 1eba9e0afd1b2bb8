"""Fixtures of the POP3 protocol tests: a server on a StringTransport driven by a Clock."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailserv.directory import User
from mailserv.errors import TemporaryFailure
from mailserv.pop3.mailbox import open_maildrop
from mailserv.pop3.server import POP3Factory, POP3Server
from mailserv.testing import MemoryMailStore

HOSTNAME = "mail.example.org"


class PlainExchange:
    """SASL PLAIN (RFC 4616) as the fake auth layer runs it."""

    def step(self, response: bytes | None) -> tuple[bytes | None, Any]:
        if response is None:
            return b"", None
        parts = response.split(b"\0")
        if len(parts) != 3:
            raise ValueError("malformed PLAIN response")
        return None, ("plain", parts[1], parts[2])


class FakeBackend:
    """The auth layer: users with passwords, PLAIN offered when secure, APOP when enabled."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.passwords = {b"alice": b"wonder land", b"bob": b"builder"}
        self.apop = False
        self.down = False
        self.failure_delay = 2.0
        self.failures: list[str] = []
        self.successes: list[tuple[str, str]] = []
        self.logins: list[Any] = []

    def login(self, creds: Any) -> defer.Deferred[Any]:
        self.logins.append(creds)
        if self.down:
            return defer.fail(TemporaryFailure("backend down"))
        if isinstance(creds, tuple):
            _, name, password = creds
            ok = self.passwords.get(name) == password
        elif hasattr(creds, "checkPassword"):
            name = creds.username
            ok = name in self.passwords and creds.checkPassword(self.passwords[name])
        else:
            name, ok = creds.username, self.passwords.get(creds.username) == creds.password
        if not ok:
            return defer.fail(UnauthorizedLogin())
        n = name.decode()
        return defer.succeed(User(name=n, mailbox=f"/nonexistent/{n}"))

    def apop_enabled(self) -> bool:
        return self.apop

    def mechanisms(self, secure: bool) -> list[str]:
        return ["PLAIN"] if secure else []

    def start_sasl(self, name: str, secure: bool, challenge_id: bytes) -> PlainExchange | None:
        return PlainExchange() if name == "PLAIN" and secure else None

    def failed(self, peer_host: str) -> defer.Deferred[None]:
        self.failures.append(peer_host)
        d: defer.Deferred[None] = defer.Deferred()
        self.clock.callLater(self.failure_delay, d.callback, None)
        return d

    def succeeded(self, peer_host: str, user: Any) -> defer.Deferred[None]:
        self.successes.append((peer_host, user.name))
        return defer.succeed(None)


class TLSStringTransport(StringTransport):
    """A StringTransport that records STLS and TCP_NODELAY."""

    tls_started: Any = None
    nodelay = False

    def startTLS(self, options: Any) -> None:
        self.tls_started = options

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled


def sync_disk(fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(fn, *args)


class Harness:
    """A factory over a MemoryMailStore; ``connect`` gives a (protocol, transport) pair."""

    def __init__(self, tmp_path: Any) -> None:
        self.clock = Clock()
        self.backend = FakeBackend(self.clock)
        self.store = MemoryMailStore()
        self.lock_dir = str(tmp_path / "locks")
        self.factory = POP3Factory(
            reactor=self.clock,
            backend=self.backend,
            open_maildrop=lambda user: sync_disk(open_maildrop, self.store, user, self.lock_dir),
            run_disk=sync_disk,
            hostname=HOSTNAME,
            tls_options=lambda: "tls-options",
        )

    def inbox(self, name: str = "alice") -> Any:
        return self.store.account(name).folders["INBOX"]

    def connect(self, host: str = "127.0.0.1") -> tuple[POP3Server, TLSStringTransport]:
        proto = self.factory.buildProtocol(None)
        transport = TLSStringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        proto.makeConnection(transport)
        return proto, transport

    def login(self, name: bytes = b"alice", host: str = "127.0.0.1") -> tuple[POP3Server, Any]:
        proto, transport = self.connect(host)
        proto.dataReceived(b"USER " + name + b"\r\nPASS " + self.backend.passwords[name] + b"\r\n")
        assert transport.value().endswith(b"octets).\r\n"), transport.value()
        transport.clear()
        return proto, transport

    @staticmethod
    def send(proto: POP3Server, transport: StringTransport, data: bytes) -> bytes:
        return send(proto, transport, data)

    @staticmethod
    def plain(user: bytes, password: bytes) -> bytes:
        return plain(user, password)


def send(proto: POP3Server, transport: StringTransport, data: bytes) -> bytes:
    """Feed ``data`` and return what the server wrote in response."""
    transport.clear()
    proto.dataReceived(data)
    return transport.value()


def plain(user: bytes, password: bytes) -> bytes:
    return base64.b64encode(b"\0" + user + b"\0" + password)


@pytest.fixture
def harness(tmp_path: Any) -> Harness:
    return Harness(tmp_path)
