"""POP3 (RFC 1939) with CAPA (RFC 2449), STLS (RFC 2595), AUTH (RFC 5034) and APOP.

Modules: ``server`` (POP3Server, a twisted.mail.pop3.POP3 whose line handling,
dispatch and commands are replaced, and POP3Factory), ``mailbox`` (the session's
snapshot of an IMailbox: numbering, DELE marks, UIDL, the UPDATE state, read-ahead,
the maildrop lock) and ``content`` (byte-stuffing that survives any chunking).

Behaviour, with the Twisted defects fixed (ARCHITECTURE.md items 1 and 8):

* CAPA: TOP, USER (only where cleartext is allowed), UIDL, SASL <the auth layer's
  mechanisms>, RESP-CODES, AUTH-RESP-CODE, PIPELINING, STLS (before TLS, when the
  listener has ``tls = "starttls"``), EXPIRE NEVER, LOGIN-DELAY <the listener's
  ``login_delay``, 0 by default>, IMPLEMENTATION.
* USER/PASS and cleartext SASL refused before TLS unless ``allow_plaintext_auth``
  permits the peer (default: loopback only); the greeting carries an APOP timestamp
  only when a backend holds secrets that can verify APOP.
* Logins go through the shared AuthThrottle (failure delay, per-IP penalty); a
  success records the client in POP-before-SMTP when ``[auth] pop_before_smtp`` > 0.
* The maildrop is locked for the session with flock on
  ``<state_dir>/pop3/locks/<sha256(user)>.lock``: another session, in this process
  or another, gets ``-ERR [IN-USE]``.  Also ``[AUTH]``, ``[SYS/TEMP]``,
  ``[SYS/PERM]``, ``[LOGIN-DELAY]``.
* DELE only marks; QUIT removes the marked messages with one ``IMailbox.expunge``;
  a dropped connection, a timeout or a shutdown (``drain``) removes nothing.
* The INBOX object of a session is kept for the next login of the same user
  (MailboxCache, 128 users): a poll that finds nothing new costs a ``refresh()``.
* Download path (bench/pop3.py): the replies to the commands of one read are
  written together (at most 64 KiB held), so a pipelining client gets few large
  sends; small messages are read ahead in ``disk`` jobs of up to 64 messages or
  1 MiB, byte-stuffed in that job; once fewer than 48 are cached, jobs of 32 follow
  each other until 96 are cached, so reading runs beside the client and RETR is
  answered from memory without a thread round trip or a Deferred.  A RETR of a
  message that a read in flight will bring waits for it; any other miss is read
  at once.
  QUIT waits for any read in flight, then commits (one ``IMailbox.expunge`` of
  all marked messages) and releases the maildrop in one disk job.
* Message numbers must be 1..N of live messages; UIDL is ``%08X%08X`` of (UID,
  UIDVALIDITY), stable across sessions; lines are limited to 512 octets; idle
  timeout 10 minutes (``idle_timeout`` of the listener); TCP_NODELAY is set; at most
  ``max_connections_per_ip`` (default 50) connections from one address.

Contract with the service: ``build_factory(service, name, listener)`` uses
``service.reactor``, ``.config``, ``.threads`` (``disk`` pool), ``.portal``,
``.store_for(user)``, ``.tls_options`` and, when present, ``.pop_before_smtp``
(an IPopBeforeSmtp shared with the MX listener; else one is built from the config).
"""

from __future__ import annotations

import os
import weakref
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mailserv.auth import sasl
from mailserv.interfaces import IMailUser
from mailserv.pop3.mailbox import MailboxCache, Maildrop, open_maildrop
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


# Per service: the last login time of each user (LOGIN-DELAY holds across the POP3 listeners).
_last_logins: weakref.WeakKeyDictionary[Any, dict[str, float]] = weakref.WeakKeyDictionary()


def build_factory(service: Any, name: str, listener: Any) -> POP3Factory:
    """The POP3 factory of listener ``name`` (RFC 1939; STLS when ``tls = "starttls"``)."""
    from mailserv.auth import build_pop_before_smtp, throttle_for

    config = service.config
    recorder = getattr(service, "pop_before_smtp", None)
    if recorder is None and config.auth.pop_before_smtp > 0:
        recorder = build_pop_before_smtp(service)
    backend = PortalBackend(service.portal, throttle_for(service), config.hostname, recorder)
    locks = lock_directory(config.state_dir)
    cache = MailboxCache()

    def open_for(user: Any) -> defer.Deferred[Maildrop]:
        return service.threads.run(
            "disk", lambda: open_maildrop(service.store_for(user), user, locks, cache)
        )

    factory = POP3Factory(
        reactor=service.reactor,
        backend=backend,
        open_maildrop=open_for,
        run_disk=lambda fn, *args: service.threads.run("disk", fn, *args),
        hostname=config.hostname,
        tls_options=service.tls_options if listener.tls == "starttls" else None,
        allow_plaintext_auth=listener.allow_plaintext_auth,
        idle_timeout=listener.idle_timeout or IDLE_TIMEOUT,
        max_connections_per_ip=listener.max_connections_per_ip or 50,
        login_delay=int(listener.login_delay),
    )
    try:
        factory.last_login = _last_logins.setdefault(service, {})
    except TypeError:  # a service object without weak references (a test double)
        pass
    return factory
