"""SMTP: the MX listener (protocol "smtp") and message submission ("submission").

Entry points (service contract): ``build_factory(service, name, listener)``
for both listener kinds, ``delivery.build_router(service)`` for
``service.router``.

Modules:

* ``server.py``: ``SMTPServer``, a subclass of twisted.mail.smtp.ESMTP with
  its own input framing and command set (defects 2-6 of ARCHITECTURE.md are
  fixed there and pinned by tests/smtp/test_stock_defects.py).  Commands run
  one at a time, so pipelined replies keep command order (RFC 2920).
  Extensions: PIPELINING, SIZE, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES,
  STARTTLS, AUTH (mailserv.auth.sasl mechanisms, throttled portal login),
  CHUNKING (BDAT), DSN (NOTIFY/ORCPT/RET/ENVID kept for the queue).
* ``spool.py``: ``DataSink`` scans DATA/BDAT input in bulk (end of data only
  at CRLF.CRLF, dot-unstuffing, bare CR/LF and long-line detection, size and
  header limits); messages up to 128 KiB stay in memory, larger ones are
  written in chunks to ``<state_dir>/spool/incoming`` and removed after.
* ``inbound.py`` / ``submission.py``: the listener policies.  The MX runs the
  ``relay`` and ``recipient`` filters (mailserv/filters/policy.py) before its
  pipeline (``listener.pipeline``, default ``inbound``); submission requires
  AUTH, checks sender ownership (``sender_login_match``), adds Date,
  Message-ID and Sender as RFC 6409 §8 asks; its default pipeline is
  ``outbound``.
* ``delivery.py``: the Router (aliases, catch-alls, +detail, postmaster and
  abuse, local store delivery in the "disk" pool, remote recipients to the
  durable queue, mailserv/queue/spool.py).

The final reply after DATA/BDAT is sent only once every accepted recipient
is durable (delivered with fsync by the store, or fsynced in the queue).
Anything unexpected on the way is a temporary ``451 4.3.0``.  One log event
per transaction (``smtp transaction ...``) carries id, peer, helo, tls, auth
user, sender, recipients, filter verdicts, size, reply and duration.

Limits (LIMITS.md) and where they are set: ``listener.max_message_size``,
``max_recipients``, ``max_messages_per_connection``,
``max_connections_per_ip``, ``idle_timeout`` (300 s; data must also arrive
at 500 bytes/s), ``allow_plaintext_auth``; the rest are the defaults of
``server.ServerSettings`` (command line 2048 / AUTH 12288, DATA line 998,
header 102400, 100 Received headers, MIME depth/parts, 10/20 errors, free disk 1.5 times the size).
MIME nesting (100) and parts (10 000) are checked by ``mime.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet import protocol as tprotocol
from twisted.logger import Logger
from zope.interface import implementer

from mailserv.errors import ConfigError
from mailserv.filters.chain import FilterChain
from mailserv.filters.registry import build_pipeline
from mailserv.interfaces import IReloadable
from mailserv.smtp.inbound import InboundPolicy
from mailserv.smtp.server import SaslAuth, ServerContext, ServerSettings, SMTPServer
from mailserv.smtp.submission import SubmissionPolicy

log = Logger()

__all__ = ["SMTPFactory", "build_context", "build_factory", "clean_spool", "spool_dir"]


def spool_dir(state_dir: str) -> str:
    """Where message data is spooled while it is received."""
    return os.path.join(state_dir, "spool", "incoming")


def clean_spool(path: str, max_age: float = 86_400.0) -> int:
    """Remove spool files left by a crash (older than ``max_age``): their client never
    got a 250, so it still has the message.  Returns how many were removed."""
    import time

    removed = 0
    limit = time.time() - max_age
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_file() and entry.stat().st_mtime < limit:
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue
    return removed


class _Refuse(tprotocol.Protocol):
    """Answer ``421 4.7.0`` and close: too many connections from one address."""

    transport: Any

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname

    def connectionMade(self) -> None:
        self.transport.write(
            f"421 4.7.0 {self.hostname} Error: too many connections from your address\r\n".encode()
        )
        self.transport.loseConnection()


@implementer(IReloadable)
class SMTPFactory(tprotocol.ServerFactory):
    """Builds SMTPServer protocols; counts connections per client IP (LIMITS.md).

    ``reload(config)`` (IReloadable) rebuilds the listener's filter chain from the
    new ``[[pipelines]]``; other listener settings need a restart.
    """

    protocol = SMTPServer  # type: ignore[assignment]

    def __init__(
        self,
        context: ServerContext,
        max_per_ip: int = 50,
        rebuild_chain: Callable[[], FilterChain] | None = None,
    ) -> None:
        self.context = context
        self.rebuild_chain = rebuild_chain
        self.max_per_ip = max_per_ip
        self.per_ip: dict[str, int] = {}
        self.connections: set[SMTPServer] = set()
        context.on_close = self._closed

    def buildProtocol(self, addr: Any) -> tprotocol.Protocol | None:  # type: ignore[override]
        host = str(getattr(addr, "host", addr))
        if self.per_ip.get(host, 0) >= self.max_per_ip:
            return _Refuse(self.context.settings.hostname)
        self.per_ip[host] = self.per_ip.get(host, 0) + 1
        proto = SMTPServer(self.context)
        proto.factory = self
        proto._counted_host = host  # type: ignore[attr-defined]
        self.connections.add(proto)
        return proto

    def reload(self, config: Any) -> None:
        if self.rebuild_chain is None:
            return
        try:
            self.context.chain = self.rebuild_chain()
        except ConfigError as exc:
            log.error("filter pipeline not reloaded: {problems}", problems=str(exc))

    def _closed(self, proto: Any) -> None:
        host = getattr(proto, "_counted_host", None)
        if host is not None and proto in self.connections:
            self.connections.discard(proto)
            left = self.per_ip.get(host, 1) - 1
            if left > 0:
                self.per_ip[host] = left
            else:
                self.per_ip.pop(host, None)


def _auth_for(service: Any, hostname: str) -> SaslAuth | None:
    portal = getattr(service, "portal", None)
    if portal is None:
        return None
    throttle = None
    try:
        from mailserv.auth import throttle_for

        throttle = throttle_for(service)
    except Exception:
        log.failure("no auth throttle")
    return SaslAuth(portal, hostname, throttle)


def _chain_for(service: Any, listener: Any, policy: Any) -> FilterChain:
    """The built-in policy filters, then the listener's configured pipeline."""
    pipeline_name = listener.pipeline or policy.default_pipeline
    builtin = FilterChain(policy.builtin_filters(), service.reactor, "builtin")
    return builtin + build_pipeline(pipeline_name, service, service.reactor)


