"""POP-before-SMTP (as in Courier and James): a recent POP3/IMAP login lets an address relay.

The IMAP and POP3 servers call ``record(client_ip)`` after a successful
login; the MX listener asks ``allowed(client_ip)``.  State lives in a SQL
table so that several mailserv nodes can share it: by default a SQLite file
``pop_before_smtp.sqlite`` in ``state_dir``, or the database of the sql
backend named by ``auth.pop_before_smtp_backend``.  ``auth.pop_before_smtp``
is the time a login counts (0, the default, turns the feature off; "10m"
is the usual value).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet import defer
from zope.interface import implementer

from mailserv.auth.sql import connection_pool, sqlite_state_pool, translate
from mailserv.errors import TemporaryFailure
from mailserv.interfaces import IPopBeforeSmtp

TABLE = (
    "CREATE TABLE IF NOT EXISTS pop_before_smtp ("
    " address VARCHAR(64) PRIMARY KEY, expires DOUBLE PRECISION NOT NULL)"
)


def _address(client_ip: str) -> str:
    return client_ip.split("%", 1)[0].lower() if "." in client_ip or ":" in client_ip else client_ip


@implementer(IPopBeforeSmtp)
class PopBeforeSmtp:
    """The recent-login table; ``period`` seconds per login (0 disables)."""

    def __init__(
        self, pool: adbapi.ConnectionPool | None, driver: str, period: float, reactor: Any
    ) -> None:
        self.pool = pool
        self.driver = driver
        self.period = period
        self.reactor = reactor
        self._created = False

    @property
    def enabled(self) -> bool:
        return self.period > 0 and self.pool is not None

    def _q(self, text: str) -> str:
        return translate(text, self.driver)

    def _interaction(self, fn: Any, *args: Any) -> defer.Deferred[Any]:
        assert self.pool is not None

        def run(txn: Any) -> Any:
            if not self._created:
                txn.execute(TABLE)
                self._created = True
            return fn(txn, *args)

        def failed(failure: Any) -> None:
            raise TemporaryFailure("POP-before-SMTP state unavailable")

        return self.pool.runInteraction(run).addErrback(failed)

    def record(self, address: str) -> defer.Deferred[None]:
        """Note a successful POP3/IMAP login from ``address`` (an IP)."""
        if not self.enabled:
            return defer.succeed(None)
        now = self.reactor.seconds()
        key = _address(address)

        def write(txn: Any) -> None:
            txn.execute(
                self._q("DELETE FROM pop_before_smtp WHERE address = :a OR expires < :now"),
                {"a": key, "now": now},
            )
            txn.execute(
                self._q("INSERT INTO pop_before_smtp (address, expires) VALUES (:a, :e)"),
                {"a": key, "e": now + self.period},
            )

        return self._interaction(write)

    def allowed(self, address: str) -> defer.Deferred[bool]:
        """Did ``address`` log in within ``period`` seconds?"""
        if not self.enabled:
            return defer.succeed(False)
        now = self.reactor.seconds()

        def read(txn: Any) -> bool:
            txn.execute(
                self._q(
                    "SELECT expires FROM pop_before_smtp WHERE address = :a AND expires >= :now"
                ),
                {"a": _address(address), "now": now},
            )
            return bool(txn.fetchall())

        return self._interaction(read)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def build_pop_before_smtp(config: Any, reactor: Any) -> PopBeforeSmtp:
    """The POP-before-SMTP table of a configuration (disabled when the period is 0)."""
    auth = config.auth
    if auth.pop_before_smtp <= 0:
        return PopBeforeSmtp(None, "sqlite", 0.0, reactor)
    if auth.pop_before_smtp_backend:
        section = auth.backend[auth.pop_before_smtp_backend]
        return PopBeforeSmtp(
            connection_pool(section, reactor), section.driver, auth.pop_before_smtp, reactor
        )
    path = os.path.join(config.state_dir, "pop_before_smtp.sqlite")
    return PopBeforeSmtp(sqlite_state_pool(path, reactor), "sqlite", auth.pop_before_smtp, reactor)


__all__ = ["PopBeforeSmtp", "build_pop_before_smtp"]
