"""Drive IMAPServer over a StringTransport with a Clock and synchronous store calls."""

from __future__ import annotations

from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import alsoProvides, implementer

from mailserv.auth.ratelimit import AuthThrottle
from mailserv.directory import User
from mailserv.imap.mailbox import ChangeHub
from mailserv.imap.server import Context, IMAPServer, Settings
from mailserv.pop3 import PortalBackend
from mailserv.testing import SharedMemoryStore

PASSWORDS = {"alice": b"secret", "bob": b"hunter2"}


class Avatar:
    def __init__(self, user: User) -> None:
        self.user = user


@implementer(IRealm)
class Realm:
    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        name = avatar_id.decode() if isinstance(avatar_id, bytes) else avatar_id
        return interfaces[0], Avatar(User(name=name, mailbox=f"/nonexistent/{name}")), lambda: None


def make_portal() -> Portal:
    checker = InMemoryUsernamePasswordDatabaseDontUse(**PASSWORDS)
    return Portal(Realm(), [checker])


class TLSStringTransport(StringTransport):
    """A StringTransport whose startTLS makes it provide ISSLTransport."""

    tls_started = False

    def startTLS(self, options: Any) -> None:
        self.tls_started = True
        self.tls_buffer_at_start = self.value()
        alsoProvides(self, ISSLTransport)


def sync_run(fn: Any, *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(fn, *args)


class Session:
    """One client session against an IMAPServer."""

    def __init__(self, env: Env, host: str = "127.0.0.1", secure: bool = False) -> None:
        self.env = env
        self.transport = TLSStringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        if secure:
            alsoProvides(self.transport, ISSLTransport)
        self.server = IMAPServer(env.ctx)
        self.server.makeConnection(self.transport)

    def greeting(self) -> bytes:
        return self.take()

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def send(self, data: bytes | str) -> bytes:
        if isinstance(data, str):
            data = data.encode()
        self.transport.clear()
        self.server.dataReceived(data)
        self.env.clock.advance(0)
        self.env.clock.advance(0)
        return self.take()

    def cmd(self, line: str) -> bytes:
        return self.send(line + "\r\n")

    def login(self, user: str = "alice", password: str = "secret") -> bytes:
        self.take()
        out = self.cmd(f"a0 LOGIN {user} {password}")
        assert b"a0 OK" in out, out
        return out

    def select(self, name: str = "INBOX") -> bytes:
        out = self.cmd(f"s0 SELECT {name}")
        assert b"s0 OK" in out, out
        return out


class Env:
    """A store, a hub, a clock and a context shared by several sessions."""

    def __init__(self, settings: Settings | None = None, tls: bool = True) -> None:
        self.clock = Clock()
        self.store = SharedMemoryStore()
        self.hub = ChangeHub()
        self.ctx = Context(
            reactor=self.clock,
            auth=PortalBackend(make_portal(), AuthThrottle(self.clock, 2.0, 15.0), "mail.test"),
            store_for=lambda user: self.store,
            run=sync_run,
            hub=self.hub,
            settings=settings or Settings(),
            tls_options=(lambda: object()) if tls else None,
        )

    def session(self, **kw: Any) -> Session:
        return Session(self, **kw)

    def selected_session(self, user: str = "alice", password: str = "secret") -> Session:
        """A session logged in as ``user`` with its INBOX selected."""
        session = Session(self)
        session.login(user, password)
        session.select()
        return session

    def deliver(
        self, data: bytes, user: str = "alice", folder: str = "INBOX", flags: Any = ()
    ) -> int:
        return self.store.account(user).folders[folder].add(data, flags)


def message(n: int = 1, subject: str = "hello", body: str = "body text\r\n") -> bytes:
    return (
        f"From: Sender {n} <sender{n}@example.org>\r\nTo: alice@example.test\r\n"
        f"Subject: {subject}\r\nMessage-ID: <m{n}@example.org>\r\n"
        f"Date: Mon, 7 Feb 1994 21:52:25 -0800\r\n\r\n{body}"
    ).encode()


def selected(count: int = 1, env: Env | None = None, **deliver: Any) -> tuple[Env, Session]:
    """An Env with ``count`` messages in alice's INBOX and a session that has SELECTed it."""
    env = env or Env()
    for n in range(1, count + 1):
        env.deliver(message(n), **deliver)
    return env, env.selected_session()