def build_context(service: Any, name: str, listener: Any) -> ServerContext:
    """The shared context of one listener's connections."""
    config = service.config
    submission = listener.protocol == "submission"
    policy: Any = (
        SubmissionPolicy(service, listener.sender_login_match)
        if submission
        else InboundPolicy(service)
    )
    spool = spool_dir(config.state_dir)
    os.makedirs(spool, exist_ok=True)
    if clean_spool(spool):
        log.info("removed stale spool files from {spool}", spool=spool)
    settings = ServerSettings(
        hostname=config.hostname,
        listener_name=name,
        protocol=listener.protocol,
        tls_mode=listener.tls,
        spool_dir=spool,
        max_message_size=listener.max_message_size,
        max_recipients=listener.max_recipients,
        idle_timeout=listener.idle_timeout or 300.0,
        allow_plaintext_auth=listener.allow_plaintext_auth,
        require_auth=policy.require_auth,
        add_auth_user_to_received=listener.add_auth_user_to_received,
        auth_failure_delay=config.auth.failure_delay,
        max_messages_per_connection=listener.max_messages_per_connection,
    )
    chain = _chain_for(service, listener, policy)
    tls_options = getattr(service, "tls_options", None) if listener.tls == "starttls" else None
    return ServerContext(
        settings=settings,
        reactor=service.reactor,
        router=service.router,
        chain=chain,
        policy=policy,
        # AUTH belongs to submission: on the MX it opens no relaying and only
        # invites password guessing (Postfix smtpd_sasl_auth_enable = no on 25).
        auth=_auth_for(service, config.hostname) if submission else None,
        tls_options=tls_options,
        threads=service.threads,
    )


def build_factory(service: Any, name: str, listener: Any) -> SMTPFactory:
    """The IProtocolFactory of an SMTP or submission listener (service contract)."""
    context = build_context(service, name, listener)
    return SMTPFactory(
        context,
        listener.max_connections_per_ip or 50,
        lambda: _chain_for(service, listener, context.policy),
    )
