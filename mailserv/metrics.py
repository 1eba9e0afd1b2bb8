"""Prometheus metrics on a ``protocol = "metrics"`` listener (``GET /metrics``).

What is exported, all with the ``mailserv_`` prefix and bounded labels (listener and pool names
from the configuration, reply classes, delivery states; never an address, a user or a peer):

* connections: accepted (counter) and open (gauge) per listener, from the service's
  ``TrackingFactory``;
* SMTP transactions per listener and reply class (2xx/4xx/5xx) and the bytes accepted, outbound
  delivery attempts per outcome (sent/deferred/failed): counted from the structured log events
  each transaction and each delivery attempt already emits, so the figures are exactly what the
  log says;
* the outbound queue: messages queued, held, and in delivery now; with ``[queue] delivery =
  "process"`` the figures the worker reports every second, whether it runs
  (``mailserv_queue_worker_up``) and its CPU and memory (``mailserv_queue_worker_process_*``);
  its delivery events reach this process's log, where they are counted as inline;
* thread pools: size, busy workers, queued jobs;
* TLS: the expiry time of every configured certificate (alert before it lapses);
* the process (CPU, memory, file descriptors) from prometheus-client's process collector.

The collector reads the service's in-memory state at scrape time: a scrape costs no I/O. Clients
outside ``allow_from`` (loopback when empty) get 403: the figures are operational information.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.web import resource, server
from zope.interface import implementer

from mailserv import __version__
from mailserv.queue.worker import POOL, WorkerMonitor

_LOOPBACK = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]


@implementer(ILogObserver)
class EventCounters:
    """A log observer counting the transaction and delivery events (cheap: no formatting)."""

    def __init__(self) -> None:
        self.smtp: Counter[tuple[str, str]] = Counter()
        self.smtp_bytes: Counter[str] = Counter()
        self.deliveries: Counter[str] = Counter()

    def __call__(self, event: dict[str, Any]) -> None:
        fmt = event.get("log_format")
        if not isinstance(fmt, str):
            return
        if fmt.startswith("smtp transaction "):
            listener = str(event.get("listener") or "-")
            reply = str(event.get("reply") or "")
            klass = f"{reply[:1]}xx" if reply[:1] in ("2", "4", "5") else "other"
            self.smtp[(listener, klass)] += 1
            size = event.get("size")
            if klass == "2xx" and isinstance(size, int):
                self.smtp_bytes[listener] += size
        elif fmt.startswith("queue {id} to=") and "status" in event:
            status = str(event["status"])
            self.deliveries[status if status in ("sent", "deferred", "failed") else "other"] += 1


class ServiceCollector:
    """Reads a MailService's state at scrape time."""

    def __init__(self, service: Any, events: EventCounters) -> None:
        self.service = service
        self.events = events

    def collect(self) -> Iterator[Metric]:
        service = self.service
        info = GaugeMetricFamily("mailserv_build_info", "mailserv version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info

        accepted = CounterMetricFamily(
            "mailserv_connections", "Connections accepted", labels=["listener"]
        )
        active = GaugeMetricFamily(
            "mailserv_connections_open", "Connections open now", labels=["listener"]
        )
        for tracker in service.trackers:
            label = getattr(tracker, "label", "-")
            accepted.add_metric([label], tracker.accepted)
            active.add_metric([label], len(tracker.active))
        yield accepted
        yield active

        smtp = CounterMetricFamily(
            "mailserv_smtp_transactions",
            "SMTP transactions by listener and final reply class",
            labels=["listener", "reply"],
        )
        for (listener, klass), count in sorted(self.events.smtp.items()):
            smtp.add_metric([listener, klass], count)
        yield smtp
        smtp_bytes = CounterMetricFamily(
            "mailserv_smtp_accepted_bytes", "Message bytes accepted", labels=["listener"]
        )
        for listener, count in sorted(self.events.smtp_bytes.items()):
            smtp_bytes.add_metric([listener], count)
        yield smtp_bytes
        deliveries = CounterMetricFamily(
            "mailserv_queue_delivery_attempts",
            "Outbound delivery attempts per recipient by outcome",
            labels=["status"],
        )
        for status, count in sorted(self.events.deliveries.items()):
            deliveries.add_metric([status], count)
        yield deliveries

        # The QueueService's own figures, or with [queue] delivery = "process" those the
        # worker last reported to its monitor (none while no worker runs).
        queue = service.queue
        counts = queue.gauges() if queue is not None else None
        if counts is not None:
            messages = GaugeMetricFamily(
                "mailserv_queue_messages", "Messages in the outbound queue", labels=["state"]
            )
            for state in ("held", "delivering", "waiting"):
                messages.add_metric([state], counts.get(state, 0))
            yield messages
        if isinstance(queue, WorkerMonitor):
            yield GaugeMetricFamily(
                "mailserv_queue_worker_up",
                "1 while the delivery process runs",
                value=1 if queue.pid is not None else 0,
            )

        helpers = service.helpers  # mailserv.helpers.DeliveryHelpers, when deliveries use them
        if helpers is not None:
            yield GaugeMetricFamily(
                "mailserv_delivery_helpers_up",
                "Delivery helper processes running",
                value=helpers.running_children(),
            )
            yield GaugeMetricFamily(
                "mailserv_delivery_helper_jobs",
                "Deliveries and queue writes sent to the helpers and not yet answered",
                value=helpers.jobs_in_flight(),
            )
            yield CounterMetricFamily(
                "mailserv_delivery_helper_restarts",
                "Delivery helpers started again after one died or was killed",
                value=helpers.restarts,
            )

        size = GaugeMetricFamily("mailserv_thread_pool_size", "Threads allowed", labels=["pool"])
        busy = GaugeMetricFamily("mailserv_thread_pool_busy", "Threads working", labels=["pool"])
        queued = GaugeMetricFamily(
            "mailserv_thread_pool_queued", "Jobs waiting for a thread", labels=["pool"]
        )
        for name, pool in sorted(service.threads.pools().items()):
            size.add_metric([name], pool.max)
            busy.add_metric([name], len(pool.working))
            queued.add_metric([name], pool.q.qsize())
        # The delivery process's pools, as it last reported them ("queue-worker/disk", ...).
        families = {"size": size, "busy": busy, "queued": queued}
        reported = counts if isinstance(queue, WorkerMonitor) and counts else {}
        for key, value in sorted(reported.items()):
            pool_name, _, figure = key.removeprefix(POOL).rpartition(".")
            if key.startswith(POOL) and figure in families:
                families[figure].add_metric([f"queue-worker/{pool_name}"], value)
        yield size
        yield busy
        yield queued

        expiry = GaugeMetricFamily(
            "mailserv_tls_certificate_expiry_seconds",
            "notAfter of each configured certificate (Unix time)",
            labels=["certificate"],
        )
        for name, not_after in service.tls_options().expiries():
            expiry.add_metric([name], not_after)
        yield expiry


class MetricsResource(resource.Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry, allow_from: list[Any]) -> None:
        super().__init__()
        self.registry = registry
        self.allow_from = allow_from or _LOOPBACK

    def _allowed(self, request: Any) -> bool:
        try:
            address = ipaddress.ip_address(request.getClientAddress().host)
        except (AttributeError, ValueError):
            return False
        mapped = getattr(address, "ipv4_mapped", None)
        if mapped is not None:
            address = mapped
        return any(address in net for net in self.allow_from if net.version == address.version)

    def render_GET(self, request: Any) -> bytes:
        if not self._allowed(request):
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"forbidden: this address is not in the listener's allow_from\n"
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return generate_latest(self.registry)

    def render_HEAD(self, request: Any) -> bytes:
        return self.render_GET(request)


class _QuietSite(server.Site):
    """No access log: a scrape every few seconds would drown the mail log."""

    def log(self, request: Any) -> None:
        pass


def _worker_pid(service: Any) -> int | str:
    queue = service.queue  # built after the listeners: looked up at scrape time
    pid = queue.pid if isinstance(queue, WorkerMonitor) else None
    return pid if pid is not None else "-"


def build_factory(service: Any, name: str, listener: Any) -> server.Site:
    """The HTTP factory of a metrics listener: ``/metrics``, everything else 404."""
    events = service.metric_events  # one observer for every metrics listener
    if events is None:
        events = service.metric_events = EventCounters()
        globalLogPublisher.addObserver(events)
        service.reactor.addSystemEventTrigger(
            "after", "shutdown", globalLogPublisher.removeObserver, events
        )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(service, events))
    ProcessCollector(registry=registry)
    # /proc/<pid> of the running delivery process; nothing while none runs, or inline.
    ProcessCollector(
        namespace="mailserv_queue_worker", pid=lambda: _worker_pid(service), registry=registry
    )
    root = resource.Resource()
    root.putChild(b"metrics", MetricsResource(registry, listener.allow_from))
    site = _QuietSite(root)
    site.displayTracebacks = False
    return site
