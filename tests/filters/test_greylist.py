"""Greylisting (RFC 6647) with SQLite state and a controlled clock."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from mailserv.errors import ConfigError
from mailserv.filters.base import Action
from mailserv.filters.greylist import GreylistFilter, client_network
from tests.auth.conftest import mysql_db, postgres_db  # noqa: F401  (fixtures)


def test_client_networks() -> None:
    assert client_network("192.0.2.77") == "192.0.2.0/24"
    assert client_network("::ffff:192.0.2.77") == "192.0.2.0/24"
    assert client_network("2001:db8:1:2:3::9") == "2001:db8:1:2::/64"


@pytest_twisted.inlineCallbacks
def attempt(env: Any, flt: Any, peer: str, sender: str, rcpt: str) -> Any:
    envelope = env.envelope(sender, rcpt)
    verdict = yield flt.check_recipient(env.session(peer), envelope, envelope.recipients[0])
    return verdict.action


@pytest_twisted.inlineCallbacks
def test_first_attempt_deferred_retry_after_delay_passes(plain_env: Any) -> Any:
    clock = Clock()
    clock.advance(1_000_000)
    flt = GreylistFilter({}, plain_env.service, clock=clock)
    envelope = plain_env.envelope("a@sender.test", "bob@example.org")
    verdict = yield flt.check_recipient(
        plain_env.session("192.0.2.1"), envelope, envelope.recipients[0]
    )
    assert verdict.action is Action.TEMPFAIL
    reply = verdict.smtp_reply()
    assert (reply.code, reply.enhanced) == (451, "4.7.1")
    assert reply.text == "Greylisted, please try again in 301 seconds"
    clock.advance(60)
    assert (yield attempt(plain_env, flt, "192.0.2.1", "a@sender.test", "bob@example.org")) is (
        Action.TEMPFAIL
    )
    clock.advance(250)
    # Another address of the same /24 retries: same triplet, it passes.
    assert (yield attempt(plain_env, flt, "192.0.2.200", "A@sender.test", "Bob@example.org")) is (
        Action.CONTINUE
    )
    # Other triplets are still greylisted.
    assert (yield attempt(plain_env, flt, "192.0.2.1", "c@sender.test", "bob@example.org")) is (
        Action.TEMPFAIL
    )
    assert (yield attempt(plain_env, flt, "198.51.100.1", "a@sender.test", "bob@example.org")) is (
        Action.TEMPFAIL
    )


@pytest_twisted.inlineCallbacks
def test_late_retry_starts_over_and_state_survives_restart(plain_env: Any) -> Any:
    clock = Clock()
    clock.advance(1_000_000)
    flt = GreylistFilter({"delay": "1m", "retry_window": "1h"}, plain_env.service, clock=clock)
    args = (plain_env, flt, "192.0.2.1", "a@sender.test", "bob@example.org")
    assert (yield attempt(*args)) is Action.TEMPFAIL
    clock.advance(2 * 3600)
    assert (yield attempt(*args)) is Action.TEMPFAIL  # too late: a new first attempt
    clock.advance(61)
    assert (yield attempt(*args)) is Action.CONTINUE
    flt.store.close()
    again = GreylistFilter({"delay": "1m"}, plain_env.service, clock=clock)
    assert (yield attempt(plain_env, again, "192.0.2.1", "a@sender.test", "bob@example.org")) is (
        Action.CONTINUE
    )


@pytest_twisted.inlineCallbacks
def test_clients_that_retried_are_allowlisted(plain_env: Any) -> Any:
    clock = Clock()
    clock.advance(1_000_000)
    flt = GreylistFilter({"auto_allowlist": 2, "delay": "10s"}, plain_env.service, clock=clock)
    for i in range(2):
        args = (plain_env, flt, "192.0.2.1", f"s{i}@sender.test", "bob@example.org")
        assert (yield attempt(*args)) is Action.TEMPFAIL
        clock.advance(11)
        assert (yield attempt(*args)) is Action.CONTINUE
    # Two triplets passed: the client network is not delayed any more.
    assert (yield attempt(plain_env, flt, "192.0.2.9", "new@other.test", "x@example.org")) is (
        Action.CONTINUE
    )


@pytest_twisted.inlineCallbacks
def test_allowlist_and_authenticated_skip(plain_env: Any) -> Any:
    flt = plain_env.build("greylist", allowlist=["192.0.2.0/24"])
    assert (yield attempt(plain_env, flt, "192.0.2.1", "a@s.test", "b@example.org")) is (
        Action.CONTINUE
    )
    session = plain_env.session("198.51.100.1")
    session.auth_user = "alice"
    envelope = plain_env.envelope("a@s.test", "b@example.org")
    verdict = yield flt.check_recipient(session, envelope, envelope.recipients[0])
    assert verdict.action is Action.CONTINUE


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def shared_backend(request: pytest.FixtureRequest, tmp_path: Any) -> dict[str, Any]:
    """An [auth.backend.shared] SQL table: a SQLite file, or a fresh PostgreSQL/MariaDB database."""
    from tests.auth import conftest as auth_fixtures

    if request.param == "sqlite":
        return {"type": "sql", "driver": "sqlite", "database": str(tmp_path / "shared.sqlite")}
    fixture = "postgres_db" if request.param == "postgresql" else "mysql_db"
    # The fixtures of tests/auth (fresh database, dropped afterwards; skip when no server).
    database = request.getfixturevalue(fixture)
    user = auth_fixtures.PG["user"] if request.param == "postgresql" else "root"
    return {"type": "sql", "driver": request.param, "database": database, "user": user}


@pytest_twisted.inlineCallbacks
def test_nodes_sharing_a_sql_database(plain_env: Any, shared_backend: dict[str, Any]) -> Any:
    from mailserv.config import parse_config
    from tests.filters.conftest import CONFIG
    from tests.support.process import render_toml

    text = CONFIG.format(state=plain_env.tmp_path / "state", port=9) + render_toml(
        {"auth": {"backend": {"shared": shared_backend}}}
    )
    plain_env.service.config = parse_config(text)
    clock = Clock()
    clock.advance(1_000_000)
    node_a = GreylistFilter({"backend": "shared", "delay": "10s"}, plain_env.service, clock=clock)
    node_b = GreylistFilter({"backend": "shared", "delay": "10s"}, plain_env.service, clock=clock)
    args = ("192.0.2.1", "a@sender.test", "bob@example.org")
    assert (yield attempt(plain_env, node_a, *args)) is Action.TEMPFAIL
    clock.advance(11)
    # The retry reaches the other node, which knows the triplet.
    assert (yield attempt(plain_env, node_b, *args)) is Action.CONTINUE
    assert (yield attempt(plain_env, node_a, "192.0.2.1", "x@s.test", "bob@example.org")) is (
        Action.TEMPFAIL
    )
    node_a.store.close()
    node_b.store.close()


def test_backend_must_be_an_sql_table(plain_env: Any) -> None:
    with pytest.raises(ConfigError) as info:
        plain_env.build("greylist", backend="nope")
    [problem] = info.value.problems
    assert problem.key == "pipelines.inbound[0].backend"
    assert problem.message == "no [auth.backend.nope] table of type sql"


@pytest_twisted.inlineCallbacks
def test_a_recent_pass_is_answered_at_once(plain_env: Any) -> Any:
    """A triplet that passed within the hour: a Verdict, not a Deferred (no database)."""
    from mailserv.filters.base import Verdict

    clock = Clock()
    clock.advance(1_000_000)
    flt = GreylistFilter({"delay": "0s"}, plain_env.service, clock=clock)
    assert (yield attempt(plain_env, flt, "192.0.2.1", "a@sender.test", "bob@example.org")) is (
        Action.TEMPFAIL
    )
    clock.advance(1)
    assert (yield attempt(plain_env, flt, "192.0.2.1", "a@sender.test", "bob@example.org")) is (
        Action.CONTINUE
    )
    envelope = plain_env.envelope("a@sender.test", "bob@example.org")
    verdict = flt.check_recipient(plain_env.session("192.0.2.9"), envelope, envelope.recipients[0])
    assert isinstance(verdict, Verdict) and verdict.action is Action.CONTINUE
    clock.advance(3601)  # no longer recent: asked from the database again (and passes)
    verdict = flt.check_recipient(plain_env.session("192.0.2.9"), envelope, envelope.recipients[0])
    assert not isinstance(verdict, Verdict)
    assert (yield verdict).action is Action.CONTINUE
