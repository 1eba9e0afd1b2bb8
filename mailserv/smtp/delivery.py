"""The router: where each accepted recipient's mail goes, and getting it there durably.

Local domains: aliases (``[aliases]``, with ``@domain`` catch-alls), then the
directory, then ``user+detail`` subaddressing (RFC 5233), then the catch-all;
``postmaster@`` and ``abuse@`` always exist (RFC 5321 §4.5.1, RFC 2142).
Local mail is written by the user's store in the "disk" thread pool with
``Return-Path`` (RFC 5321 §4.4) and ``Delivered-To`` in front.  Remote
recipients (and aliases pointing outside) go to the outbound queue
(mailserv/queue/spool.py).  ``commit`` fires only when every accepted
recipient is durable: delivered or queued.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailserv.address import (
    Address,
    AddressError,
    normalise_domain,
    parse_mailbox,
    split_detail,
)
from mailserv.directory import User
from mailserv.envelope import Envelope, Message, Recipient
from mailserv.errors import SMTPReply, smtp_reply_for
from mailserv.filters.policy import UNKNOWN_USER, local_domains
from mailserv.helper_child import light_message, plain_user
from mailserv.interfaces import IDelivery, IDeliveryTarget, IReloadable
from mailserv.queue import spool as queue_spool
from mailserv.store import deliver_message

log = Logger()

MAX_ALIAS_DEPTH = 10
ALWAYS_PRESENT = ("postmaster", "abuse")


@dataclass(frozen=True)
class LocalTarget:
    """A local mailbox: the user, the folder (None = INBOX) and the address delivered to."""

    user: User
    folder: str | None
    delivered_to: str


@dataclass
class Route:
    """Where one recipient's mail goes: local mailboxes and remote addresses."""

    local: list[LocalTarget] = field(default_factory=list)
    remote: list[Address] = field(default_factory=list)

    def extend(self, other: Route) -> None:
        self.local.extend(other.local)
        self.remote.extend(other.remote)


def postmaster_user(state_dir: str) -> User:
    """The built-in mailbox of postmaster@/abuse@ when nobody else takes them."""
    return User(name="postmaster", mailbox=os.path.join(state_dir, "postmaster", "Maildir"))


