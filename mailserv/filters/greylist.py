"""Greylisting (RFC 6647): temporarily refuse unknown (client net, sender, recipient) triplets.

A triplet seen for the first time gets ``451 4.7.1``; a retry after
``delay`` (default 5 minutes) and within ``retry_window`` passes and is
remembered for ``expire`` (35 days, postgrey's default).  A client network
whose mail passed ``auto_allowlist`` times is allowlisted (RFC 6647 §4.2.1:
senders that retry properly are not delayed again).  Clients are grouped by
/24 (IPv4) or /64 (IPv6) since large senders retry from other addresses.

State lives in SQLite (``state_dir/filters/greylist.sqlite`` by default, or
``database = "path"``), or, when several nodes share it, in the SQL database
of an ``[auth.backend.NAME]`` table of type sql (``backend = "NAME"``:
SQLite, PostgreSQL or MariaDB).  Queries run in an adbapi pool's threads.
Triplets that passed within the last hour are answered from memory.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from mailserv.auth.sql import connection_pool, sqlite_state_pool, translate
from mailserv.config.schema import (
    Section,
    boolean,
    duration,
    integer,
    list_of,
    network,
    option,
    optional,
    string,
)
from mailserv.filters.base import CONTINUE, FilterBase, Verdict
from mailserv.filters.common import config_error, load_options, parse_ip, state_path
from mailserv.interfaces import IRecipientFilter

RECENT = 3600.0
RECENT_MAX = 10_000

TABLES = (
    "CREATE TABLE IF NOT EXISTS greylist_triplets ("
    " client VARCHAR(64) NOT NULL, sender VARCHAR(255) NOT NULL,"
    " recipient VARCHAR(255) NOT NULL, first_seen DOUBLE PRECISION NOT NULL,"
    " last_seen DOUBLE PRECISION NOT NULL, passed INTEGER NOT NULL,"
    " PRIMARY KEY (client, sender, recipient))",
    "CREATE TABLE IF NOT EXISTS greylist_clients ("
    " client VARCHAR(64) PRIMARY KEY, passes INTEGER NOT NULL,"
    " last_seen DOUBLE PRECISION NOT NULL)",
)


@functools.lru_cache(maxsize=4096)
def client_network(address: str, v4_prefix: int = 24, v6_prefix: int = 64) -> str:
    """The network a client address is greylisted as (/24 or /64 by default; cached)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = v4_prefix if ip.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def decide(
    row: Any, now: float, delay: float, retry_window: float, expire: float
) -> tuple[str, float]:
    """RFC 6647 §2: "new" | "early" (seconds left) | "pass" for a triplet's row."""
    if row is None:
        return "new", delay
    first_seen, last_seen, passed = row
    if passed:
        return ("pass", 0.0) if now - last_seen < expire else ("new", delay)
    if now - first_seen < delay:
        return "early", delay - (now - first_seen)
    if now - first_seen > delay + retry_window:
        return "new", delay  # the retry came too late: start again
    return "pass", 0.0


class GreylistStore:
    """The state in a SQL database through an adbapi pool (SQLite, PostgreSQL or MariaDB).

    Portable SQL only (no upserts): a race between two nodes inserting the
    same row is retried once and then seen as the other node's row.
    """

    def __init__(self, pool: Any, driver: str) -> None:
        self.pool = pool
        self.driver = driver
        self._created = False

    def _q(self, text: str) -> str:
        return translate(text, self.driver)

    def _interaction(self, fn: Any, *args: Any) -> defer.Deferred[Any]:
        def run(txn: Any) -> Any:
            if not self._created:
                for table in TABLES:
                    txn.execute(table)
            result = fn(txn, *args)
            self._created = True
            return result

        def retry(failure: Any) -> Any:
            if "integrity" not in type(failure.value).__name__.lower():
                return failure
            return self.pool.runInteraction(run)

        return self.pool.runInteraction(run).addErrback(retry)  # type: ignore[no-any-return]

    def check(
        self,
        triplet: tuple[str, str, str],
        now: float,
        delay: float,
        retry_window: float,
        expire: float,
        auto_allowlist: int,
    ) -> defer.Deferred[tuple[str, float]]:
        """Deferred[("pass" | "allowlisted" | "new" | "early", seconds left)]; records it."""
        return self._interaction(
            self._check, triplet, now, delay, retry_window, expire, auto_allowlist
        )

    def _check(
        self,
        txn: Any,
        triplet: tuple[str, str, str],
        now: float,
        delay: float,
        retry_window: float,
        expire: float,
        auto_allowlist: int,
    ) -> tuple[str, float]:
        q = self._q
        keys = dict(zip(("client", "sender", "recipient"), triplet, strict=True))
        client = {"client": triplet[0], "now": now}
        if auto_allowlist:
            txn.execute(
                q("SELECT passes, last_seen FROM greylist_clients WHERE client = :client"), client
            )
            row = txn.fetchone()
            if row and row[0] >= auto_allowlist and now - row[1] < expire:
                txn.execute(
                    q("UPDATE greylist_clients SET last_seen = :now WHERE client = :client"), client
                )
                return "allowlisted", 0.0
        txn.execute(
            q(
                "SELECT first_seen, last_seen, passed FROM greylist_triplets"
                " WHERE client = :client AND sender = :sender AND recipient = :recipient"
            ),
            keys,
        )
        row = txn.fetchone()
        state, left = decide(row, now, delay, retry_window, expire)
        values = {**keys, "now": now}
        if state == "new":
            if row is not None:
                txn.execute(
                    q(
                        "DELETE FROM greylist_triplets"
                        " WHERE client = :client AND sender = :sender AND recipient = :recipient"
                    ),
                    keys,
                )
            txn.execute(
                q(
                    "INSERT INTO greylist_triplets VALUES"
                    " (:client, :sender, :recipient, :now, :now, 0)"
                ),
                values,
            )
        elif state == "early":
            txn.execute(
                q(
                    "UPDATE greylist_triplets SET last_seen = :now"
                    " WHERE client = :client AND sender = :sender AND recipient = :recipient"
                ),
                values,
            )
        else:
            txn.execute(
                q(
                    "UPDATE greylist_triplets SET last_seen = :now, passed = passed + 1"
                    " WHERE client = :client AND sender = :sender AND recipient = :recipient"
                ),
                values,
            )
            if not row[2]:  # this triplet's first pass: the client retried properly
                txn.execute(
                    q(
                        "UPDATE greylist_clients SET passes = passes + 1, last_seen = :now"
                        " WHERE client = :client"
                    ),
                    client,
                )
                if txn.rowcount == 0:
                    txn.execute(q("INSERT INTO greylist_clients VALUES (:client, 1, :now)"), client)
        return state, left

    def expire(self, now: float, retry_window: float, expire: float) -> defer.Deferred[Any]:
        """Forget stale triplets and clients."""

        def run(txn: Any) -> None:
            params = {"unretried": now - retry_window, "stale": now - expire}
            txn.execute(
                self._q(
                    "DELETE FROM greylist_triplets WHERE (passed = 0 AND first_seen < :unretried)"
                    " OR last_seen < :stale"
                ),
                params,
            )
            txn.execute(
                self._q("DELETE FROM greylist_clients WHERE last_seen < :stale"),
                {"stale": params["stale"]},
            )

        return self._interaction(run)

    def close(self) -> None:
        self.pool.close()


