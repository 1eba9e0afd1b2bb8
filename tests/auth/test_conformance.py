"""One conformance suite for every checker: passwd-file, SQLite, PostgreSQL, MariaDB, LDAP, PAM.

Each case logs in through the real portal (build_portal) against a real
backend.  "Refused before any backend sees it" is checked by counting the
calls that reach the backend objects.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_twisted
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer

from mailserv.auth import auth_backends, build_directory, build_portal
from mailserv.errors import TemporaryFailure
from mailserv.interfaces import IMailUser
from tests.auth.conftest import ALICE_PASSWORD, DOMAIN, BackendCase, locked_sqlite

pytestmark = pytest.mark.integration

INJECTIONS = ["*)(uid=*", "admin)(|(a=*", "' OR '1'='1", "x'; DROP TABLE users; --"]


class Spy:
    """Counts the calls that reach a backend."""

    def __init__(self, backend: Any) -> None:
        self.calls = 0
        for name in ("verify_password", "secret", "find"):
            original = getattr(backend, name)

            def counting(*args: Any, _original: Any = original) -> Any:
                self.calls += 1
                return _original(*args)

            setattr(backend, name, counting)


def portal_for(make_service: Any, section: dict[str, Any]) -> tuple[Any, Spy, Any]:
    service = make_service({"main": section})
    portal = build_portal(service)
    spy = Spy(auth_backends(service).backends[0])
    return portal, spy, service


def login(portal: Any, username: Any, password: Any) -> defer.Deferred[Any]:
    if isinstance(username, str):
        username = username.encode("utf-8")
    if isinstance(password, str):
        password = password.encode("utf-8")
    return portal.login(UsernamePassword(username, password), None, IMailUser)


@pytest_twisted.inlineCallbacks
def test_right_password(backend_case: BackendCase, make_service: Any) -> Any:
    portal, spy, _ = portal_for(make_service, backend_case.section)
    iface, avatar, _logout = yield login(portal, backend_case.login, ALICE_PASSWORD)
    assert iface is IMailUser
    assert IMailUser.providedBy(avatar)
    assert avatar.user.name == backend_case.canonical
    assert avatar.user.mailbox.endswith("/Maildir")
    assert spy.calls >= 1


@pytest_twisted.inlineCallbacks
def test_wrong_password(backend_case: BackendCase, make_service: Any) -> Any:
    portal, _, _ = portal_for(make_service, backend_case.section)
    with pytest.raises(UnauthorizedLogin):
        yield login(portal, backend_case.login, ALICE_PASSWORD + "x")
    with pytest.raises(UnauthorizedLogin):
        yield login(portal, backend_case.login, ALICE_PASSWORD.lower())


@pytest_twisted.inlineCallbacks
def test_unknown_user(backend_case: BackendCase, make_service: Any) -> Any:
    portal, _, _ = portal_for(make_service, backend_case.section)
    with pytest.raises(UnauthorizedLogin):
        yield login(portal, f"nobody@{DOMAIN}", ALICE_PASSWORD)
    with pytest.raises(UnauthorizedLogin):
        yield login(portal, "nobody", ALICE_PASSWORD)


@pytest_twisted.inlineCallbacks
def test_upper_case_username(backend_case: BackendCase, make_service: Any) -> Any:
    portal, _, _ = portal_for(make_service, backend_case.section)
    _, avatar, _ = yield login(portal, backend_case.login.upper(), ALICE_PASSWORD)
    assert avatar.user.name == backend_case.canonical


REFUSED = [
    ("alice@example.org", ""),  # empty password: an anonymous LDAP bind (RFC 4513 §5.1.2)
    ("alice", ""),
    ("ålice@example.org", ALICE_PASSWORD),  # Unicode username
    ("alice\u0301", ALICE_PASSWORD),
    ("", ALICE_PASSWORD),
    ("a" * 256, ALICE_PASSWORD),
    ("alice@example.org", "x" * 10_000),  # 10 000-byte password
    ("alice\x00admin", ALICE_PASSWORD),
    ("alice@example.org", "Secret\x00p4ss"),
    *((injection, ALICE_PASSWORD) for injection in INJECTIONS),
]


@pytest_twisted.inlineCallbacks
def test_refused_before_backend(backend_case: BackendCase, make_service: Any) -> Any:
    portal, spy, _ = portal_for(make_service, backend_case.section)
    for username, password in REFUSED:
        with pytest.raises(UnauthorizedLogin):
            yield login(portal, username, password)
        assert spy.calls == 0, (username, password)
    # Injections in the password of a valid name do reach the backend, and fail there.
    for password in ("*", "' OR '1'='1", "*)(uid=*"):
        with pytest.raises(UnauthorizedLogin):
            yield login(portal, backend_case.login, password)
    assert spy.calls == 3


@pytest.mark.parametrize("injection", INJECTIONS)
@pytest_twisted.inlineCallbacks
def test_injection_reaching_the_backend_is_inert(
    backend_case: BackendCase, make_service: Any, injection: str
) -> Any:
    """Defence in depth: even unvalidated names are escaped (RFC 4515/4514) or bound (SQL)."""
    service = make_service({"main": backend_case.section})
    backend = auth_backends(service).backends[0]
    result = yield backend.verify_password(injection, ALICE_PASSWORD.encode())
    assert result is None
    if backend_case.directory:
        found = yield backend.find(injection)
        assert found is None
    # The users are still there (no DROP TABLE went through).
    portal = build_portal(service)
    _, avatar, _ = yield login(portal, backend_case.login, ALICE_PASSWORD)
    assert avatar.user.name == backend_case.canonical


@pytest_twisted.inlineCallbacks
def test_long_password_reaching_the_backend_is_refused(
    backend_case: BackendCase, make_service: Any
) -> Any:
    service = make_service({"main": backend_case.section})
    backend = auth_backends(service).backends[0]
    result = yield backend.verify_password(backend_case.login, b"x" * 10_000)
    assert result is None


@pytest.mark.parametrize("which", ["down", "slow"])
@pytest_twisted.inlineCallbacks
def test_backend_down_or_slow_is_a_temporary_failure(
    backend_case: BackendCase, make_service: Any, which: str
) -> Any:
    section = backend_case.broken.get(which)
    if section is None:
        pytest.skip(f"{backend_case.kind} has no way to be {which}")
    portal, _, _ = portal_for(make_service, section)
    started = time.monotonic()
    if backend_case.kind == "sqlite" and which == "slow":
        with locked_sqlite(section["database"]):
            with pytest.raises(TemporaryFailure):
                yield login(portal, backend_case.login, ALICE_PASSWORD)
    else:
        with pytest.raises(TemporaryFailure):
            yield login(portal, backend_case.login, ALICE_PASSWORD)
    assert time.monotonic() - started < 4.0


@pytest_twisted.inlineCallbacks
def test_directory_lookup(backend_case: BackendCase, make_service: Any) -> Any:
    if not backend_case.directory:
        pytest.skip(f"{backend_case.kind} knows no addresses")
    service = make_service({"main": backend_case.section})
    directory = build_directory(service)
    user = yield directory.lookup(f"Alice+lists@{DOMAIN.upper()}")
    assert user is not None and user.name == backend_case.canonical
    assert user.mailbox.endswith("/Maildir")
    alias = yield directory.lookup(f"ali@{DOMAIN}")
    assert alias is not None and alias.name == backend_case.canonical
    assert f"ali@{DOMAIN}" in alias.addresses
    assert user.quota_bytes == 100_000_000
    missing = yield directory.lookup(f"nobody@{DOMAIN}")
    assert missing is None


@pytest_twisted.inlineCallbacks
def test_directory_lookup_down_is_a_temporary_failure(
    backend_case: BackendCase, make_service: Any
) -> Any:
    if not backend_case.directory:
        pytest.skip(f"{backend_case.kind} knows no addresses")
    service = make_service({"main": backend_case.broken["down"]})
    with pytest.raises(TemporaryFailure):
        yield build_directory(service).lookup(f"alice@{DOMAIN}")


@pytest_twisted.inlineCallbacks
def test_passwords_never_reach_a_log(
    backend_case: BackendCase, make_service: Any, caplog: pytest.LogCaptureFixture
) -> Any:
    """Right, wrong and backend-down logins: no event or log record carries the password."""
    import logging

    from twisted.logger import formatEvent, globalLogPublisher

    events: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        events.append(formatEvent(event) + repr(event))

    globalLogPublisher.addObserver(observer)
    caplog.set_level(logging.DEBUG)
    secret = "Wr0ng-Pa55word-" + backend_case.kind
    try:
        portal, _, _ = portal_for(make_service, backend_case.section)
        yield login(portal, backend_case.login, ALICE_PASSWORD)
        with pytest.raises(UnauthorizedLogin):
            yield login(portal, backend_case.login, secret)
        down, _, _ = portal_for(make_service, backend_case.broken["down"])
        with pytest.raises(TemporaryFailure):
            yield login(down, backend_case.login, secret)
    finally:
        globalLogPublisher.removeObserver(observer)
    text = "\n".join(events) + caplog.text
    assert ALICE_PASSWORD not in text
    assert secret not in text
