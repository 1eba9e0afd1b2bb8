"""The one MultiService of a mailserv process, built from a validated Config.

``MailService.from_config(config, reactor)`` builds everything before a port
is bound, so that a bad configuration never starts a half-configured server:
TLS, thread pools, the listeners (each endpoint string becomes a
StreamServerEndpointService; implicit TLS and the PROXY protocol are wrapped
here, not in the protocols).  The portal, directory and router are built on
first use by the protocol factories that need them.

Signals: SIGHUP reloads the certificate and the reloadable sections (auth,
domains, filters) from the file; an invalid file keeps the running config.
SIGTERM (twistd stops the reactor) stops accepting, lets connections in
flight finish up to ``shutdown_timeout``, then closes what is left.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import ILoggingContext, IProtocolFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from mailserv.config import Config, ListenerSection, load_config
from mailserv.errors import ConfigError, ConfigProblem
from mailserv.interfaces import IDrainable, IReloadable
from mailserv.net import make_eager
from mailserv.proxy import TrustedProxyFactory
from mailserv.threads import ThreadPools
from mailserv.tls import ServerTLS, ensure_self_signed

log = Logger()

# protocol name -> module exposing build_factory(service, name, listener)
PROTOCOLS = {
    "smtp": "mailserv.smtp",
    "submission": "mailserv.smtp",
    "imap": "mailserv.imap",
    "pop3": "mailserv.pop3",
    "metrics": "mailserv.metrics",
}


@implementer(IProtocolFactory, IDrainable, ILoggingContext)
class TrackingFactory:
    """Delegates to a factory and keeps the set of its live connections (for drain)."""

    def __init__(self, wrapped: Any, reactor: Any, label: str = "-") -> None:
        self.wrapped = wrapped
        self.reactor = reactor
        self.label = label
        self.accepted = 0  # connections built since start (metrics)
        self.active: set[Any] = set()
        self._drained: list[defer.Deferred[None]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)

    def logPrefix(self) -> str:
        prefix = getattr(self.wrapped, "logPrefix", None)
        return str(prefix()) if prefix is not None else type(self.wrapped).__name__

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr: Any) -> Any:
        protocol = self.wrapped.buildProtocol(addr)
        if protocol is None:
            return None
        self.accepted += 1
        self.active.add(protocol)
        original = protocol.connectionLost

        def connection_lost(reason: Any) -> None:
            self.active.discard(protocol)
            try:
                original(reason)
            finally:
                if not self.active:
                    waiting, self._drained = self._drained, []
                    for d in waiting:
                        d.callback(None)

        protocol.connectionLost = connection_lost
        return protocol

    def drain(self) -> defer.Deferred[None]:
        """Ask every connection to finish (``protocol.drain()`` where defined) and wait."""
        if not self.active:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._drained.append(d)
        for protocol in list(self.active):
            drain = getattr(protocol, "drain", None)
            if drain is not None:
                drain()
            elif protocol.transport is not None:
                protocol.transport.loseConnection()
        return d

    def abort_all(self) -> None:
        for protocol in list(self.active):
            if protocol.transport is not None:
                protocol.transport.abortConnection()


class ListenerService(StreamServerEndpointService):
    """One endpoint of a listener; logs the address it actually bound."""

    _raiseSynchronously = True

    def __init__(self, endpoint: Any, factory: Any, label: str, listener: ListenerSection) -> None:
        super().__init__(endpoint, factory)
        self.label = label
        self.listener = listener
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        assert self._waitingForPort is not None
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        self.port = make_eager(port)
        address = port.getHost()
        host = getattr(address, "host", None)
        where = (
            f"[{host}]:{address.port}"
            if host and ":" in host
            else (
                f"{host}:{address.port}"
                if host is not None
                else str(getattr(address, "name", address))
            )
        )
        log.info(
            "listening {label} protocol={protocol} address={where} tls={tls}",
            label=self.label,
            protocol=self.listener.protocol,
            where=where,
            tls=self.listener.tls,
        )
        return port


class MailService(MultiService):
    """Everything a mailserv process runs."""

    def __init__(self, config: Config, reactor: Any, handle_signals: bool = False) -> None:
        super().__init__()
        # SIGHUP (reload) and SIGTERM (drain, exit 0): for the daemon, not for tests.
        self.handle_signals = handle_signals
        self.reactor = reactor
        self.config = config
        self.threads = ThreadPools(reactor, vars_of(config.threads))
        self.threads.setServiceParent(self)
        self._tls: ServerTLS | None = None
        self.trackers: list[TrackingFactory] = []
        self.listener_services: list[ListenerService] = []
        self._reloadables: list[Any] = []
        self.queue: Any = None  # the QueueService (mailserv.queue.build_queue_service)
        # mailserv.helpers.DeliveryHelpers when deliveries run in child processes, else None
        self.helpers: Any = None
        self.metric_events: Any = None  # mailserv.metrics.EventCounters (metrics listeners)

    # ------------------------------------------------------------------
    # Construction

    @classmethod
    def from_config(cls, config: Config, reactor: Any, handle_signals: bool = False) -> MailService:
        """Build the whole service; raise ConfigError before anything listens."""
        try:
            os.makedirs(config.state_dir, mode=0o750, exist_ok=True)
        except OSError as exc:
            problem = f"cannot create {config.state_dir}: {exc.strerror}"
            raise ConfigError([ConfigProblem(config.source, "state_dir", problem)]) from None
        service = cls(config, reactor, handle_signals)
        service._tls = service._build_tls()
        from mailserv.helpers import build_helpers

        service.helpers = service._reloadable(build_helpers(service))
        if service.helpers is not None:  # started before, stopped after the listeners
            service.helpers.setServiceParent(service)
        problems: list[ConfigProblem] = []
        for name, listener in config.listeners.items():
            try:
                service._add_listener(name, listener)
            except ConfigError as exc:
                problems.extend(exc.problems)
        if problems:
            raise ConfigError(problems)
        # The outbound queue (mailserv/queue/): delivers <state_dir>/queue to remote MXs,
        # in this process or in a child process ([queue] delivery).
        from mailserv.queue import build_delivery

        service.queue = build_delivery(service)
        service.queue.setServiceParent(service)
        return service

    def _build_tls(self) -> ServerTLS:
        tls = self.config.tls
        extra = [(c.cert_file, c.key_file) for c in tls.certificates]
        if tls.cert_file and tls.key_file:
            return ServerTLS(tls.cert_file, tls.key_file, tls.min_version, extra)
        cert, key = ensure_self_signed(
            self.config.state_dir, self.config.hostname, self.config.domains
        )
        return ServerTLS(cert, key, tls.min_version, extra)

    def _add_listener(self, name: str, listener: ListenerSection) -> None:
        module = importlib.import_module(PROTOCOLS[listener.protocol])
        factory: Any = self._reloadable(module.build_factory(self, name, listener))
        tracker = TrackingFactory(factory, self.reactor, name)
        self.trackers.append(tracker)
        outer: Any = tracker
        if listener.tls == "implicit":
            outer = TLSMemoryBIOFactory(self.tls_options(), False, outer)
        if listener.proxy_protocol:
            outer = TrustedProxyFactory(outer, listener.trusted_proxies, self.reactor)
        for i, description in enumerate(listener.endpoints):
            try:
                endpoint = serverFromString(self.reactor, description)
            except (ValueError, TypeError, KeyError) as exc:
                raise ConfigError(
                    [
                        ConfigProblem(
                            self.config.source, f"listeners.{name}.endpoints[{i}]", str(exc)
                        )
                    ]
                ) from None
            svc = ListenerService(endpoint, outer, name, listener)
            svc.setServiceParent(self)
            self.listener_services.append(svc)

    # ------------------------------------------------------------------
    # What the protocols use

    def tls_options(self) -> ServerTLS:
        assert self._tls is not None
        return self._tls

    @functools.cached_property
    def portal(self) -> Any:
        from mailserv.auth import build_portal

        return self._reloadable(build_portal(self))

    @functools.cached_property
    def directory(self) -> Any:
        from mailserv.auth import build_directory

        return self._reloadable(build_directory(self))

    @functools.cached_property
    def router(self) -> Any:
        from mailserv.smtp.delivery import build_router

        return self._reloadable(build_router(self))

    @functools.cached_property
    def dns(self) -> Any:
        """The one DNSResolver of the process (filters, queue); reloaded on SIGHUP."""
        from mailserv.dns import DNSResolver

        return self._reloadable(DNSResolver(self.config.dns, self.threads))

    @functools.cached_property
    def pop_before_smtp(self) -> Any:
        """The IPopBeforeSmtp shared by POP3/IMAP (record) and the MX (allowed); None when off."""
        if self.config.auth.pop_before_smtp <= 0:
            return None
        from mailserv.auth import build_pop_before_smtp

        return build_pop_before_smtp(self)

    def store_for(self, user: Any) -> Any:
        from mailserv.store import store_for

        return store_for(user, self.config.store)

    def _reloadable(self, component: Any) -> Any:
        if IReloadable.providedBy(component):
            self._reloadables.append(component)
        return component

    # ------------------------------------------------------------------
    # Lifecycle

    def tune_process(self) -> None:
        """Process-wide settings, applied when the service owns its process (twistd, .tac)."""
        # Store writes in the disk pool hold a folder's lock across several system calls and
        # take the GIL back after each; with Python's default 5 ms a busy reactor makes each
        # wait up to 5 ms, and every write queued behind the lock with it (bench/imap.py: 957
        # against 864 cmd/s at 0.5 ms, same CPU; no change for SMTP or POP3).
        sys.setswitchinterval(self.config.threads.switch_interval)

    def startService(self) -> None:
        super().startService()
        if not self.handle_signals:
            return
        self.tune_process()
        if self.config.source and os.path.exists(self.config.source):
            install_signal(
                signal.SIGHUP, lambda: self.reactor.callFromThread(self.reload_from_file)
            )
        # SIGTERM is the ordinary way to stop a daemon: drain, then exit 0.  (The reactor's
        # own handler makes twistd re-raise the signal after shutdown, exit status -15.)
        self.reactor.callLater(
            0, install_signal, signal.SIGTERM, lambda: self.reactor.callFromThread(self._terminate)
        )

    def _terminate(self) -> None:
        log.info(
            "SIGTERM: stopping; connections in flight get {timeout}s to finish",
            timeout=self.config.shutdown_timeout,
        )
        if self.reactor.running:
            self.reactor.stop()

    def reload_from_file(self) -> None:
        """SIGHUP: re-read the file; keep running on the old config if it is invalid."""
        try:
            new = load_config(self.config.source)
            self.reload(new)
        except ConfigError as exc:
            log.error(
                "reload refused, keeping the running configuration:\n{problems}",
                problems=str(exc),
            )

    def reload(self, new: Config) -> None:
        """Switch to ``new``: certificate, domains, auth, filters.  Listeners need a restart."""
        if vars_of_listeners(new) != vars_of_listeners(self.config):
            log.warn("listener changes take effect only after a restart")
        if new.delivery.processes != self.config.delivery.processes:
            log.warn("a new [delivery] processes takes effect only after a restart")
        if self._tls is not None:
            self._tls.reload(
                new.tls.cert_file,
                new.tls.key_file,
                [(c.cert_file, c.key_file) for c in new.tls.certificates],
            )
        old_listeners = self.config.listeners
        self.config = new
        self.config.listeners = old_listeners
        for component in self._reloadables:
            component.reload(new)
        log.info("configuration reloaded from {source}", source=new.source)

    def stopService(self) -> defer.Deferred[Any]:
        """Stop accepting, drain connections up to the deadline, then stop the rest."""
        Service.stopService(self)
        listening = [svc for svc in self.listener_services if svc.running]
        d = defer.DeferredList([defer.maybeDeferred(svc.stopService) for svc in listening])

        def drain(_: Any) -> defer.Deferred[Any]:
            draining = defer.DeferredList([t.drain() for t in self.trackers])
            timeout = self.config.shutdown_timeout
            draining.addTimeout(timeout, self.reactor, onTimeoutCancel=self._drain_timed_out)
            return draining

        def stop_rest(_: Any) -> defer.Deferred[Any]:
            rest = [svc for svc in reversed(list(self)) if svc.running]
            return defer.DeferredList([defer.maybeDeferred(svc.stopService) for svc in rest])

        d.addCallback(drain)
        d.addBoth(stop_rest)
        return d

    def _drain_timed_out(self, result: Any, timeout: float) -> None:
        log.warn("connections still open after {timeout}s; closing them", timeout=timeout)
        for tracker in self.trackers:
            tracker.abort_all()


def vars_of(section: Any) -> dict[str, Any]:
    return {key: getattr(section, key) for key in section.keys()}


def vars_of_listeners(config: Config) -> dict[str, dict[str, Any]]:
    return {name: vars_of(listener) for name, listener in config.listeners.items()}


def install_signal(signum: int, handler: Callable[[], None]) -> None:
    """Install a handler when we are in the main thread (never in tests' worker threads)."""
    try:
        signal.signal(signum, lambda *_: handler())
    except ValueError:  # not the main thread
        pass
