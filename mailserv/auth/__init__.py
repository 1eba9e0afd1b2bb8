"""Authentication: one twisted.cred Portal for SMTP submission, IMAP and POP3.

Contract (used by mailserv/service.py and the protocol packages):

``build_portal(service) -> MailPortal``
    ``service`` has ``.config``, ``.reactor``, ``.threads``.  Log in with
    ``portal.login(credentials, None, IMailUser)`` (better: through
    ``AuthThrottle.login``); the avatar provides
    ``mailserv.interfaces.IMailUser`` whose ``.user`` is the canonical
    ``mailserv.directory.User`` (open its store with ``service.store_for(user)``).
    Credentials: twisted ``UsernamePassword`` (USER/PASS, LOGIN command,
    SASL PLAIN/LOGIN), and from mailserv.auth.sasl / credentials the
    CRAM-MD5, SCRAM and APOP ones.  A login fails with
    ``twisted.cred.error.UnauthorizedLogin`` (wrong credentials, invalid
    username, empty password) or ``mailserv.errors.TemporaryFailure``
    (a backend down or too slow).  The portal is IReloadable.

``build_directory(service) -> IUserDirectory``
    ``lookup(address)`` -> Deferred[User | None] over the same backends,
    with +detail and bare local parts handled (mailserv.directory.lookup).

``mailserv.auth.sasl``
    ``mechanisms_for(portal, secure)``, ``new_mechanism(name, hostname, portal)``,
    ``decode_response``/``encode_challenge``, APOP helpers.

``mailserv.auth.ratelimit.AuthThrottle(reactor, delay, max_penalty)``
    ``login(portal, creds, client_ip, IMailUser)``; ``throttle_for(service)``
    gives the service's shared one (so penalties count across protocols).

``build_pop_before_smtp(service) -> IPopBeforeSmtp``
    ``record(ip)`` after POP3/IMAP logins, ``allowed(ip)`` on the MX listener.

``mailserv.auth.schemes``: ``hash_password(password, scheme="ARGON2ID")``,
``verify(stored, password)``.

Modules: portal.py (MailChecker, MailRealm, MailPortal), backend.py (the
backend base class) and one module per backend (passwdfile.py, sql.py,
ldap.py, pam.py), usernames.py (checks before any backend), credentials.py
(CRAM-MD5, APOP, SCRAM credentials), sasl.py, saslprep.py (RFC 4013),
schemes.py with md5state.py (stored CRAM-MD5 contexts) and libcrypt.py
(crypt(3) without the stdlib module), ratelimit.py, popbeforesmtp.py.
Hashing runs in the ``crypto`` pool, lookups in the ``auth`` pool; each
backend call has a timeout (``timeout`` of sql, ldap (per server) and pam;
10 s for passwd-file) after which it is a TemporaryFailure.
"""

from __future__ import annotations

import weakref
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from mailserv.auth.backend import Backend
from mailserv.auth.portal import MailChecker, MailPortal, MailRealm, MailUser
from mailserv.auth.ratelimit import AuthThrottle
from mailserv.directory.lookup import ChainDirectory
from mailserv.interfaces import IReloadable, IUserDirectory

BACKEND_CLASSES = {
    "passwd-file": "mailserv.auth.passwdfile.PasswdFileBackend",
    "sql": "mailserv.auth.sql.SQLBackend",
    "ldap": "mailserv.auth.ldap.LDAPBackend",
    "pam": "mailserv.auth.pam.PAMBackend",
}


def backend_class(type_name: str) -> type[Backend]:
    """The Backend class of a ``type = ...`` (imported lazily: ldap3, PAM, drivers)."""
    import importlib

    module, _, cls = BACKEND_CLASSES[type_name].rpartition(".")
    result: type[Backend] = getattr(importlib.import_module(module), cls)
    return result


def make_backends(config: Any, reactor: Any, threads: Any) -> list[Backend]:
    """The backends of ``auth.backends``, in order."""
    out = []
    for name in config.auth.backends:
        section = config.auth.backend[name]
        out.append(backend_class(section.type)(name, section, config, reactor, threads))
    return out


