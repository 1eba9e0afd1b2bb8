"""POP3 (RFC 1939) with CAPA, STLS, SASL and APOP; ``build_factory`` builds a listener.

The server is mailserv.pop3.server; mailserv.pop3.mailbox adapts an IMailbox
to a POP3 session (snapshot, marks, UPDATE, the maildrop lock).  This module
joins them to the running service: the portal and the auth throttle of
mailserv.auth, the stores, the disk thread pool and TLS.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mailserv.auth import sasl
from mailserv.interfaces import IMailUser
from mailserv.pop3.mailbox import Maildrop, open_maildrop
from mailserv.pop3.server import IDLE_TIMEOUT, POP3Factory, POP3Server

log = Logger()

__all__ = ["POP3Factory", "POP3Server", "PortalBackend", "build_factory"]


class PortalBackend:
    """The auth layer as POP3 uses it: the portal behind the failure throttle.

    ``throttle`` is a mailserv.auth.ratelimit.AuthThrottle (failure delay and
    per-IP penalty); ``pop_before_smtp`` an optional IPopBeforeSmtp told about
    every successful login.
    """

    def __init__(
        self, portal: Any, throttle: Any, hostname: str, pop_before_smtp: Any = None
    ) -> None:
        self.portal = portal
        self.throttle = throttle
        self.hostname = hostname
        self.pop_before_smtp = pop_before_smtp

    def login(self, credentials: Any, peer_host: str) -> defer.Deferred[Any]:
        d = self.throttle.login(self.portal, credentials, peer_host, IMailUser)

        def logged_in(result: tuple[Any, Any, Any]) -> Any:
            _, avatar, logout = result
            logout()  # the avatar holds nothing; the session keeps the User
            if self.pop_before_smtp is not None:
                recorded = defer.maybeDeferred(self.pop_before_smtp.record, peer_host)
                recorded.addErrback(lambda f: log.failure("POP-before-SMTP record failed", f))
            return avatar.user

        return d.addCallback(logged_in)

    def apop_enabled(self) -> bool:
        return sasl.apop_available(self.portal)

    def apop_credentials(self, username: bytes, timestamp: bytes, digest: bytes) -> Any:
        return sasl.apop_credentials(username.decode("utf-8", "replace"), timestamp, digest)

    def mechanisms(self, secure: bool) -> list[str]:
        return sasl.mechanisms_for(self.portal, secure)

    def start_sasl(self, name: str) -> Any:
        return sasl.new_mechanism(name, self.hostname, self.portal)


def lock_directory(state_dir: str) -> str:
    """Where the maildrop locks live (one file per user, named by a hash)."""
    return os.path.join(state_dir, "pop3", "locks")


def build_factory(service: Any, name: str, listener: Any) -> POP3Factory:
    """The POP3 factory of listener ``name`` (RFC 1939; STLS when ``tls = "starttls"``)."""
    from mailserv.auth import build_pop_before_smtp, throttle_for

    config = service.config
    recorder = getattr(service, "pop_before_smtp", None)
    if recorder is None and config.auth.pop_before_smtp > 0:
        recorder = build_pop_before_smtp(service)
    backend = PortalBackend(service.portal, throttle_for(service), config.hostname, recorder)
    locks = lock_directory(config.state_dir)

    def open_for(user: Any) -> defer.Deferred[Maildrop]:
        return service.threads.run(
            "disk", lambda: open_maildrop(service.store_for(user), user, locks)
        )

    return POP3Factory(
        reactor=service.reactor,
        backend=backend,
        open_maildrop=open_for,
        run_disk=lambda fn, *args: service.threads.run("disk", fn, *args),
        hostname=config.hostname,
        tls_options=service.tls_options if listener.tls == "starttls" else None,
        allow_plaintext_auth=listener.allow_plaintext_auth,
        idle_timeout=listener.idle_timeout or IDLE_TIMEOUT,
    )