@implementer(IDeliveryTarget, IReloadable)
class Router:
    """IDeliveryTarget for every accepted transaction (see module docstring)."""

    def __init__(
        self,
        config: Any,
        directory: Any,
        store_for: Any,
        threads: Any,
        queue_dir: str | None = None,
        reactor: Any = None,
        cache_ttl: float = 5.0,
        cache_size: int = 10_000,
        on_delivered: Any = None,
        helpers: Any = None,
    ) -> None:
        # mailserv.helpers.DeliveryHelpers: deliveries and queue writes run in child
        # processes (None: in the "disk" threads).
        self.helpers = helpers
        # Called on the reactor with (user name, folder) after each local delivery,
        # so that idling IMAP sessions hear of new mail at once (RFC 2177).
        self.on_delivered = on_delivered
        # Positive answers only: a new user must never be refused from a stale cache.
        self._reactor = reactor
        self._cache: OrderedDict[str, tuple[float, Route]] = OrderedDict()
        self.cache_ttl = cache_ttl if reactor is not None else 0.0
        self.cache_size = cache_size
        self.directory = directory
        self.store_for = store_for
        self.threads = threads
        self.queue_dir = queue_dir or os.path.join(config.state_dir, "queue")
        self.reload(config)

    def reload(self, config: Any) -> None:
        """Pick up new domains, aliases and delivery options (SIGHUP)."""
        self.config = config
        self._cache.clear()
        self.domains = local_domains(config)
        self.aliases = _normalise_aliases(getattr(config, "aliases", {}) or {})
        delivery = getattr(config, "delivery", None)
        self.delimiter = getattr(delivery, "recipient_delimiter", "+")
        self.detail_to_folder = getattr(delivery, "detail_to_folder", True)
        self.postmaster = getattr(delivery, "postmaster", None)

    def is_local(self, address: Address) -> bool:
        return address.domain in self.domains

    def resolve(self, address: Address) -> defer.Deferred[Route | None]:
        """Deferred[Route | None]: None means "no such user" (550 5.1.1).

        Routes found are cached for ``cache_ttl`` seconds (unknown users are not).
        """
        key = address.key
        if self.cache_ttl > 0:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > self._reactor.seconds():
                return defer.succeed(Route(list(hit[1].local), list(hit[1].remote)))
        d = defer.ensureDeferred(self._resolve(address, 0, set()))
        if self.cache_ttl > 0:
            d.addCallback(self._remember, key)
        return d

    def _remember(self, route: Route | None, key: str) -> Route | None:
        if route is not None:
            self._cache.pop(key, None)
            expiry = self._reactor.seconds() + self.cache_ttl
            self._cache[key] = (expiry, Route(list(route.local), list(route.remote)))
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return route

    async def _resolve(self, address: Address, depth: int, seen: set[str]) -> Route | None:
        if not self.is_local(address):
            return Route(remote=[address])
        key = address.key
        if key in seen or depth > MAX_ALIAS_DEPTH:
            return Route()  # a loop: this branch delivers nowhere, the others still do
        seen = seen | {key}
        if key in self.aliases:
            return await self._expand(self.aliases[key], depth, seen)
        # user+detail first as user (the directory may strip the detail itself,
        # which would lose the folder), then the whole address.
        base, detail = split_detail(address.local, self.delimiter)
        if detail is not None:
            base_address = Address(base, address.domain, address.unicode_domain)
            route = await self._resolve(base_address, depth + 1, seen)
            if route is not None:
                folder = detail if self.detail_to_folder else None
                route.local = [LocalTarget(t.user, folder, key) for t in route.local]
                return route
        user = await self.directory.lookup(key)
        if user is not None:
            return Route(local=[LocalTarget(user, None, key)])
        catch_all = self.aliases.get(f"@{address.domain}")
        if catch_all:
            return await self._expand(catch_all, depth, seen)
        if address.local.lower() in ALWAYS_PRESENT:
            if self.postmaster:
                route = await self._expand([self.postmaster], depth, seen)
                if route is not None and (route.local or route.remote):
                    return route
            return Route(local=[LocalTarget(postmaster_user(self.config.state_dir), None, key)])
        return None

    async def _expand(self, targets: Iterable[str], depth: int, seen: set[str]) -> Route | None:
        route = Route()
        found = False
        for target in targets:
            try:
                address = parse_mailbox(target)
            except AddressError:
                log.warn("bad alias target {target!r} ignored", target=target)
                continue
            sub = await self._resolve(address, depth + 1, seen)
            if sub is not None:
                found = True
                route.extend(sub)
        return route if found else None

    def start_delivery(self, envelope: Any) -> defer.Deferred[RouterDelivery]:
        return defer.succeed(RouterDelivery(self, envelope))


