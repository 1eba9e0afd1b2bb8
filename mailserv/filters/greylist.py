"""Greylisting (RFC 6647): temporarily refuse unknown (client net, sender, recipient) triplets.

A triplet seen for the first time gets ``451 4.7.1``; a retry after
``delay`` (default 5 minutes) and within ``retry_window`` passes and is
remembered for ``expire`` (35 days, postgrey's default).  A client network
whose mail passed ``auto_allowlist`` times is allowlisted (RFC 6647 §4.2.1:
senders that retry properly are not delayed again).  Clients are grouped by
/24 (IPv4) or /64 (IPv6) since large senders retry from other addresses.

State lives in SQLite (``state_dir/filters/greylist.sqlite`` by default,
``database = "path"`` to share it between processes of one host); every
query runs in the ``disk`` thread pool.
"""

from __future__ import annotations

import ipaddress
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

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
from mailserv.filters.common import load_options, state_path
from mailserv.interfaces import IRecipientFilter

RECENT = 3600.0
RECENT_MAX = 10_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS triplets (
    client TEXT NOT NULL, sender TEXT NOT NULL, recipient TEXT NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, passed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (client, sender, recipient));
CREATE TABLE IF NOT EXISTS clients (
    client TEXT PRIMARY KEY, passes INTEGER NOT NULL, last_seen REAL NOT NULL);
"""


def client_network(address: str, v4_prefix: int = 24, v6_prefix: int = 64) -> str:
    """The network a client address is greylisted as (/24 or /64 by default)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = v4_prefix if ip.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


class GreylistStore:
    """The SQLite state; methods are blocking (call them in the disk pool)."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            # WAL + NORMAL: no fsync per commit (a lost triplet only means one more retry).
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)

    def check(
        self,
        triplet: tuple[str, str, str],
        now: float,
        delay: float,
        retry_window: float,
        expire: float,
        auto_allowlist: int,
    ) -> tuple[str, float]:
        """("pass" | "allowlisted" | "new" | "early", seconds left) and record the attempt."""
        client = triplet[0]
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(
                    "SELECT passes, last_seen FROM clients WHERE client = ?", (client,)
                ).fetchone()
                if auto_allowlist and row and row[0] >= auto_allowlist and now - row[1] < expire:
                    db.execute("UPDATE clients SET last_seen = ? WHERE client = ?", (now, client))
                    db.execute("COMMIT")
                    return "allowlisted", 0.0
                row = db.execute(
                    "SELECT first_seen, last_seen, passed FROM triplets"
                    " WHERE client = ? AND sender = ? AND recipient = ?",
                    triplet,
                ).fetchone()
                state, left = self._decide(row, now, delay, retry_window, expire)
                if state == "new":
                    db.execute(
                        "INSERT OR REPLACE INTO triplets VALUES (?, ?, ?, ?, ?, 0)",
                        (*triplet, now, now),
                    )
                elif state == "early":
                    db.execute(
                        "UPDATE triplets SET last_seen = ?"
                        " WHERE client = ? AND sender = ? AND recipient = ?",
                        (now, *triplet),
                    )
                else:
                    first_pass = row is not None and not row[2]
                    db.execute(
                        "UPDATE triplets SET last_seen = ?, passed = passed + 1"
                        " WHERE client = ? AND sender = ? AND recipient = ?",
                        (now, *triplet),
                    )
                    if first_pass:
                        db.execute(
                            "INSERT INTO clients VALUES (?, 1, ?) ON CONFLICT(client)"
                            " DO UPDATE SET passes = passes + 1, last_seen = excluded.last_seen",
                            (client, now),
                        )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return state, left

    @staticmethod
    def _decide(
        row: Any, now: float, delay: float, retry_window: float, expire: float
    ) -> tuple[str, float]:
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

    def expire(self, now: float, retry_window: float, expire: float) -> int:
        """Forget stale triplets and clients; returns the number of rows removed."""
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM triplets WHERE (passed = 0 AND first_seen < ?) OR last_seen < ?",
                (now - retry_window, now - expire),
            )
            removed = cur.rowcount
            cur = self._db.execute("DELETE FROM clients WHERE last_seen < ?", (now - expire,))
            return removed + cur.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()


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
        path = self.config.database or state_path(service, "greylist.sqlite")
        self.store = GreylistStore(path)
        self.threads = service.threads
        self._last_expiry = 0.0
        # Triplets that passed recently: answered without a database round trip
        # (their last_seen is refreshed at most every RECENT seconds).
        self._recent: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    def _skip(self, session: Any) -> bool:
        if self.config.skip_authenticated and session.auth_user is not None:
            return True
        try:
            ip = ipaddress.ip_address(session.peer_host)
        except ValueError:
            return True
        return any(ip in net for net in self.config.allowlist)

    @defer.inlineCallbacks
    def check_recipient(self, session: Any, envelope: Any, rcpt: Any) -> Any:
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
        if now - self._last_expiry > 3600:
            self._last_expiry = now
            yield self.threads.run("disk", self.store.expire, now, cfg.retry_window, cfg.expire)
        state, left = yield self.threads.run(
            "disk",
            self.store.check,
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
