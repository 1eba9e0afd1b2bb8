"""Tarpit: delay every reply to clients that are listed or misbehave.

A client is tarpitted when its address is in ``networks``, when another
filter marked the connection as listed (``dnsbl``, ``spamtrap``), or when
the connection collected ``after_errors`` refusals: the SMTP server counts
bad commands and refused recipients in ``session.notes["errors"]``.  The
delay applies to the connection, HELO, MAIL and RCPT replies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet import task
from zope.interface import implementer

from mailserv.config.schema import Section, boolean, duration, integer, list_of, network, option
from mailserv.filters.base import CONTINUE, FilterBase
from mailserv.filters.common import connection_marks, load_options, parse_ip
from mailserv.interfaces import IConnectionFilter, IHeloFilter, IRecipientFilter, ISenderFilter


class TarpitOptions(Section):
    """Keys of ``filter = "tarpit"``."""

    delay: float = option(duration, 10.0)
    networks: list[Any] = option(list_of(network), list)
    when_listed: bool = option(boolean, True)
    after_errors: int = option(integer(0), 3)  # 0: errors never tarpit


@implementer(IConnectionFilter, IHeloFilter, ISenderFilter, IRecipientFilter)
class TarpitFilter(FilterBase):
    """Slow listed or misbehaving clients down; never refuses by itself."""

    name = "tarpit"

    def __init__(
        self, options: Mapping[str, Any] | None = None, service: Any = None, clock: Any = None
    ) -> None:
        explicit_timeout = options is not None and "timeout" in options
        super().__init__(options, service)
        self.config = load_options(TarpitOptions, self.options)
        self.clock = clock or service.reactor
        if not explicit_timeout:
            self.timeout = self.config.delay + 10.0

    def qualifies(self, session: Any) -> bool:
        marks = connection_marks(session)
        if self.config.when_listed and marks.get("listed"):
            return True
        errors = int(session.notes.get("errors", 0)) + int(marks.get("refusals", 0))
        if self.config.after_errors and errors >= self.config.after_errors:
            return True
        ip = parse_ip(session.peer_host)
        if ip is None:
            return False
        return any(ip in net for net in self.config.networks)

    def _maybe_delay(self, session: Any) -> Any:
        if not self.qualifies(session):
            return CONTINUE
        marks = connection_marks(session)
        marks["tarpitted"] = marks.get("tarpitted", 0) + 1
        return task.deferLater(self.clock, self.config.delay, lambda: CONTINUE)

    def check_connect(self, session: Any) -> Any:
        return self._maybe_delay(session)

    def check_helo(self, session: Any) -> Any:
        return self._maybe_delay(session)

    def check_sender(self, session: Any, envelope: Any) -> Any:
        return self._maybe_delay(session)

    def check_recipient(self, session: Any, envelope: Any, rcpt: Any) -> Any:
        return self._maybe_delay(session)
