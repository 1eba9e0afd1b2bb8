"""SQL backend (twisted.enterprise.adbapi): SQLite (default), PostgreSQL, MySQL/MariaDB.

Queries are configurable and take *bound* parameters only: a query names
them as ``:user``, ``:localpart`` and ``:domain``, which are turned into the
driver's placeholders (``?``-free named style for sqlite3, ``%(user)s`` for
psycopg and PyMySQL).  Values are never formatted into the SQL text.

The default schema (``SCHEMA``, created by ``mailserv user add`` when
missing) is ``users(username, password, home, mailbox, quota_bytes,
active)`` and ``aliases(address, username)``.  Stored passwords use the
``{SCHEME}`` notation of schemes.py; a value without a prefix has the
backend's ``default_scheme``, which also decides whether challenge
mechanisms (CRAM-MD5, APOP, SCRAM) can be advertised: only with PLAIN/CLEAR.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.logger import Logger

from mailserv.auth import schemes
from mailserv.auth.backend import Backend
from mailserv.directory import User
from mailserv.directory.lookup import make_user, split_address
from mailserv.errors import TemporaryFailure

log = Logger()

DEFAULT_PASSWORD_QUERY = (
    "SELECT username, password FROM users WHERE username = :user AND active = 1"  # noqa: S105
)
DEFAULT_USER_QUERY = (
    "SELECT username, home, mailbox, quota_bytes FROM users WHERE username = :user AND active = 1"
    " UNION ALL SELECT u.username, u.home, u.mailbox, u.quota_bytes FROM aliases a"
    " JOIN users u ON u.username = a.username WHERE a.address = :user AND u.active = 1"
)
DEFAULT_ALIASES_QUERY = "SELECT address FROM aliases WHERE username = :user"

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS users ("
    " username VARCHAR(255) PRIMARY KEY,"
    " password VARCHAR(1024) NOT NULL,"
    " home VARCHAR(1024),"
    " mailbox VARCHAR(1024),"
    " quota_bytes BIGINT,"
    " active SMALLINT NOT NULL DEFAULT 1)",
    "CREATE TABLE IF NOT EXISTS aliases ("
    " address VARCHAR(255) PRIMARY KEY,"
    " username VARCHAR(255) NOT NULL)",
)

_PARAM = re.compile(r"(?<![:\w]):([a-z_]+)\b")
_DRIVERS = {"sqlite": "sqlite3", "postgresql": "psycopg", "mysql": "pymysql"}


def translate(query: str, driver: str) -> str:
    """Turn ``:name`` parameters into the driver's placeholders (the values stay bound)."""
    if driver == "sqlite":
        return query
    return _PARAM.sub(r"%(\1)s", query.replace("%", "%%"))


def connection_args(section: Any, password: str | None) -> tuple[str, dict[str, Any]]:
    """The DB-API module and connect() keywords of an [auth.backend.X] sql table."""
    module = _DRIVERS[section.driver]
    timeout = max(1, int(section.timeout))
    if section.driver == "sqlite":
        return module, {
            "database": section.database,
            "timeout": section.timeout,
            "check_same_thread": False,
        }
    kwargs: dict[str, Any] = {
        "host": section.host,
        "user": section.user or None,
        "connect_timeout": timeout,
    }
    if password:
        kwargs["password"] = password
    if section.driver == "postgresql":
        kwargs.update(
            dbname=section.database,
            port=section.port or 5432,
            options=f"-c statement_timeout={timeout * 1000}",
        )
    else:
        kwargs.update(
            database=section.database,
            port=section.port or 3306,
            read_timeout=timeout,
            write_timeout=timeout,
            charset="utf8mb4",
        )
    return module, kwargs


def read_secret_file(path: str | None) -> str | None:
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def sqlite_state_pool(path: str, reactor: Any, setup: Any = None) -> adbapi.ConnectionPool:
    """A one-connection adbapi pool on a SQLite state file in state_dir (greylist,
    POP-before-SMTP); ``setup(conn)`` runs on the connection when it opens."""
    return adbapi.ConnectionPool(
        "sqlite3",
        path,
        timeout=5.0,
        check_same_thread=False,
        cp_min=1,
        cp_max=1,
        cp_noisy=False,
        cp_reactor=reactor,
        cp_openfun=setup,
    )


