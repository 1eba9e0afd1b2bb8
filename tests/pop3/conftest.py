"""Fixtures of the POP3 protocol tests: a server on a StringTransport driven by a Clock."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailserv.auth import sasl
from mailserv.directory import User
from mailserv.errors import TemporaryFailure
from mailserv.interfaces import IAPOPCredentials
from mailserv.pop3.mailbox import MailboxCache, open_maildrop
from mailserv.pop3.server import POP3Factory, POP3Server
from mailserv.testing import MemoryMailStore

HOSTNAME = "mail.example.org"


class FakeBackend:
    """The auth layer over two users, with the real SASL mechanisms and APOP credentials.

    PLAIN and LOGIN are offered when cleartext is allowed, APOP when enabled; a
    failure is answered after ``failure_delay`` (the throttle's job).
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.passwords = {"alice": b"wonder land", "bob": b"builder"}
        self.apop = False
        self.down = False
        self.failure_delay = 2.0
        self.logins: list[Any] = []
        self.successes: list[tuple[str, str]] = []

    def _check(self, creds: Any) -> str | None:
        name = creds.username.decode() if isinstance(creds.username, bytes) else creds.username
        password = self.passwords.get(name)
        if password is None:
            return None
        if IUsernamePassword.providedBy(creds):
            return name if creds.password and creds.password == password else None
        if IAPOPCredentials.providedBy(creds):
            return name if creds.check_secret("{PLAIN}" + password.decode()) else None
        return None

    def login(self, creds: Any, peer_host: str) -> defer.Deferred[Any]:
        self.logins.append(creds)
        if self.down:
            return defer.fail(TemporaryFailure("backend down"))
        name = self._check(creds)
        if name is None:
            return task.deferLater(self.clock, self.failure_delay, self._refuse)
        self.successes.append((peer_host, name))
        return defer.succeed(User(name=name, mailbox=f"/nonexistent/{name}"))

    @staticmethod
    def _refuse() -> None:
        raise UnauthorizedLogin()

    def apop_enabled(self) -> bool:
        return self.apop

    def apop_credentials(self, username: bytes, timestamp: bytes, digest: bytes) -> Any:
        return sasl.apop_credentials(username.decode("utf-8", "replace"), timestamp, digest)

    def mechanisms(self, secure: bool) -> list[str]:
        return ["PLAIN", "LOGIN"] if secure else []

    def start_sasl(self, name: str) -> Any:
        return sasl.new_mechanism(name, HOSTNAME)


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
        self.cache = MailboxCache(size=2)
        self.factory = POP3Factory(
            reactor=self.clock,
            backend=self.backend,
            open_maildrop=lambda user: sync_disk(
                open_maildrop, self.store, user, self.lock_dir, self.cache
            ),
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

    def login(self, name: str = "alice", host: str = "127.0.0.1") -> tuple[POP3Server, Any]:
        proto, transport = self.connect(host)
        password = self.backend.passwords[name]
        proto.dataReceived(b"USER " + name.encode() + b"\r\nPASS " + password + b"\r\n")
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
