"""The outbound queue: durable spool (spool.py, state.py) and its delivery engine.

``build_queue_service(service)`` builds the ``QueueService`` (scheduler.py) of
a MailService: add it as a child service (``.setServiceParent(service)``) and
it delivers everything under ``<state_dir>/queue`` — to remote MXs over the
hardened SMTP client (client.py, deliver.py, mx.py, dane.py, mtasts.py), and
back to the router for local recipients — and sends the DSNs (dsn.py).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from typing import Any


def queue_dir(config: Any) -> str:
    return os.path.join(config.state_dir, "queue")


def own_address_checker(config: Any) -> Callable[[str], bool]:
    """``is_own(ip)``: would connecting to ip:smtp_port reach one of our own SMTP listeners?

    Our addresses are ``[queue] own_addresses`` and the interfaces of the
    listeners of protocol "smtp" on the MX port; a wildcard listener owns
    every loopback address (RFC 5321 §5.1 "loops back to myself").
    """
    own = {ipaddress.ip_address(a) for a in config.queue.own_addresses}
    wildcard = False
    port = config.queue.smtp_port
    for listener in config.listeners.values():
        if listener.protocol != "smtp":
            continue
        for endpoint in listener.endpoints:
            parts = re.split(r"(?<!\\):", endpoint)
            if parts[0] not in ("tcp", "tcp6") or len(parts) < 2:
                continue
            args = [p.replace("\\:", ":") for p in parts[1:]]
            listen_port = args[0].removeprefix("port=")
            if not listen_port.isdigit() or int(listen_port) != port:
                continue
            iface = next((a[10:] for a in args if a.startswith("interface=")), "")
            if iface in ("", "0.0.0.0", "::"):  # noqa: S104 - recognising a wildcard
                wildcard = True
                continue
            try:
                own.add(ipaddress.ip_address(iface))
            except ValueError:
                continue

    def is_own(text: str) -> bool:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            return False
        return address in own or (wildcard and address.is_loopback)

    return is_own


def build_queue_service(service: Any) -> Any:
    """The QueueService of a MailService (``service.config``, ``.threads``, ``.reactor``).

    Local recipients go back to ``service.router`` (looked up when first
    needed, so the router can be built after the queue).  The lead wires it
    into MailService.from_config with ``build_queue_service(s).setServiceParent(s)``.
    """
    from mailserv.filters.common import resolver_for
    from mailserv.queue.dane import ClientTLS
    from mailserv.queue.deliver import Deliverer
    from mailserv.queue.dkimsign import Signer
    from mailserv.queue.mtasts import MTASTSFetcher
    from mailserv.queue.mx import MXResolver
    from mailserv.queue.scheduler import QueueService

    config = service.config
    qconf = config.queue
    resolver = resolver_for(service)
    mx = MXResolver(resolver, own_address_checker(config), qconf.prefer_ipv6)
    mta_sts = (
        MTASTSFetcher(
            resolver,
            service.reactor,
            qconf.tls_ca_file,
            qconf.mta_sts_port,
            cache_dir=os.path.join(config.state_dir, "mta-sts"),
            threads=service.threads,
        )
        if qconf.mta_sts
        else None
    )
    deliverer = Deliverer(
        qconf,
        qconf.helo_name or config.hostname,
        mx,
        service.reactor,
        ClientTLS(qconf.tls_ca_file),
        resolver,
        mta_sts,
    )
    signer = None
    if config.dkim.sign:
        key_dir = os.path.join(config.state_dir, config.dkim.key_dir or "dkim")
        signer = Signer(key_dir)
    return QueueService(
        qconf,
        config.hostname,
        queue_dir(config),
        service.threads,
        service.reactor,
        deliverer,
        router=lambda: service.router,
        signer=signer,
    )


def build_delivery(service: Any) -> Any:
    """What delivers the queue for a MailService, per ``[queue] delivery``.

    "inline": the QueueService itself.  "process": a WorkerMonitor (worker.py)
    running ``python -m mailserv.queue.worker --config FILE``; it needs the
    configuration file, so a configuration without one (the embedded default of
    ``twistd mailserv`` without ``--config``) delivers inline, with a warning.
    """
    config = service.config
    if config.queue.delivery == "process":
        if config.source and os.path.isfile(config.source):
            from mailserv.queue.worker import WorkerMonitor

            return service._reloadable(WorkerMonitor(config, service.reactor))
        from twisted.logger import Logger

        Logger().warn('queue delivery = "process" needs a configuration file; delivering inline')
    return build_queue_service(service)
