"""AuthThrottle: 2 s failure delay, per-IP penalty doubling to 15 s, no delay when down."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.task import Clock

from mailserv.auth.ratelimit import AuthThrottle, penalty_key
from mailserv.errors import TemporaryFailure


class FakePortal:
    """A portal whose answer the test chooses: ok, wrong password or backend down."""

    def __init__(self) -> None:
        self.outcome = "ok"
        self.calls = 0

    def login(self, creds: Any, mind: Any, *ifaces: Any) -> defer.Deferred[Any]:
        self.calls += 1
        if self.outcome == "ok":
            return defer.succeed((ifaces[0], "avatar", lambda: None))
        if self.outcome == "down":
            return defer.fail(TemporaryFailure("down"))
        return defer.fail(UnauthorizedLogin())


CREDS = UsernamePassword(b"alice", b"pw")


def attempt(throttle: AuthThrottle, portal: FakePortal, ip: str) -> list[Any]:
    out: list[Any] = []
    throttle.login(portal, CREDS, ip, "IFACE").addBoth(out.append)
    return out


def test_success_is_immediate() -> None:
    clock = Clock()
    out = attempt(AuthThrottle(clock), FakePortal(), "192.0.2.1")
    assert out and out[0][1] == "avatar"


def test_failure_is_answered_after_the_delay() -> None:
    clock, portal = Clock(), FakePortal()
    portal.outcome = "wrong"
    out = attempt(AuthThrottle(clock, delay=2.0), portal, "192.0.2.1")
    assert out == []
    clock.advance(1.99)
    assert out == []
    clock.advance(0.01)
    assert out[0].check(UnauthorizedLogin)


def test_penalty_doubles_to_the_maximum_then_clears_on_success() -> None:
    clock, portal = Clock(), FakePortal()
    throttle = AuthThrottle(clock, delay=2.0, max_penalty=15.0)
    portal.outcome = "wrong"
    waits = []
    for _ in range(6):
        waits.append(throttle.penalty("192.0.2.1"))
        out = attempt(throttle, portal, "192.0.2.1")
        clock.pump([waits[-1], 2.0])
        assert out[0].check(UnauthorizedLogin)
    assert waits == [0.0, 2.0, 4.0, 8.0, 15.0, 15.0]
    # Before the penalty has passed, the backend is not even asked.
    portal.outcome, calls = "ok", portal.calls
    out = attempt(throttle, portal, "192.0.2.1")
    clock.advance(14.9)
    assert out == [] and portal.calls == calls
    clock.advance(0.1)
    assert out[0][1] == "avatar"
    assert throttle.penalty("192.0.2.1") == 0.0
    # Another address was never penalised.
    assert throttle.penalty("192.0.2.2") == 0.0


def test_temporary_failure_is_not_delayed_nor_penalised() -> None:
    clock, portal = Clock(), FakePortal()
    portal.outcome = "down"
    throttle = AuthThrottle(clock)
    out = attempt(throttle, portal, "192.0.2.1")
    assert out[0].check(TemporaryFailure)
    assert throttle.penalty("192.0.2.1") == 0.0


def test_penalty_expires() -> None:
    clock = Clock()
    throttle = AuthThrottle(clock)
    throttle.record_failure("192.0.2.1")
    throttle.record_failure("192.0.2.1")
    assert throttle.penalty("192.0.2.1") == 4.0
    clock.advance(3601)
    assert throttle.penalty("192.0.2.1") == 0.0


def test_memory_is_bounded() -> None:
    throttle = AuthThrottle(Clock(), max_tracked=10)
    for i in range(100):
        throttle.record_failure(f"10.0.0.{i}")
    assert len(throttle._failures) == 10


@pytest.mark.parametrize(
    "ip, key",
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8:1:2::1", "2001:db8:1::/48"),
        ("2001:db8:1:ffff::2", "2001:db8:1::/48"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("fe80::1%eth0", "fe80::/48"),
        ("unix", "unix"),
    ],
)
def test_penalty_key(ip: str, key: str) -> None:
    assert penalty_key(ip) == key