class AuthBackends:
    """The backends of one service, shared by its portal and its directory; reloadable."""

    def __init__(self, config: Any, reactor: Any, threads: Any) -> None:
        self.reactor = reactor
        self.threads = threads
        self.config = config
        self.backends = make_backends(config, reactor, threads)

    def reload(self, config: Any) -> None:
        if config is self.config:
            return
        old, self.backends, self.config = (
            self.backends,
            make_backends(config, self.reactor, self.threads),
            config,
        )
        for backend in old:
            backend.close()

    def close(self) -> defer.Deferred[Any]:
        return defer.DeferredList([b.close() for b in self.backends])


_shared: weakref.WeakKeyDictionary[Any, AuthBackends] = weakref.WeakKeyDictionary()
_throttles: weakref.WeakKeyDictionary[Any, AuthThrottle] = weakref.WeakKeyDictionary()


def auth_backends(service: Any) -> AuthBackends:
    """The AuthBackends of ``service`` (built once)."""
    if service not in _shared:
        _shared[service] = AuthBackends(service.config, service.reactor, service.threads)
    return _shared[service]


def throttle_for(service: Any) -> AuthThrottle:
    """The AuthThrottle shared by every listener of ``service`` ([auth] delays)."""
    if service not in _throttles:
        auth = service.config.auth
        _throttles[service] = AuthThrottle(service.reactor, auth.failure_delay, auth.max_penalty)
    return _throttles[service]


@implementer(IUserDirectory, IReloadable)
class Directory(ChainDirectory):
    """The service's IUserDirectory; follows configuration reloads."""

    def __init__(self, shared: AuthBackends) -> None:
        self.shared = shared
        super().__init__(shared.backends, shared.config.domains)

    def reload(self, config: Any) -> None:
        self.shared.reload(config)
        self.sources = list(self.shared.backends)
        self.local_domains = [d.lower() for d in config.domains]


@implementer(IReloadable)
class ReloadablePortal(MailPortal):
    """MailPortal that picks up new backends on SIGHUP."""

    def __init__(self, shared: AuthBackends, directory: Directory) -> None:
        checker = MailChecker(lambda: shared.backends, shared.reactor)
        super().__init__(MailRealm(directory, lambda: shared.config), checker)
        self.shared = shared
        self.directory = directory
        self.service: weakref.ref[Any] | None = None  # set by build_portal

    def reload(self, config: Any) -> None:
        self.directory.reload(config)
        service = self.service() if self.service is not None else None
        throttle = _throttles.get(service) if service is not None else None
        if throttle is not None:
            throttle.delay = config.auth.failure_delay
            throttle.max_penalty = config.auth.max_penalty


def build_directory(service: Any) -> Directory:
    """The IUserDirectory of ``service``."""
    return Directory(auth_backends(service))


def build_portal(service: Any) -> ReloadablePortal:
    """The Portal of ``service`` (MailRealm + MailChecker over the configured backends)."""
    portal = ReloadablePortal(auth_backends(service), build_directory(service))
    portal.service = weakref.ref(service)
    return portal


_pop_before_smtp: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def build_pop_before_smtp(service: Any) -> Any:
    """The IPopBeforeSmtp of ``service`` (see popbeforesmtp.py), one per service.

    POP3 and IMAP ``record(ip)`` after a successful login; the MX listener
    asks ``allowed(ip)`` before refusing to relay.
    """
    from mailserv.auth.popbeforesmtp import build_pop_before_smtp as build

    if service not in _pop_before_smtp:
        _pop_before_smtp[service] = build(service.config, service.reactor)
    return _pop_before_smtp[service]


__all__ = [
    "AuthBackends",
    "AuthThrottle",
    "Directory",
    "MailChecker",
    "MailPortal",
    "MailRealm",
    "MailUser",
    "auth_backends",
    "build_directory",
    "build_pop_before_smtp",
    "build_portal",
    "make_backends",
    "throttle_for",
]
