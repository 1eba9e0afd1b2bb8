"""IMAP4rev1 (RFC 3501) and its extensions: the listener factory.

``build_factory(service, name, listener)`` is what mailserv.service calls for
``protocol = "imap"`` listeners.  Sessions of every IMAP listener of one
service share a ChangeHub, so a change in one session reaches the others
(IDLE push) at once; deliveries from other processes are seen by polling.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory

from mailserv.auth import throttle_for
from mailserv.imap.mailbox import ChangeHub
from mailserv.imap.server import Context, IMAPServer, Settings

# The auth layer as a mail-reading protocol uses it (throttled portal login, SASL):
# shared with POP3 rather than duplicated.
from mailserv.pop3 import PortalBackend

__all__ = [
    "ChangeHub",
    "Context",
    "IMAPFactory",
    "IMAPServer",
    "Settings",
    "build_factory",
    "hub_for",
]


class IMAPFactory(Factory):
    """Builds IMAPServer sessions; refuses an IP's connections beyond ``max_per_ip``."""

    protocol = IMAPServer

    def __init__(self, ctx: Context, max_per_ip: int | None = None) -> None:
        self.ctx = ctx
        self.max_per_ip = max_per_ip
        self.per_ip: dict[str, int] = {}

    def buildProtocol(self, addr: Any) -> IMAPServer | None:
        host = getattr(addr, "host", "")
        if self.max_per_ip is not None and self.per_ip.get(host, 0) >= self.max_per_ip:
            return None
        self.per_ip[host] = self.per_ip.get(host, 0) + 1
        proto = IMAPServer(self.ctx)
        proto.factory = self
        lost = proto.connectionLost

        def connection_lost(reason: Any = None) -> None:
            count = self.per_ip.get(host, 1) - 1
            if count <= 0:
                self.per_ip.pop(host, None)
            else:
                self.per_ip[host] = count
            if reason is None:
                lost()
            else:
                lost(reason)

        proto.connectionLost = connection_lost  # type: ignore[method-assign]
        return proto


def hub_for(service: Any) -> ChangeHub:
    """The ChangeHub shared by the IMAP listeners of ``service`` (created on first use).

    Delivery code may call ``hub_for(service).changed((user_name, folder))`` to
    wake idling sessions at once instead of at their next poll.
    """
    hub = getattr(service, "imap_hub", None)
    if hub is None:
        hub = ChangeHub()
        service.imap_hub = hub
    return hub


def notify_delivery(service: Any, user_name: str, folder: str = "INBOX") -> None:
    """Tell the IMAP sessions of ``service`` that mail was delivered to ``user_name``'s
    ``folder`` (reactor thread): idling sessions report it at once instead of at their
    next poll (RFC 2177)."""
    hub = getattr(service, "imap_hub", None)
    if hub is not None:
        hub.changed((user_name, folder))


def build_factory(service: Any, name: str, listener: Any) -> IMAPFactory:
    """The IProtocolFactory of one ``protocol = "imap"`` listener."""
    settings = Settings(
        allow_plaintext_auth=listener.allow_plaintext_auth,
        max_append=listener.max_message_size,
        server_name=f"{service.config.hostname} mailserv IMAP4rev1",
    )
    if listener.idle_timeout:
        settings.idle_timeout = float(listener.idle_timeout)
    settings.auth_failure_delay = float(service.config.auth.failure_delay)
    threads = service.threads

    def run(fn: Any, *args: Any) -> Any:
        return threads.run("disk", fn, *args)

    ctx = Context(
        reactor=service.reactor,
        auth=PortalBackend(
            service.portal,
            throttle_for(service),
            service.config.hostname,
            getattr(service, "pop_before_smtp", None),  # an IMAP login counts too
        ),
        store_for=service.store_for,
        run=run,
        hub=hub_for(service),
        settings=settings,
        tls_options=service.tls_options if listener.tls == "starttls" else None,
    )
    return IMAPFactory(ctx, listener.max_connections_per_ip)
