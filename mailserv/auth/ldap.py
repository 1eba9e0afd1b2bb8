"""LDAP backend on ldap3: users, their addresses and aliases come from the directory.

Two modes:

- search then bind: a service account (``bind_dn``, ``bind_password_file``)
  searches ``base_dn`` with ``user_filter``, the username escaped per
  RFC 4515 §3; exactly one entry must match; then a fresh connection binds as
  that entry's DN with the user's password (RFC 4513 §5.1.3).
- direct bind: ``bind_dn_template`` (``uid={user},ou=people,dc=example,dc=org``)
  with the username escaped per RFC 4514 §2.4.

The servers of ``urls`` are tried in order (failover), each with the
``timeout`` for connecting and for every response; ``ldaps://`` and
``start_tls`` check the server certificate (``ca_file`` or the system
store).  Everything runs in the ``auth`` thread pool; service connections
are kept in a bounded pool of ``pool_size``.  A server that is down, slow or
answers with an unexpected error is a TemporaryFailure; only
invalidCredentials (49) means a wrong password.
"""

from __future__ import annotations

import math
import queue
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ldap3 import BASE, NONE, SIMPLE, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException
from ldap3.core.results import RESULT_INVALID_CREDENTIALS, RESULT_SUCCESS
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn
from twisted.internet import defer
from twisted.logger import Logger

from mailserv.auth.backend import Backend
from mailserv.auth.sql import read_secret_file
from mailserv.directory import User
from mailserv.directory.lookup import make_user
from mailserv.errors import TemporaryFailure

log = Logger()


class _Unavailable(Exception):
    """No server of the list answered properly."""


def user_filter(template: str, username: str) -> str:
    """The search filter for ``username``, escaped per RFC 4515 §3."""
    return template.replace("{user}", escape_filter_chars(username))


def user_dn(template: str, username: str) -> str:
    """The DN of ``username`` from a template, escaped per RFC 4514 §2.4."""
    return template.replace("{user}", escape_rdn(username))


