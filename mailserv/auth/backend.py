"""The common shape of the auth backends (passwd-file, sql, ldap, pam).

A backend is both sides of an account source: the checker side
(``verify_password``, ``secret``) and the directory side (``find``).  Every
method takes an already validated, lower-cased login name (usernames.py)
and returns a Deferred; blocking work runs in the ``auth`` pool.  A backend
that cannot answer fails with mailserv.errors.TemporaryFailure, never with
"no such user" or "wrong password".
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from mailserv.auth import schemes
from mailserv.directory import User
from mailserv.interfaces import IPasswordVerifier, IPlaintextSecrets, IUserDirectory


@implementer(IPasswordVerifier, IPlaintextSecrets, IUserDirectory)
class Backend:
    """Base class: subclasses implement ``verify_password`` and ``find``, maybe ``secret``."""

    type_name = ""
    # Seconds after which a call that has not answered is a TemporaryFailure.
    timeout: float = 10.0

    def __init__(self, name: str, section: Any, config: Any, reactor: Any, threads: Any) -> None:
        self.name = name
        self.section = section
        self.config = config
        self.reactor = reactor
        self.threads = threads

    def verify_password(self, username: str, password: bytes) -> defer.Deferred[str | None]:
        """Deferred[canonical name | None]; None for an unknown user or a wrong password."""
        raise NotImplementedError

    def secret(self, username: str) -> defer.Deferred[tuple[str, str] | None]:
        """Deferred[(canonical name, stored ``{SCHEME}data``) | None] for challenge mechanisms."""
        return defer.succeed(None)

    def secret_kinds(self) -> frozenset[str]:
        """The challenge mechanisms (CRAM-MD5, APOP, SCRAM-SHA-*) this backend can serve now."""
        return frozenset()

    def find(self, key: str) -> defer.Deferred[User | None]:
        """Deferred[User | None] for an address or login name (directory side)."""
        raise NotImplementedError

    def lookup(self, address: str) -> defer.Deferred[User | None]:
        """IUserDirectory on this backend alone (exact key, no +detail handling)."""
        return self.find(address)

    def get_secret(self, username: str, scheme: str) -> defer.Deferred[bytes | None]:
        """IPlaintextSecrets: the plaintext password, when the backend stores it as such."""

        def plain(found: tuple[str, str] | None) -> bytes | None:
            return None if found is None else schemes.plaintext_of(found[1])

        return self.secret(username).addCallback(plain)

    def close(self) -> defer.Deferred[None]:
        """Release connections and pools."""
        return defer.succeed(None)