def connection_pool(section: Any, reactor: Any) -> adbapi.ConnectionPool:
    """A bounded adbapi pool for the section (its own threads, at most pool_size)."""
    module, kwargs = connection_args(section, read_secret_file(section.password_file))
    return adbapi.ConnectionPool(
        module,
        cp_min=1,
        cp_max=section.pool_size,
        cp_reconnect=True,
        cp_noisy=False,
        cp_reactor=reactor,
        **kwargs,
    )


class SQLBackend(Backend):
    """Checker and directory over a SQL database."""

    type_name = "sql"

    def __init__(self, name: str, section: Any, config: Any, reactor: Any, threads: Any) -> None:
        super().__init__(name, section, config, reactor, threads)
        self.timeout = section.timeout
        self.driver = section.driver
        self.pool = connection_pool(section, reactor)
        q = self._query
        self.password_query = q(section.password_query or DEFAULT_PASSWORD_QUERY)
        self.user_query = q(section.user_query or DEFAULT_USER_QUERY)
        self.aliases_query = q(getattr(section, "aliases_query", None) or DEFAULT_ALIASES_QUERY)
        self.default_scheme = section.default_scheme

    def _query(self, text: str) -> str:
        return translate(text, self.driver)

    def _params(self, key: str) -> dict[str, str]:
        local, domain = split_address(key)
        return {"user": key, "localpart": local, "domain": domain}

    def _select(self, query: str, key: str) -> defer.Deferred[list[dict[str, Any]]]:
        """Run ``query`` with bound parameters; rows as dicts; errors become TemporaryFailure."""

        def interaction(txn: Any) -> list[dict[str, Any]]:
            txn.execute(query, self._params(key))
            names = [d[0].lower() for d in txn.description or ()]
            return [dict(zip(names, row, strict=False)) for row in txn.fetchall()]

        d = self.pool.runInteraction(interaction)

        def failed(failure: Any) -> None:
            log.warn(
                "auth backend {name} unavailable: {error}",
                name=self.name,
                error=failure.getErrorMessage()[:200],
            )
            raise TemporaryFailure(f"SQL backend {self.name} unavailable")

        d.addErrback(failed)
        return d

    def _password_row(self, username: str) -> defer.Deferred[tuple[str, str] | None]:
        def first(rows: list[dict[str, Any]]) -> tuple[str, str] | None:
            for row in rows:
                values = list(row.values())
                name, stored = str(values[0]).lower(), values[1]
                if stored:
                    return name, str(stored)
            return None

        return self._select(self.password_query, username).addCallback(first)

    def verify_password(self, username: str, password: bytes) -> defer.Deferred[str | None]:
        def check(found: tuple[str, str] | None) -> Any:
            if found is None:
                return None
            name, stored = found

            def ok(matches: bool) -> str | None:
                return name if matches else None

            return self.threads.run(
                "crypto", schemes.verify, stored, password, self.default_scheme
            ).addCallback(ok)

        return self._password_row(username).addCallback(check)

    def secret(self, username: str) -> defer.Deferred[tuple[str, str] | None]:
        def prefixed(found: tuple[str, str] | None) -> tuple[str, str] | None:
            if found is None:
                return None
            scheme, data = schemes.split(found[1], self.default_scheme)
            return found[0], f"{{{scheme}}}{data}"

        return self._password_row(username).addCallback(prefixed)

    def secret_kinds(self) -> frozenset[str]:
        return schemes.secret_kinds("x", self.default_scheme)

    @defer.inlineCallbacks
    def find(self, key: str) -> Any:
        rows = yield self._select(self.user_query, key.lower())
        if not rows:
            return None
        row = rows[0]
        name = str(row.get("username") or next(iter(row.values()))).lower()
        aliases = yield self._select(self.aliases_query, name)
        quota = row.get("quota_bytes")
        user: User = make_user(
            self.config,
            self.section,
            name,
            home=row.get("home") or None,
            mailbox=row.get("mailbox") or None,
            addresses=[str(next(iter(a.values()))) for a in aliases],
            quota_bytes=int(quota) if quota is not None else None,
        )
        return user

    def close(self) -> defer.Deferred[None]:
        self.pool.close()
        return defer.succeed(None)
