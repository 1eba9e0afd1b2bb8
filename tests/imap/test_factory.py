"""build_factory against a plain service object (the contract with mailserv.service)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from mailserv.config import from_dict
from mailserv.imap import IMAPFactory, build_factory, hub_for
from mailserv.testing import SharedMemoryStore
from tests.imap.harness import make_portal


class Threads:
    def __init__(self) -> None:
        self.pools: list[str] = []

    def run(self, name: str, fn: Any, *args: Any) -> defer.Deferred[Any]:
        self.pools.append(name)
        return defer.maybeDeferred(fn, *args)


class Service:
    def __init__(self, listeners: dict[str, Any]) -> None:
        self.config = from_dict(
            {
                "config_version": 1,
                "hostname": "mail.example.test",
                "domains": ["example.test"],
                "state_dir": "/nonexistent",
                "listeners": listeners,
                "store": {"format": "maildir", "path": "/nonexistent/{user}"},
            }
        )
        self.reactor = Clock()
        self.threads = Threads()
        self.portal = make_portal()
        self.store = SharedMemoryStore()

    def store_for(self, user: Any) -> SharedMemoryStore:
        return self.store

    def tls_options(self) -> object:
        return object()


def listener(**kw: Any) -> dict[str, Any]:
    return {"protocol": "imap", "endpoints": ["tcp:143"], **kw}


def test_build_factory_from_listener_settings() -> None:
    service = Service(
        {
            "imap": listener(max_message_size="1M", idle_timeout="10m", max_connections_per_ip=2),
            "imaps": listener(tls="implicit", allow_plaintext_auth="never"),
        }
    )
    plain = build_factory(service, "imap", service.config.listeners["imap"])
    implicit = build_factory(service, "imaps", service.config.listeners["imaps"])
    assert isinstance(plain, IMAPFactory)
    assert plain.ctx.settings.max_append == 1024 * 1024
    assert plain.ctx.settings.idle_timeout == 600
    assert plain.ctx.tls_options is not None and implicit.ctx.tls_options is None
    assert implicit.ctx.settings.allow_plaintext_auth == "never"
    assert plain.ctx.hub is implicit.ctx.hub is hub_for(service)
    # store calls go to the disk pool
    plain.ctx.run(lambda: None)
    assert service.threads.pools == ["disk"]


def test_connections_per_ip_refused_beyond_the_limit() -> None:
    service = Service({"imap": listener(max_connections_per_ip=2)})
    factory = build_factory(service, "imap", service.config.listeners["imap"])
    addr = IPv4Address("TCP", "192.0.2.9", 1000)
    first, second = factory.buildProtocol(addr), factory.buildProtocol(addr)
    assert first is not None and second is not None
    assert factory.buildProtocol(addr) is None
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.10", 1000)) is not None
    first.connectionLost()
    assert factory.buildProtocol(addr) is not None
