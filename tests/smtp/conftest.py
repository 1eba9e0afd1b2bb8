"""Fixtures of the SMTP protocol tests: a server on a StringTransport with a Clock."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.task import Clock
from zope.interface import implementer

from mailserv.config import parse_config
from mailserv.interfaces import IMailUser
from mailserv.smtp import build_context
from mailserv.smtp.server import SMTPServer
from mailserv.testing import FakeSMTPService, tls_string_transport

BASE_CONFIG = """
config_version = 1
hostname = "mx.example.org"
domains = ["example.org", "bücher.example"]
state_dir = "{state}"
[store]
path = "{state}/mail/{{localpart}}"
[listeners.mx]
protocol = "smtp"
endpoints = ["tcp:2525"]
max_message_size = {max_size}
max_recipients = 5
[listeners.submission]
protocol = "submission"
endpoints = ["tcp:2587"]
[aliases]
"info@example.org" = ["alice@example.org", "bob@example.org"]
"@bücher.example" = "alice@example.org"
"ext@example.org" = "someone@remote.test"
"""


@implementer(IMailUser)
class _Avatar:
    def __init__(self, user: Any) -> None:
        self.user = user


class _Realm:
    def __init__(self, directory: Any) -> None:
        self.directory = directory

    def requestAvatar(self, avatar_id: Any, mind: Any, *ifaces: Any) -> Any:
        name = avatar_id.decode() if isinstance(avatar_id, bytes) else avatar_id
        return IMailUser, _Avatar(self.directory.users[name]), lambda: None


class Client:
    """Drives one SMTPServer: ``send`` raw bytes, ``read`` what it wrote."""

    def __init__(self, proto: SMTPServer, transport: Any, clock: Clock) -> None:
        self.proto = proto
        self.transport = transport
        self.clock = clock

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def read(self) -> bytes:
        value: bytes = self.transport.value()
        self.transport.clear()
        return value

    def cmd(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.read()

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def transaction(
        self, body: bytes = b"Subject: hi\r\n\r\nhello\r\n", rcpt: bytes = b"alice@example.org"
    ) -> bytes:
        assert self.cmd(b"MAIL FROM:<sender@remote.test>").startswith(b"250")
        assert self.cmd(b"RCPT TO:<" + rcpt + b">").startswith(b"250")
        assert self.cmd(b"DATA").startswith(b"354")
        self.send(body + b".\r\n")
        return self.read()


class SMTPEnv:
    def __init__(self, tmp_path: Path, max_size: int = 100_000) -> None:
        state = tmp_path / "state"
        state.mkdir(exist_ok=True)
        text = BASE_CONFIG.format(state=state, max_size=max_size)
        self.config = parse_config(text)
        self.clock = Clock()
        self.service = FakeSMTPService(self.config, self.clock)
        d = self.service.directory
        d.add("alice@example.org", "alice@example.org")
        d.add("bob@example.org", "bob@example.org")
        checker = InMemoryUsernamePasswordDatabaseDontUse()
        checker.addUser(b"alice@example.org", b"secret")
        checker.addUser(b"bob@example.org", b"hunter2")
        self.service.portal = Portal(_Realm(d), [checker])
        self.state = state

    @property
    def store(self) -> Any:
        return self.service.store

    def context(self, listener: str = "mx", **settings: Any) -> Any:
        ctx = build_context(self.service, listener, self.config.listeners[listener])
        for key, value in settings.items():
            setattr(ctx.settings, key, value)
        return ctx

    def connect(
        self,
        listener: str = "mx",
        peer: str = "192.0.2.1",
        ehlo: bool = True,
        context: Any = None,
        **settings: Any,
    ) -> Client:
        ctx = context or self.context(listener, **settings)
        proto = SMTPServer(ctx)
        transport = tls_string_transport(peer)
        proto.makeConnection(transport)
        client = Client(proto, transport, self.clock)
        greeting = client.read()
        assert greeting == b"220 mx.example.org ESMTP mailserv\r\n", greeting
        if ehlo:
            assert client.cmd(b"EHLO client.example").startswith(b"250-mx.example.org")
        return client


@pytest.fixture
def env(tmp_path: Path) -> SMTPEnv:
    return SMTPEnv(tmp_path)


@pytest.fixture
def make_env(tmp_path: Path) -> Callable[..., SMTPEnv]:
    return lambda **kw: SMTPEnv(tmp_path, **kw)