def sqlite_pool(path: str, reactor: Any) -> Any:
    """A one-connection adbapi pool on a SQLite file (WAL, no fsync per commit)."""

    def setup(conn: Any) -> None:
        conn.execute("PRAGMA journal_mode=WAL")
        # A lost triplet after a crash only means one more retry for a client.
        conn.execute("PRAGMA synchronous=NORMAL")

    return sqlite_state_pool(path, reactor, setup)


class GreylistOptions(Section):
    """Keys of ``filter = "greylist"``."""

    delay: float = option(duration, 300.0)
    retry_window: float = option(duration, 2 * 86400.0)
    expire: float = option(duration, 35 * 86400.0)
    auto_allowlist: int = option(integer(0), 5)
    ipv4_prefix: int = option(integer(8, 32), 24)
    ipv6_prefix: int = option(integer(16, 128), 64)
    allowlist: list[Any] = option(list_of(network), list)
    skip_authenticated: bool = option(boolean, True)
    database: str | None = option(optional(string), None)
    backend: str | None = option(optional(string), None)


@implementer(IRecipientFilter)
class GreylistFilter(FilterBase):
    """Refuse the first delivery attempt of an unknown triplet with a temporary error."""

    name = "greylist"

    def __init__(
        self,
        options: Mapping[str, Any] | None = None,
        service: Any = None,
        clock: Any = None,
    ) -> None:
        super().__init__(options, service)
        self.config = load_options(GreylistOptions, self.options)
        self.clock = clock or service.reactor
        self.store = self._store(service)
        self._last_expiry = 0.0
        # Triplets that passed recently: answered without a database round trip
        # (their last_seen is refreshed at most every RECENT seconds).
        self._recent: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    def _store(self, service: Any) -> GreylistStore:
        name = self.config.backend
        if name is None:
            path = self.config.database or state_path(service, "greylist.sqlite")
            return GreylistStore(sqlite_pool(path, service.reactor), "sqlite")
        if self.config.database is not None:
            raise config_error("backend", "set database or backend, not both")
        section = service.config.auth.backend.get(name)
        if section is None or getattr(section, "type", None) != "sql":
            raise config_error("backend", f"no [auth.backend.{name}] table of type sql")
        return GreylistStore(connection_pool(section, service.reactor), section.driver)

    def _skip(self, session: Any) -> bool:
        if self.config.skip_authenticated and session.auth_user is not None:
            return True
        ip = parse_ip(session.peer_host)
        if ip is None:
            return True
        return any(ip in net for net in self.config.allowlist)

    def check_recipient(self, session: Any, envelope: Any, rcpt: Any) -> Any:
        """CONTINUE at once for a triplet that passed recently, else a Deferred verdict."""
        if self._skip(session):
            return CONTINUE
        cfg = self.config
        triplet = (
            client_network(session.peer_host, cfg.ipv4_prefix, cfg.ipv6_prefix),
            envelope.sender.lower(),
            rcpt.address.key,
        )
        now = self.clock.seconds()
        passed_at = self._recent.get(triplet)
        if passed_at is not None and now - passed_at < RECENT:
            return CONTINUE
        return self._check_stored(triplet, now)

    @defer.inlineCallbacks
    def _check_stored(self, triplet: tuple[str, str, str], now: float) -> Any:
        cfg = self.config
        if now - self._last_expiry > 3600:
            self._last_expiry = now
            yield self.store.expire(now, cfg.retry_window, cfg.expire)
        state, left = yield self.store.check(
            triplet,
            now,
            cfg.delay,
            cfg.retry_window,
            cfg.expire,
            cfg.auto_allowlist,
        )
        if state in ("pass", "allowlisted"):
            self._recent[triplet] = now
            self._recent.move_to_end(triplet)
            while len(self._recent) > RECENT_MAX:
                self._recent.popitem(last=False)
            return CONTINUE
        return Verdict.tempfail(
            451, "4.7.1", f"Greylisted, please try again in {int(left) + 1} seconds", "greylisted"
        )
