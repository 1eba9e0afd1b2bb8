"""Rate limits: messages and recipients per interval, per client, sender or authenticated user.

Messages are counted at MAIL FROM and recipients at RCPT TO; a refused
attempt is not counted.  Counters are fixed windows of ``interval`` kept in
memory (per process) in an LRU bounded by ``max_keys``, so that a flood of
distinct keys cannot grow memory without bound.  Clients are counted per
address (IPv4) or per /64 (IPv6) by default.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from zope.interface import implementer

from mailserv.config.schema import Section, choice, duration, integer, list_of, option, table_of
from mailserv.filters.base import CONTINUE, FilterBase, Verdict
from mailserv.filters.common import load_options
from mailserv.filters.greylist import client_network
from mailserv.interfaces import IRecipientFilter, ISenderFilter


class LimitOptions(Section):
    by: str = option(choice("client", "sender", "user"))
    messages: int | None = option(integer(1), None)
    recipients: int | None = option(integer(1), None)
    interval: float = option(duration, 3600.0)

    def validate(self, ctx: Any, path: str) -> None:
        if self.messages is None and self.recipients is None:
            ctx.error(path, "set messages, recipients or both")


class RateLimitOptions(Section):
    """Keys of ``filter = "ratelimit"``."""

    limits: list[LimitOptions] = option(list_of(table_of(LimitOptions), nonempty=True))
    max_keys: int = option(integer(100), 100_000)
    ipv4_prefix: int = option(integer(8, 32), 32)
    ipv6_prefix: int = option(integer(16, 128), 64)


@dataclass
class Window:
    start: float
    count: int = 0


class Counters:
    """Fixed-window counters in a bounded LRU."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self._windows: OrderedDict[tuple[str, ...], Window] = OrderedDict()

    def take(
        self, key: tuple[str, ...], amount: int, limit: int, interval: float, now: float
    ) -> bool:
        """Count ``amount`` events if that stays within ``limit``; False if it would not."""
        window = self._windows.get(key)
        if window is None or now - window.start >= interval:
            window = Window(now)
            self._windows[key] = window
        self._windows.move_to_end(key)
        while len(self._windows) > self.max_keys:
            self._windows.popitem(last=False)
        if window.count + amount > limit:
            return False
        window.count += amount
        return True

    def __len__(self) -> int:
        return len(self._windows)


@implementer(ISenderFilter, IRecipientFilter)
class RateLimitFilter(FilterBase):
    """Refuse (451 4.7.1) messages or recipients over the configured rates."""

    name = "ratelimit"

    def __init__(
        self, options: Mapping[str, Any] | None = None, service: Any = None, clock: Any = None
    ) -> None:
        super().__init__(options, service)
        self.config = load_options(RateLimitOptions, self.options)
        self.clock = clock or service.reactor
        self.counters = Counters(self.config.max_keys)

    def _subject(self, by: str, session: Any, envelope: Any) -> str | None:
        if by == "client":
            try:
                return client_network(
                    session.peer_host, self.config.ipv4_prefix, self.config.ipv6_prefix
                )
            except ValueError:
                return None
        if by == "sender":
            return envelope.sender.lower() or None
        return session.auth_user

    def _check(self, kind: str, session: Any, envelope: Any) -> Verdict:
        now = self.clock.seconds()
        for i, limit in enumerate(self.config.limits):
            maximum = getattr(limit, kind)
            subject = self._subject(limit.by, session, envelope)
            if maximum is None or subject is None:
                continue
            if not self.counters.take((str(i), kind, subject), 1, maximum, limit.interval, now):
                what = "messages" if kind == "messages" else "recipients"
                return Verdict.tempfail(
                    451,
                    "4.7.1",
                    f"Too many {what} from this {limit.by}, slow down",
                    f"rate limit {limit.by} {what}",
                )
        return CONTINUE

    def check_sender(self, session: Any, envelope: Any) -> Verdict:
        return self._check("messages", session, envelope)

    def check_recipient(self, session: Any, envelope: Any, rcpt: Any) -> Verdict:
        return self._check("recipients", session, envelope)
