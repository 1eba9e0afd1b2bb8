"""Greylisting (RFC 6647) with SQLite state and a controlled clock."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet.task import Clock

from mailserv.filters.base import Action
from mailserv.filters.greylist import GreylistFilter, client_network


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
