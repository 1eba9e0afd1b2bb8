"""The portal over several backends, reload, the realm, usernames and POP-before-SMTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin

from mailserv.auth import auth_backends, build_pop_before_smtp, build_portal, throttle_for
from mailserv.auth.usernames import InvalidUsername, acceptable_password, normalize_username
from mailserv.errors import TemporaryFailure
from mailserv.interfaces import IMailUser, IPopBeforeSmtp
from tests.auth.conftest import FakeService, make_config


def write(path: Path, *lines: str) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def login(portal: Any, user: str, password: str) -> Any:
    return portal.login(UsernamePassword(user.encode(), password.encode()), None, IMailUser)


@pytest.mark.parametrize("name", ["alice", "Alice@Example.org", "a.b-c_d+e@x.y", "x" * 255])
def test_valid_usernames(name: str) -> None:
    assert normalize_username(name) == name.lower()
    assert normalize_username(name.encode()) == name.lower()


@pytest.mark.parametrize(
    "name", ["", "x" * 256, "a b", "a:b", "a/b", "a@b@c", "@a", ".a", "ä", b"\xff", "a\r\nb"]
)
def test_invalid_usernames(name: Any) -> None:
    with pytest.raises(InvalidUsername):
        normalize_username(name)


def test_acceptable_password() -> None:
    assert acceptable_password("pässword") == "pässword".encode()
    assert acceptable_password(b"") is None
    assert acceptable_password(b"a\0b") is None
    assert acceptable_password(b"x" * 1025) is None


@pytest_twisted.inlineCallbacks
def test_backends_are_tried_in_order(make_service: Any, tmp_path: Path) -> Any:
    first = write(tmp_path / "a.passwd", "alice:{PLAIN}one")
    second = write(tmp_path / "b.passwd", "alice:{PLAIN}two", "bob:{PLAIN}bob")
    service = make_service(
        {"a": {"type": "passwd-file", "path": first}, "b": {"type": "passwd-file", "path": second}}
    )
    portal = build_portal(service)
    _, avatar, _ = yield login(portal, "alice", "one")
    assert avatar.user.name == "alice"
    _, avatar, _ = yield login(portal, "alice", "two")  # a wrong password falls through
    _, avatar, _ = yield login(portal, "bob", "bob")
    assert avatar.user.name == "bob"
    with pytest.raises(UnauthorizedLogin):
        yield login(portal, "bob", "one")


@pytest_twisted.inlineCallbacks
def test_a_backend_down_gives_a_temporary_failure_not_a_wrong_password(
    make_service: Any, tmp_path: Path, closed_port: int
) -> Any:
    good = write(tmp_path / "ok.passwd", "bob:{PLAIN}bob")
    down = {
        "type": "ldap",
        "urls": [f"ldap://127.0.0.1:{closed_port}"],
        "base_dn": "dc=example,dc=org",
        "timeout": "1s",
    }
    portal = build_portal(
        make_service({"ldap": down, "file": {"type": "passwd-file", "path": good}})
    )
    _, avatar, _ = yield login(portal, "bob", "bob")  # another backend answers
    assert avatar.user.name == "bob"
    with pytest.raises(TemporaryFailure):
        yield login(portal, "bob", "wrong")
    with pytest.raises(TemporaryFailure):
        yield login(portal, "alice", "x")


@pytest_twisted.inlineCallbacks
def test_reload_switches_backends(make_service: Any, tmp_path: Path) -> Any:
    first = write(tmp_path / "a.passwd", "alice:{PLAIN}one")
    second = write(tmp_path / "b.passwd", "alice:{PLAIN}two")
    service = make_service({"a": {"type": "passwd-file", "path": first}})
    portal = build_portal(service)
    yield login(portal, "alice", "one")
    portal.reload(make_config(tmp_path, {"b": {"type": "passwd-file", "path": second}}))
    yield login(portal, "alice", "two")
    with pytest.raises(UnauthorizedLogin):
        yield login(portal, "alice", "one")
    assert [b.name for b in auth_backends(service).backends] == ["b"]
    throttle = throttle_for(service)
    portal.reload(make_config(tmp_path, {}, failure_delay="3s", max_penalty="20s"))
    assert (throttle.delay, throttle.max_penalty) == (3.0, 20.0)


@pytest_twisted.inlineCallbacks
def test_avatar_user_from_the_directory(make_service: Any, tmp_path: Path) -> Any:
    path = write(
        tmp_path / "u.passwd",
        "alice@example.org:{PLAIN}pw:500:501::/home/alice::aliases=ali@example.org",
        "bob:{PLAIN}pw:::::: mail=/srv/bob/Maildir",
    )
    portal = build_portal(make_service({"f": {"type": "passwd-file", "path": path}}))
    _, avatar, _ = yield login(portal, "alice@example.org", "pw")
    user = avatar.user
    assert user.mailbox == str(tmp_path / "mail" / "example.org" / "alice" / "Maildir")
    assert (user.uid, user.gid) == (500, 501)
    assert user.addresses == ("alice@example.org", "ali@example.org")
    _, avatar, _ = yield login(portal, "bob", "pw")
    assert avatar.user.mailbox == "/srv/bob/Maildir"
    assert avatar.user.addresses == ("bob@example.org", "bob@example.net")


def test_throttle_is_shared_per_service(make_service: Any) -> None:
    service = make_service({})
    assert throttle_for(service) is throttle_for(service)
    assert throttle_for(service).delay == 2.0 and throttle_for(service).max_penalty == 15.0


@pytest_twisted.inlineCallbacks
def test_pop_before_smtp_is_off_by_default(make_service: Any) -> Any:
    recorder = build_pop_before_smtp(make_service({}))
    assert IPopBeforeSmtp.providedBy(recorder)
    yield recorder.record("192.0.2.1")
    assert (yield recorder.allowed("192.0.2.1")) is False


@pytest_twisted.inlineCallbacks
def test_pop_before_smtp_in_sqlite(tmp_path: Path) -> Any:
    from twisted.internet import reactor
    from twisted.internet.task import Clock

    from mailserv.auth.popbeforesmtp import PopBeforeSmtp

    config = make_config(tmp_path, {}, pop_before_smtp="10m")
    (tmp_path / "state").mkdir()
    built = build_pop_before_smtp(FakeService(config, reactor))
    assert built.period == 600.0
    clock = Clock()  # the same table, with time under the test's control
    clock.advance(1_000_000)
    recorder = PopBeforeSmtp(built.pool, "sqlite", built.period, clock)
    try:
        assert (yield recorder.allowed("192.0.2.1")) is False
        yield recorder.record("192.0.2.1")
        assert (yield recorder.allowed("192.0.2.1")) is True
        assert (yield recorder.allowed("192.0.2.2")) is False
        clock.advance(601)
        assert (yield recorder.allowed("192.0.2.1")) is False
    finally:
        built.close()
    assert (tmp_path / "state" / "pop_before_smtp.sqlite").exists()


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_pop_before_smtp_shared_in_postgresql(tmp_path: Path, postgres_db: str) -> Any:
    """Two nodes with the same SQL backend see each other's logins."""
    from twisted.internet import reactor

    backend = {"type": "sql", "driver": "postgresql", "database": postgres_db, "user": "postgres"}
    config = make_config(
        tmp_path, {"db": backend}, pop_before_smtp="10m", pop_before_smtp_backend="db"
    )
    node1 = build_pop_before_smtp(FakeService(config, reactor))
    node2 = build_pop_before_smtp(FakeService(config, reactor))
    try:
        yield node1.record("2001:db8::1")
        assert (yield node2.allowed("2001:db8::1")) is True
        assert (yield node2.allowed("2001:db8::2")) is False
        yield node2.record("2001:db8::1")  # a second login refreshes, no duplicate key
    finally:
        node1.close()
        node2.close()


