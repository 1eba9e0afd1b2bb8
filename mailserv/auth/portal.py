"""The one Portal of every protocol: MailChecker (all backends) + MailRealm (IMailUser).

``MailChecker`` is a twisted.cred ICredentialsChecker over the backends of
``auth.backends``, tried in order.  Before any backend is asked, the
username is validated and folded (usernames.py) and empty or oversized
passwords are refused.  A backend that is down or too slow
(``backend.timeout``) does not make a login fail as "wrong password": when
no backend accepted and one could not answer, the result is
mailserv.errors.TemporaryFailure.

``MailPortal.listCredentialsInterfaces()`` lists only what the backends can
verify *now*: IUsernamePassword always, ICramMD5Credentials /
IAPOPCredentials / IScramCredentials only when some backend holds a
plaintext-equivalent secret for them (sasl.mechanisms_for reads this).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from zope.interface import implementer

from mailserv.auth.backend import Backend
from mailserv.auth.usernames import InvalidUsername, acceptable_password, normalize_username
from mailserv.directory import User
from mailserv.directory.lookup import make_user
from mailserv.errors import TemporaryFailure
from mailserv.interfaces import (
    IAPOPCredentials,
    ICramMD5Credentials,
    IMailUser,
    IScramCredentials,
    IUserDirectory,
)

# Which secret kinds (schemes.secret_kinds) each challenge credential needs.
CHALLENGE_INTERFACES: dict[Any, Callable[[Any], str]] = {
    ICramMD5Credentials: lambda c: "CRAM-MD5",
    IAPOPCredentials: lambda c: "APOP",
    IScramCredentials: lambda c: c.mechanism,
}


def _with_timeout(d: defer.Deferred[Any], timeout: float, reactor: Any) -> defer.Deferred[Any]:
    def timed_out(failure: Any) -> None:
        failure.trap(defer.TimeoutError, defer.CancelledError)
        raise TemporaryFailure("authentication backend timed out")

    d.addTimeout(timeout, reactor)
    return d.addErrback(timed_out)


@implementer(ICredentialsChecker)
class MailChecker:
    """Checks every kind of credentials against the configured backends, in order."""

    credentialInterfaces = (IUsernamePassword, *CHALLENGE_INTERFACES)

    def __init__(self, backends: Callable[[], Sequence[Backend]], reactor: Any) -> None:
        self._backends = backends
        self.reactor = reactor

    @property
    def backends(self) -> Sequence[Backend]:
        return self._backends()

    def secret_kinds(self) -> frozenset[str]:
        kinds: frozenset[str] = frozenset()
        for backend in self.backends:
            kinds |= backend.secret_kinds()
        return kinds

    def requestAvatarId(self, credentials: Any) -> Any:
        """Deferred[str]: the canonical user name (UnauthorizedLogin / TemporaryFailure)."""
        try:
            username = normalize_username(credentials.username)
        except (InvalidUsername, AttributeError, TypeError):
            return defer.fail(error.UnauthorizedLogin("invalid username"))
        authzid = getattr(credentials, "authzid", b"")
        if authzid:
            # RFC 4616 §2: nobody may act as another user here.
            try:
                if normalize_username(authzid) != username:
                    raise InvalidUsername("authzid")
            except InvalidUsername:
                return defer.fail(error.UnauthorizedLogin("authorization identity refused"))
        if IUsernamePassword.providedBy(credentials):
            password = acceptable_password(credentials.password)
            if password is None:
                return defer.fail(error.UnauthorizedLogin("empty or oversized password"))
            return self._first(lambda b: b.verify_password(username, password))
        for iface, kind_of in CHALLENGE_INTERFACES.items():
            if iface.providedBy(credentials):
                return self._challenge(username, kind_of(credentials), credentials)
        return defer.fail(error.UnhandledCredentials("unsupported credentials"))

    def _challenge(self, username: str, kind: str, credentials: Any) -> defer.Deferred[str]:
        def ask(backend: Backend) -> defer.Deferred[str | None]:
            if kind not in backend.secret_kinds():
                return defer.succeed(None)

            def check(found: tuple[str, str] | None) -> str | None:
                if found is None or not credentials.check_secret(found[1]):
                    return None
                return found[0]

            return backend.secret(username).addCallback(check)

        return self._first(ask)

    @defer.inlineCallbacks
    def _first(self, ask: Callable[[Backend], defer.Deferred[str | None]]) -> Any:
        """The first backend's positive answer; TemporaryFailure if none and one was down."""
        unavailable = False
        for backend in self.backends:
            try:
                name = yield _with_timeout(ask(backend), backend.timeout, self.reactor)
            except TemporaryFailure:
                unavailable = True
                continue
            if name:
                return name
        if unavailable:
            raise TemporaryFailure("an authentication backend is unavailable")
        raise error.UnauthorizedLogin("wrong username or password")


@implementer(IMailUser)
class MailUser:
    """The IMailUser avatar: the canonical User of the account."""

    def __init__(self, user: User) -> None:
        self.user = user

    def __repr__(self) -> str:
        return f"MailUser({self.user.name!r})"


@implementer(IRealm)
class MailRealm:
    """Hands out IMailUser avatars, with the User found in the directory."""

    def __init__(self, directory: Any, config: Callable[[], Any]) -> None:
        self.directory = directory
        self._config = config

    @defer.inlineCallbacks
    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        if IMailUser not in interfaces:
            raise NotImplementedError("mailserv avatars provide IMailUser only")
        name = avatarId.decode() if isinstance(avatarId, bytes) else str(avatarId)
        user = yield IUserDirectory(self.directory).lookup(name)
        if user is None or user.name != name:
            # Authenticated but unknown to the directory (a PAM user without a
            # passwd entry): the mailbox follows the [store] template.
            config = self._config()
            section = None
            user = make_user(config, section, name)
        return IMailUser, MailUser(user), lambda: None


class MailPortal(Portal):
    """The Portal whose advertised credential interfaces follow the backends' secrets."""

    def __init__(self, realm: MailRealm, checker: MailChecker) -> None:
        super().__init__(realm, [checker])
        self.checker = checker

    def listCredentialsInterfaces(self) -> list[Any]:
        kinds = self.checker.secret_kinds()
        out: list[Any] = [IUsernamePassword]
        if "CRAM-MD5" in kinds:
            out.append(ICramMD5Credentials)
        if "APOP" in kinds:
            out.append(IAPOPCredentials)
        if any(k.startswith("SCRAM-") for k in kinds):
            out.append(IScramCredentials)
        return out