class LDAPBackend(Backend):
    """Checker and directory over an LDAP server (OpenLDAP, 389-ds, Active Directory)."""

    type_name = "ldap"

    def __init__(self, name: str, section: Any, config: Any, reactor: Any, threads: Any) -> None:
        super().__init__(name, section, config, reactor, threads)
        # Each server of the list gets ``timeout`` before the next one is tried.
        self.timeout = section.timeout * len(section.urls) + 1.0
        # ldap3 packs timeouts into socket options as whole seconds.
        self._seconds = max(1, math.ceil(section.timeout))
        self.bind_password = read_secret_file(section.bind_password_file)
        tls = None
        if section.start_tls or any(u.lower().startswith("ldaps://") for u in section.urls):
            tls = Tls(
                validate=ssl.CERT_REQUIRED,
                ca_certs_file=section.ca_file,
                version=ssl.PROTOCOL_TLS_CLIENT,
            )
        self.servers = [
            Server(url, connect_timeout=self._seconds, tls=tls, get_info=NONE)
            for url in section.urls
        ]
        self._preferred = 0
        self.address_filter = getattr(section, "address_filter", None) or (
            f"(&(objectClass=inetOrgPerson)(|({section.mail_attribute}={{user}})"
            f"({section.alias_attribute}={{user}})))"
        )
        self._pool: queue.LifoQueue[Connection] = queue.LifoQueue(maxsize=section.pool_size)
        self._bind_pool: queue.LifoQueue[Connection] = queue.LifoQueue(maxsize=section.pool_size)
        self.attributes = [
            a
            for a in (
                section.mail_attribute,
                section.alias_attribute,
                section.quota_attribute,
                section.mailbox_attribute,
                "uid",
            )
            if a
        ]

    # -- connections (all blocking; called in the auth pool) -----------------

    def _connect(self, dn: str | None, password: str | None) -> Connection:
        """A bound connection to the first server that answers; _Unavailable if none does."""
        order = self.servers[self._preferred :] + self.servers[: self._preferred]
        last_error = "no servers"
        for server in order:
            conn = Connection(
                server,
                user=dn,
                password=password,
                authentication=SIMPLE if dn else "ANONYMOUS",
                receive_timeout=self._seconds,
                read_only=True,
                raise_exceptions=False,
            )
            try:
                conn.open()
                if self.section.start_tls and not server.ssl:
                    conn.start_tls()
                conn.bind()
            except LDAPException as exc:
                last_error = f"{server.host}: {type(exc).__name__}"
                conn.unbind()
                continue
            self._preferred = self.servers.index(server)
            result = conn.result or {}
            if result.get("result") == RESULT_SUCCESS:
                return conn
            conn.unbind()
            if result.get("result") == RESULT_INVALID_CREDENTIALS:
                raise PermissionError("invalid credentials")
            last_error = f"{server.host}: bind result {result.get('description')}"
        raise _Unavailable(last_error)

    @contextmanager
    def _service_connection(self) -> Iterator[Connection]:
        try:
            conn = self._pool.get_nowait()
        except queue.Empty:
            try:
                conn = self._connect(self.section.bind_dn, self.bind_password)
            except PermissionError:
                raise _Unavailable("the service account cannot bind") from None
        try:
            yield conn
        except BaseException:
            conn.unbind()
            raise
        try:
            self._pool.put_nowait(conn)
        except queue.Full:
            conn.unbind()

    def _search(self, username: str, template: str | None = None) -> list[dict[str, Any]]:
        """Entries matching the user filter (at most 2: more than one is ambiguous)."""
        flt = user_filter(template or self.section.user_filter, username)
        with self._service_connection() as conn:
            try:
                ok = conn.search(
                    self.section.base_dn,
                    flt,
                    SUBTREE,
                    attributes=self.attributes,
                    size_limit=2,
                    time_limit=self._seconds,
                )
            except LDAPException as exc:
                raise _Unavailable(type(exc).__name__) from None
            code = (conn.result or {}).get("result")
            # 4 sizeLimitExceeded (ambiguous, handled below), 32 noSuchObject
            if not ok and code not in (RESULT_SUCCESS, 4, 32):
                raise _Unavailable(f"search failed: {(conn.result or {}).get('description')}")
            return [
                {"dn": e["dn"], **{k.lower(): v for k, v in e["attributes"].items()}}
                for e in conn.response or []
                if e.get("type") == "searchResEntry"
            ]

    def _read_entry(self, conn: Connection, dn: str) -> dict[str, Any] | None:
        if not conn.search(dn, "(objectClass=*)", BASE, attributes=self.attributes):
            return None
        for e in conn.response or []:
            if e.get("type") == "searchResEntry":
                return {"dn": e["dn"], **{k.lower(): v for k, v in e["attributes"].items()}}
        return None

    def _first(self, entry: dict[str, Any], attribute: str | None) -> str | None:
        if not attribute:
            return None
        value = entry.get(attribute.lower())
        if isinstance(value, list):
            value = value[0] if value else None
        return str(value) if value not in (None, "") else None

    def _canonical(self, entry: dict[str, Any], fallback: str) -> str:
        return (self._first(entry, self.section.mail_attribute) or fallback).lower()

    @contextmanager
    def _bound_as(self, dn: str, secret: str) -> Iterator[Connection]:
        """A connection bound as ``dn`` (PermissionError for invalidCredentials).

        Connections for user binds are kept in their own pool and rebound
        (RFC 4511 §4.2 allows binding again on the same connection); they are
        never used for the service account's searches.
        """
        conn: Connection | None = None
        try:
            conn = self._bind_pool.get_nowait()
        except queue.Empty:
            pass
        if conn is not None:
            try:
                ok = conn.rebind(user=dn, password=secret)
            except LDAPException:
                ok = None
            code = (conn.result or {}).get("result")
            if not ok and code == RESULT_INVALID_CREDENTIALS:
                self._release(conn)
                raise PermissionError("invalid credentials")
            if not ok:
                conn.unbind()
                conn = None
        if conn is None:
            conn = self._connect(dn, secret)
        try:
            yield conn
        except BaseException:
            conn.unbind()
            raise
        self._release(conn)

    def _release(self, conn: Connection) -> None:
        try:
            self._bind_pool.put_nowait(conn)
        except queue.Full:
            conn.unbind()

    def _verify(self, username: str, password: bytes) -> str | None:
        try:
            secret = password.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if not secret:
            return None  # an empty password is an anonymous bind (RFC 4513 §5.1.2)
        try:
            if self.section.bind_dn_template:
                dn = user_dn(self.section.bind_dn_template, username)
                with self._bound_as(dn, secret) as conn:
                    entry = self._read_entry(conn, dn) or {}
                return self._canonical(entry, username)
            entries = self._search(username)
            if len(entries) != 1:
                return None
            with self._bound_as(entries[0]["dn"], secret):
                pass
            return self._canonical(entries[0], username)
        except PermissionError:
            return None

    def _find(self, key: str) -> User | None:
        entries = self._search(key, self.address_filter)
        if len(entries) != 1:
            return None
        entry = entries[0]
        name = self._canonical(entry, key)
        aliases = entry.get(self.section.alias_attribute.lower()) or []
        if isinstance(aliases, str):
            aliases = [aliases]
        quota = self._first(entry, self.section.quota_attribute)
        return make_user(
            self.config,
            self.section,
            name,
            mailbox=self._first(entry, self.section.mailbox_attribute),
            addresses=[str(a) for a in aliases],
            quota_bytes=int(quota) if quota and quota.isdigit() else None,
            extra={"dn": entry["dn"]},
        )

    # -- the Backend API --------------------------------------------------------

    def _run(self, fn: Any, *args: Any) -> defer.Deferred[Any]:
        def unavailable(failure: Any) -> None:
            failure.trap(_Unavailable, LDAPException, OSError)
            log.warn(
                "auth backend {name} unavailable: {error}",
                name=self.name,
                error=failure.getErrorMessage()[:200],
            )
            raise TemporaryFailure(f"LDAP backend {self.name} unavailable")

        return self.threads.run("auth", fn, *args).addErrback(unavailable)

    def verify_password(self, username: str, password: bytes) -> defer.Deferred[str | None]:
        return self._run(self._verify, username, password)

    def find(self, key: str) -> defer.Deferred[User | None]:
        return self._run(self._find, key.lower())

    def close(self) -> defer.Deferred[None]:
        for pool in (self._pool, self._bind_pool):
            while True:
                try:
                    pool.get_nowait().unbind()
                except queue.Empty:
                    break
        return defer.succeed(None)
