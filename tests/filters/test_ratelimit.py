"""Rate limits per client, sender and authenticated user."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from mailserv.errors import ConfigError
from mailserv.filters.base import Action
from mailserv.filters.ratelimit import Counters, RateLimitFilter


def make(env: Any, clock: Clock, *limits: dict) -> RateLimitFilter:
    return RateLimitFilter({"limits": list(limits)}, env.service, clock=clock)


def test_messages_per_client_per_interval(plain_env: Any) -> None:
    clock = Clock()
    flt = make(plain_env, clock, {"by": "client", "messages": 3, "interval": "1m"})
    session = plain_env.session("192.0.2.1")
    actions = [flt.check_sender(session, plain_env.envelope("a@s.test")).action for _ in range(4)]
    assert actions == [Action.CONTINUE] * 3 + [Action.TEMPFAIL]
    reply = flt.check_sender(session, plain_env.envelope("a@s.test")).smtp_reply()
    assert (reply.code, reply.enhanced, reply.text) == (
        451,
        "4.7.1",
        "Too many messages from this client, slow down",
    )
    # Another client is counted apart; after the interval the first may send again.
    other = plain_env.session("192.0.2.2")
    assert flt.check_sender(other, plain_env.envelope("a@s.test")).action is Action.CONTINUE
    clock.advance(61)
    assert flt.check_sender(session, plain_env.envelope("a@s.test")).action is Action.CONTINUE


def test_recipients_per_sender_and_per_user(plain_env: Any) -> None:
    clock = Clock()
    flt = make(
        plain_env,
        clock,
        {"by": "sender", "recipients": 2},
        {"by": "user", "recipients": 3, "messages": 10},
    )
    session = plain_env.session("192.0.2.1")
    envelope = plain_env.envelope("Bulk@S.test", "a@example.org")
    rcpt = envelope.recipients[0]
    got = [flt.check_recipient(session, envelope, rcpt).action for _ in range(3)]
    assert got == [Action.CONTINUE, Action.CONTINUE, Action.TEMPFAIL]
    # The null sender has no sender key; an authenticated user is limited by "user".
    session.auth_user = "alice"
    bounce = plain_env.envelope(None, "a@example.org")
    got = [flt.check_recipient(session, bounce, rcpt).action for _ in range(4)]
    assert got == [Action.CONTINUE] * 3 + [Action.TEMPFAIL]


def test_ipv6_clients_share_their_64(plain_env: Any) -> None:
    flt = make(plain_env, Clock(), {"by": "client", "messages": 1})
    first = plain_env.session("2001:db8::1")
    second = plain_env.session("2001:db8::2")
    assert flt.check_sender(first, plain_env.envelope("a@s.test")).action is Action.CONTINUE
    assert flt.check_sender(second, plain_env.envelope("a@s.test")).action is Action.TEMPFAIL


def test_memory_is_bounded() -> None:
    counters = Counters(100)
    for i in range(1000):
        counters.take(("c", str(i)), 1, 5, 60, 0.0)
    assert len(counters) == 100


def test_limits_are_validated(plain_env: Any) -> None:
    with pytest.raises(ConfigError) as info:
        plain_env.build("ratelimit", limits=[{"by": "ip", "messages": 0}, {"by": "user"}])
    assert sorted(p.key for p in info.value.problems) == [
        "pipelines.inbound[0].limits[0].by",
        "pipelines.inbound[0].limits[0].messages",
        "pipelines.inbound[0].limits[1]",
    ]