def test_pop_before_smtp_backend_must_be_an_sql_backend(tmp_path: Path) -> None:
    from mailserv.errors import ConfigError

    backend = {"f": {"type": "passwd-file", "path": str(tmp_path / "u")}}
    with pytest.raises(
        ConfigError, match=r"auth.pop_before_smtp_backend: no sql backend named 'f'"
    ):
        make_config(tmp_path, backend, pop_before_smtp_backend="f")
    with pytest.raises(ConfigError, match="no sql backend named 'nope'"):
        make_config(tmp_path, backend, pop_before_smtp_backend="nope")


@pytest_twisted.inlineCallbacks
def test_with_the_real_mail_service(tmp_path: Path) -> Any:
    """MailService.portal / .directory come from build_portal / build_directory, and reload."""
    from twisted.internet import reactor

    from mailserv.service import MailService

    users = write(tmp_path / "u.passwd", "alice@example.org:{PLAIN}one")
    config = make_config(tmp_path, {"f": {"type": "passwd-file", "path": users}})
    service = MailService(config, reactor)
    try:
        _, avatar, _ = yield login(service.portal, "alice@example.org", "one")
        found = yield service.directory.lookup("alice+x@example.org")
        assert found == avatar.user
        other = write(tmp_path / "v.passwd", "alice@example.org:{PLAIN}two")
        service.reload(make_config(tmp_path, {"g": {"type": "passwd-file", "path": other}}))
        yield login(service.portal, "alice@example.org", "two")
        with pytest.raises(UnauthorizedLogin):
            yield login(service.portal, "alice@example.org", "one")
    finally:
        service.threads._stop_pools()


def test_pop_before_smtp_is_one_per_service(make_service: Any) -> None:
    service = make_service({})
    assert build_pop_before_smtp(service) is build_pop_before_smtp(service)
