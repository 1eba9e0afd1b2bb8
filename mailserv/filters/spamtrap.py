"""Spam traps: mail to a trap address blocks the client for ``block_for``.

Trap addresses are full addresses or whole domains (``@trap.example.org``).
The RCPT to the trap is refused, and so is every later connection and
recipient of that client (per address, IPv6 per /64) until the block
expires.  Blocks are kept in memory (per process, bounded by ``max_entries``).

A trap address need not be a user, an alias nor even in a local domain: the
filter has ``runs_first``, so a listener's chain runs it before the built-in
relay and recipient checks (mailserv/filters/chain.py ``FilterChain.__add__``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from mailserv.config.schema import Section, duration, integer, list_of, nonempty_string, option
from mailserv.filters.base import CONTINUE, FilterBase, Verdict
from mailserv.filters.common import connection_marks, load_options
from mailserv.filters.greylist import client_network
from mailserv.interfaces import IConnectionFilter, IRecipientFilter

log = Logger()


class SpamtrapOptions(Section):
    """Keys of ``filter = "spamtrap"``."""

    addresses: list[str] = option(list_of(nonempty_string, nonempty=True))
    block_for: float = option(duration, 86400.0)
    max_entries: int = option(integer(10), 100_000)


@implementer(IConnectionFilter, IRecipientFilter)
class SpamtrapFilter(FilterBase):
    """Block clients that send to a trap address."""

    name = "spamtrap"
    runs_first = True  # before the MX's relay and recipient checks

    def __init__(
        self, options: Mapping[str, Any] | None = None, service: Any = None, clock: Any = None
    ) -> None:
        super().__init__(options, service)
        self.config = load_options(SpamtrapOptions, self.options)
        self.clock = clock or service.reactor
        self.addresses = {a.lower() for a in self.config.addresses if not a.startswith("@")}
        self.domains = {a[1:].lower() for a in self.config.addresses if a.startswith("@")}
        self.blocked: OrderedDict[str, float] = OrderedDict()

    def _key(self, session: Any) -> str | None:
        try:
            return client_network(session.peer_host, 32, 64)
        except ValueError:
            return None

    def _blocked(self, session: Any) -> bool:
        key = self._key(session)
        until = self.blocked.get(key) if key is not None else None
        if until is None:
            return False
        if until <= self.clock.seconds():
            del self.blocked[key]  # type: ignore[arg-type]
            return False
        connection_marks(session)["listed"] = True
        return True

    def _refusal(self) -> Verdict:
        return Verdict.reject(554, "5.7.1", "Access denied", "spamtrap")

    def check_connect(self, session: Any) -> Verdict:
        return self._refusal() if self._blocked(session) else CONTINUE

    def check_recipient(self, session: Any, envelope: Any, rcpt: Any) -> Verdict:
        if self._blocked(session):
            return self._refusal()
        address = rcpt.address
        if address.key in self.addresses or address.domain in self.domains:
            key = self._key(session)
            if key is not None:
                self.blocked[key] = self.clock.seconds() + self.config.block_for
                self.blocked.move_to_end(key)
                while len(self.blocked) > self.config.max_entries:
                    self.blocked.popitem(last=False)
                log.info("spam trap hit by {client}; blocked", client=key)
                connection_marks(session)["listed"] = True
            return Verdict.reject(550, "5.1.1", "Recipient address rejected", "spamtrap")
        return CONTINUE
