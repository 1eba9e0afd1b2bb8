"""Tarpit: listed or misbehaving clients get delayed replies, others none."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from mailserv.filters.base import Action, Verdict
from mailserv.filters.common import connection_marks
from mailserv.filters.tarpit import TarpitFilter


def make(env: Any, clock: Clock, **options: Any) -> TarpitFilter:
    return TarpitFilter({"delay": "5s", **options}, env.service, clock=clock)


def test_good_clients_are_not_delayed(plain_env: Any) -> None:
    flt = make(plain_env, Clock())
    verdict = flt.check_connect(plain_env.session("192.0.2.1"))
    assert isinstance(verdict, Verdict) and verdict.action is Action.CONTINUE


def test_listed_clients_wait_for_every_reply(plain_env: Any) -> None:
    clock = Clock()
    flt = make(plain_env, clock)
    session = plain_env.session("192.0.2.1")
    connection_marks(session)["listed"] = True
    envelope = plain_env.envelope("a@s.test", "b@example.org")
    for call in (
        lambda: flt.check_helo(session),
        lambda: flt.check_sender(session, envelope),
        lambda: flt.check_recipient(session, envelope, envelope.recipients[0]),
    ):
        d = call()
        fired: list[Any] = []
        d.addCallback(fired.append)
        clock.advance(4.9)
        assert fired == []
        clock.advance(0.2)
        assert [v.action for v in fired] == [Action.CONTINUE]
    assert connection_marks(session)["tarpitted"] == 3
    assert flt.timeout == 15.0  # above the delay, so the chain never times the tarpit out


def test_networks_and_errors(plain_env: Any) -> None:
    clock = Clock()
    flt = make(plain_env, clock, networks=["198.51.100.0/24"], after_errors=2)
    assert not isinstance(flt.check_connect(plain_env.session("198.51.100.7")), Verdict)
    session = plain_env.session("192.0.2.1")
    session.notes["errors"] = 1
    assert isinstance(flt.check_helo(session), Verdict)
    session.notes["errors"] = 2
    assert not isinstance(flt.check_helo(session), Verdict)
    clock.advance(10)