@implementer(IDelivery)
class RouterDelivery:
    """One transaction through the router."""

    def __init__(self, router: Router, envelope: Envelope) -> None:
        self.router = router
        self.envelope = envelope
        self.recipients: list[Recipient] = []
        self.message: Message | None = None

    def add_recipient(self, recipient: Any) -> defer.Deferred[None]:
        if recipient.route is not None:  # resolved by the recipient filter already
            self.recipients.append(recipient)
            return defer.succeed(None)
        return self.router.resolve(recipient.address).addCallback(self._routed, recipient)

    def _routed(self, route: Route | None, recipient: Any) -> None:
        if route is None:
            raise UNKNOWN_USER
        recipient.route = route
        self.recipients.append(recipient)

    def body(self, message: Any) -> defer.Deferred[None]:
        self.message = message
        return defer.succeed(None)

    def abort(self) -> defer.Deferred[None]:
        self.recipients = []
        self.message = None
        return defer.succeed(None)

    @defer.inlineCallbacks
    def commit(self) -> Any:
        """Deliver locally and queue remote; Deferred[{recipient: SMTPReply | None}].

        A recipient fails only if every target of its route failed in the
        same way; when some recipients succeed, the failed local targets are
        put into the queue (pending or failed) so that the 250 stays true.
        """
        message = self.message
        assert message is not None, "body() before commit()"
        jobs: dict[tuple[str, str | None], LocalTarget] = {}
        remote: dict[str, tuple[Address, Recipient]] = {}
        for rcpt in self.recipients:
            for target in rcpt.route.local:
                jobs.setdefault((target.user.name, target.folder), target)
            for address in rcpt.route.remote:
                remote.setdefault(address.key, (address, rcpt))
        keys = list(jobs)
        results: list[tuple[bool, Any]]
        if len(keys) == 1:  # the usual case: one mailbox, no DeferredList
            try:
                results = [(True, (yield self._deliver_local(jobs[keys[0]])))]
            except Exception:
                results = [(False, Failure())]
        else:
            calls = [self._deliver_local(jobs[k]) for k in keys]
            results = yield defer.DeferredList(calls, consumeErrors=True)
        failed: dict[tuple[str, str | None], SMTPReply] = {}
        for key, (ok, value) in zip(keys, results, strict=True):
            if not ok:
                reply = smtp_reply_for(value.value)
                log.failure("local delivery to {user} failed", value, user=key[0])
                failed[key] = reply
        outcome: dict[Recipient, SMTPReply | None] = {}
        for rcpt in self.recipients:
            replies = [failed.get((t.user.name, t.folder)) for t in rcpt.route.local]
            if replies and all(r is not None for r in replies) and not rcpt.route.remote:
                outcome[rcpt] = replies[0]
            else:
                outcome[rcpt] = None
        some_ok = any(v is None for v in outcome.values())
        queue_rows: list[tuple[str, str | None, Any, str, str | None]] = []
        for address, rcpt in remote.values():
            queue_rows.append((str(address), rcpt.orcpt, rcpt.notify, "pending", None))
        if some_ok:
            # Failed local targets of partly successful transactions: queue them
            # (retry, or a DSN for permanent failures) so that nothing is lost.
            for key, reply in failed.items():
                target = jobs[key]
                status = "pending" if reply.temporary else "failed"
                queue_rows.append(
                    (target.delivered_to, None, None, status, f"{reply.code} {reply.enhanced}")
                )
            outcome = {r: None for r in outcome}
        if queue_rows:
            yield self._enqueue(queue_rows)
        return outcome

    def _prefix(self, target: LocalTarget) -> bytes:
        assert self.message is not None
        sender = self.envelope.sender
        return (
            f"Return-Path: <{sender}>\r\nDelivered-To: {target.delivered_to}\r\n".encode()
            + self.message.prefix
        )

    def _deliver_local(self, target: LocalTarget) -> defer.Deferred[Any]:
        assert self.message is not None
        user = target.user
        store = self.router.store_for(user)
        message = self.message
        prefix = self._prefix(target)
        folder = "Junk" if self.envelope.quarantine else target.folder
        detail_to_folder = self.router.detail_to_folder

        def in_thread() -> str | None:
            return deliver_message(store, user, message, folder, prefix, detail_to_folder)

        def delivered(chosen: str | None) -> None:
            if self.router.on_delivered is not None:
                try:
                    self.router.on_delivered(user.name, chosen or "INBOX")
                except Exception:
                    log.failure("new-mail notification for {user} failed", user=user.name)

        helpers = self.router.helpers
        if helpers is None:
            d = self.router.threads.run("disk", in_thread)
        else:
            args = (plain_user(user), folder, detail_to_folder, prefix, light_message(message))
            d = helpers.run("deliver", args, in_thread, key=user.mailbox)
        return d.addCallback(delivered)

    def _enqueue(self, rows: list[tuple[str, str | None, Any, str, str | None]]) -> Any:
        assert self.message is not None
        env = self.envelope
        entry = queue_spool.QueueEntry(
            id=queue_spool.new_id(),
            sender=env.sender,
            recipients=queue_spool.recipients_of(rows),
            envid=env.envid,
            ret=env.ret,
            smtputf8=env.smtputf8,
            body=env.body,
            requiretls=env.requiretls,
        )
        queue_dir = self.router.queue_dir
        message = self.message

        def in_thread() -> str:
            return queue_spool.enqueue(queue_dir, entry, message.iter_chunks())

        helpers = self.router.helpers
        if helpers is None:
            return self.router.threads.run("disk", in_thread)
        args = (queue_dir, entry, light_message(message))
        return helpers.run("enqueue", args, in_thread)  # any child: see helpers._pick


def _normalise_aliases(aliases: dict[str, list[str]]) -> dict[str, list[str]]:
    """Alias keys in lookup form (lower-case, A-label domains); bad keys are logged and dropped."""
    out: dict[str, list[str]] = {}
    for key, targets in aliases.items():
        try:
            if key.startswith("@"):
                out["@" + normalise_domain(key[1:])[0]] = list(targets)
            else:
                out[parse_mailbox(key).key] = list(targets)
        except AddressError:
            log.warn("bad alias {key!r} ignored", key=key)
    return out


def build_router(service: Any) -> Router:
    """The router of a MailService (contract: ``service.router``)."""
    from mailserv.imap import notify_delivery

    return Router(
        service.config,
        service.directory,
        service.store_for,
        service.threads,
        reactor=service.reactor,
        on_delivered=lambda user, folder: notify_delivery(service, user, folder),
        helpers=service.helpers,
    )
