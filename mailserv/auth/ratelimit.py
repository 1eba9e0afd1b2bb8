"""Authentication failure delay and per-IP penalty (Dovecot auth_failure_delay, auth_penalty).

Every protocol logs in through ``AuthThrottle.login(portal, creds, ip, iface)``:

- a wrong password (twisted.cred LoginFailed, UnauthorizedLogin) is answered
  only after ``delay`` seconds (2 s by default);
- each failure from an address doubles its penalty, 2 s up to ``max_penalty``
  (15 s); the next attempt from that address waits its penalty *before* it
  is checked, so guessing in parallel connections does not help.  IPv6
  addresses are grouped by /48.  A success clears the penalty; penalties
  expire after an hour without failures.  At most ``max_tracked`` addresses
  are remembered (oldest dropped), so memory stays bounded.
- a backend that is down (mailserv.errors.TemporaryFailure) is passed through
  at once, without delay or penalty: the protocol answers ``454 4.7.0`` /
  ``NO [UNAVAILABLE]`` / ``-ERR [SYS/TEMP]``.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Any

from twisted.cred.error import LoginFailed
from twisted.internet import defer, task

PENALTY_START = 2.0
PENALTY_EXPIRY = 3600.0


def penalty_key(client_ip: str) -> str:
    """The address a penalty is counted for: the IP, or its /48 for IPv6."""
    try:
        addr = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return client_ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 48), strict=False))
    return str(addr)


class AuthThrottle:
    """Delays failed logins and penalises addresses that keep failing."""

    def __init__(
        self,
        reactor: Any,
        delay: float = 2.0,
        max_penalty: float = 15.0,
        max_tracked: int = 100_000,
    ) -> None:
        self.reactor = reactor
        self.delay = delay
        self.max_penalty = max_penalty
        self.max_tracked = max_tracked
        # key -> (failures, time of the last failure)
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def failures(self, client_ip: str) -> int:
        key = penalty_key(client_ip)
        entry = self._failures.get(key)
        if entry is None:
            return 0
        if self.reactor.seconds() - entry[1] > PENALTY_EXPIRY:
            del self._failures[key]
            return 0
        return entry[0]

    def penalty(self, client_ip: str) -> float:
        """Seconds an attempt from ``client_ip`` waits before it is checked."""
        n = self.failures(client_ip)
        if n == 0 or self.max_penalty <= 0:
            return 0.0
        return float(min(PENALTY_START * 2 ** (n - 1), self.max_penalty))

    def record_failure(self, client_ip: str) -> None:
        key = penalty_key(client_ip)
        n = self.failures(client_ip)
        self._failures.pop(key, None)
        self._failures[key] = (n + 1, self.reactor.seconds())
        while len(self._failures) > self.max_tracked:
            self._failures.popitem(last=False)

    def record_success(self, client_ip: str) -> None:
        self._failures.pop(penalty_key(client_ip), None)

    def _sleep(self, seconds: float) -> defer.Deferred[None]:
        if seconds <= 0:
            return defer.succeed(None)
        return task.deferLater(self.reactor, seconds, lambda: None)

    @defer.inlineCallbacks
    def login(self, portal: Any, credentials: Any, client_ip: str, *interfaces: Any) -> Any:
        """``portal.login`` with the delay and penalty; fires with (iface, avatar, logout)."""
        yield self._sleep(self.penalty(client_ip))
        try:
            result = yield portal.login(credentials, None, *interfaces)
        except LoginFailed:
            self.record_failure(client_ip)
            yield self._sleep(self.delay)
            raise
        self.record_success(client_ip)
        return result


def from_config(reactor: Any, auth_section: Any) -> AuthThrottle:
    """The throttle of an ``[auth]`` section (failure_delay, max_penalty)."""
    return AuthThrottle(reactor, auth_section.failure_delay, auth_section.max_penalty)
