"""Delivery of one message's recipients for one domain: MX, TLS policy, connections.

``Deliverer.deliver(domain, item, indices, chunks)`` returns an ``Outcome``
per recipient.  It first reuses an idle connection to the domain, then walks
the MX hosts (mx.py) in order, every address of a host, until no recipient
is left with a temporary result: every MX is tried before deferring.  At most
``destination_concurrency`` connections per domain are open at once (LIMITS.md
qmail concurrencyremote); a connection that finished a transaction waits
``connection_reuse_time`` for the next message to the same domain.

TLS per MX host (``plan``): DANE when the MX and TLSA lookups are DNSSEC
validated (RFC 7672), else MTA-STS "enforce" (RFC 8461: the MX must match the
policy and the certificate must verify), else opportunistic STARTTLS.  With a
smarthost (``relay_host``) every message goes there with ``relay_tls``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailserv.errors import SMTPReply, TemporaryFailure
from mailserv.queue import dane
from mailserv.queue.client import (
    Reply,
    Session,
    SMTPClientError,
    SMTPClientProtocol,
    Timeouts,
    Transaction,
)
from mailserv.queue.mx import MXHost, MXResolver, MXRoute
from mailserv.queue.state import FAILED, PENDING, SENT

log = Logger()

# Successful MX/TLS plans are reused this long (seconds): many messages to one domain
# need one set of MX, address, TLSA and MTA-STS lookups, not one each.
PLAN_CACHE_TIME = 30.0
PLAN_CACHE_SIZE = 10_000


@dataclass
class Outcome:
    """The result of an attempt for one recipient."""

    status: str  # state.SENT | state.FAILED | state.PENDING
    reason: str
    mta: str | None = None
    tls: str | None = None
    relayed: bool = False


@dataclass
class HostPlan:
    """One MX host to try and the TLS it needs (Session's ``tls`` modes)."""

    host: MXHost
    tls: str = "may"
    tlsa: list[Any] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    port: int | None = None  # None: [queue] smtp_port
    auth: tuple[str, str] | None = None  # smarthost (user, password)


class Connection:
    """An open session to one MX address, reusable for the same domain."""

    def __init__(self, session: Session, address: str) -> None:
        self.session = session
        self.address = address
        self.messages = 0
        self.timer: Any = None

    @property
    def label(self) -> str:
        return f"{self.session.mx_host}[{self.address}]"


class Destination:
    """The connections of one domain: a counting slot limit and the idle ones."""

    def __init__(self, limit: int, key: str = "") -> None:
        self.key = key
        self.limit = limit
        self.count = 0
        self.idle: list[Connection] = []
        self.waiters: deque[defer.Deferred[Connection | None]] = deque()

    def acquire(self) -> defer.Deferred[Connection | None]:
        """An idle connection, a slot to open one (None), or wait for either."""
        while self.idle:
            conn = self.idle.pop()
            if conn.timer is not None and conn.timer.active():
                conn.timer.cancel()
            if not conn.session.protocol.closed:
                return defer.succeed(conn)
            self.count -= 1  # a dead idle connection frees its slot
        if self.count < self.limit:
            self.count += 1
            return defer.succeed(None)
        d: defer.Deferred[Connection | None] = defer.Deferred()
        self.waiters.append(d)
        return d

    def release(self) -> None:
        if self.waiters:
            self.waiters.popleft().callback(None)  # the slot passes on
        else:
            self.count -= 1

    def hand_over(self, conn: Connection) -> bool:
        """Give a connection that just finished a message to a waiting delivery."""
        if not self.waiters:
            return False
        self.waiters.popleft().callback(conn)
        return True


def _reason(reply: Reply) -> str:
    return str(reply)


class Deliverer:
    """Sends recipients of a queue item to their domain (see the module docstring)."""

    def __init__(
        self,
        config: Any,
        helo_name: str,
        mx: MXResolver,
        reactor: Any,
        tls: dane.ClientTLS | None,
        resolver: Any = None,
        mta_sts: Any = None,
        connect: Callable[[str, int, SMTPClientProtocol], defer.Deferred[Any]] | None = None,
    ) -> None:
        self.config = config
        self.helo_name = helo_name
        self.mx = mx
        self.reactor = reactor
        self.tls = tls
        self.resolver = resolver
        self.mta_sts = mta_sts
        self._connect = connect or self._connect_tcp
        self.destinations: dict[str, Destination] = {}
        self._plans: dict[str, tuple[float, list[HostPlan]]] = {}
        self._planning: dict[str, list[defer.Deferred[list[HostPlan]]]] = {}
        self.relay_auth = relay_credentials(config)
        self.timeouts = Timeouts(
            connect=config.connect_timeout,
            greeting=config.greeting_timeout,
            command=config.command_timeout,
            data_init=config.data_timeout,
            block=config.block_timeout,
            final_dot=config.final_timeout,
        )

    def _destination(self, domain: str) -> Destination:
        dest = self.destinations.get(domain)
        if dest is None:
            dest = Destination(self.config.destination_concurrency, domain)
            self.destinations[domain] = dest
        return dest

    def close_all(self) -> None:
        for dest in list(self.destinations.values()):
            for conn in list(dest.idle):
                self._close(dest, conn)

    # ------------------------------------------------------------------

    async def deliver(
        self, domain: str, item: Any, indices: list[int], chunks: Any
    ) -> dict[int, Outcome]:
        requiretls = bool(getattr(item.entry, "requiretls", False))
        # RFC 8689 §5: "TLS-Required: No" asks to deliver even where the recipient's
        # DANE or MTA-STS policy fails; the REQUIRETLS parameter overrides it.
        relaxed = bool(getattr(item, "tls_optional", False)) and not requiretls
        key = "[relay]" if self.config.relay_host else domain
        if requiretls:
            key += "/requiretls"  # its connections were all made with verified TLS
        elif relaxed:
            key += "/tls-optional"  # its connections may not satisfy the policy
        dest = self._destination(key)
        try:
            return await self._deliver(dest, domain, requiretls, item, indices, chunks, relaxed)
        finally:
            if not (dest.count or dest.idle or dest.waiters):
                # Bounded memory: no state is kept for domains nothing is sent to.
                self.destinations.pop(key, None)

    async def _deliver(
        self,
        dest: Destination,
        domain: str,
        requiretls: bool,
        item: Any,
        indices: list[int],
        chunks: Any,
        relaxed: bool = False,
    ) -> dict[int, Outcome]:
        outcomes: dict[int, Outcome] = {}
        remaining = list(indices)
        slot = False  # we hold a connection slot of dest
        while remaining:
            if dest.idle:
                conn = dest.idle.pop()
                if conn.timer is not None and conn.timer.active():
                    conn.timer.cancel()
                if conn.session.protocol.closed:
                    dest.release()
                    continue
            elif dest.count >= dest.limit:
                # Saturated: wait for a connection to be handed over (or a free slot)
                # before spending DNS lookups on a connection we could not open.
                handed = await dest.acquire()
                if handed is None:
                    slot = True
                    break
                conn = handed
            else:
                break
            remaining = await self._transaction(dest, conn, item, remaining, chunks, outcomes)
        if not remaining:
            if slot:
                dest.release()
            return outcomes
        try:
            plans = await self.plan(domain, requiretls, relaxed)
        except (SMTPReply, TemporaryFailure) as exc:
            if slot:
                dest.release()
            if isinstance(exc, SMTPReply):
                text = f"{exc.code} {exc.enhanced} {exc.text}"
                status = PENDING if exc.temporary else FAILED
            else:
                text, status = f"451 4.4.3 {exc}", PENDING
            return {**outcomes, **{i: Outcome(status, text) for i in remaining}}
        last = "451 4.4.1 no MX host could be reached"
        for plan in plans:
            for address in plan.host.addresses:
                if slot:
                    slot, reused = False, None
                else:
                    reused = await dest.acquire()
                try:
                    conn = reused or await self._open(plan, address)
                except Exception as exc:
                    dest.release()
                    last = self._connect_error(plan, address, exc)
                    log.info(
                        "queue: {host} [{address}]: {error}",
                        host=plan.host.name,
                        address=address,
                        error=last,
                    )
                    continue
                remaining = await self._transaction(dest, conn, item, remaining, chunks, outcomes)
                break  # one session per host; temporary results go on to the next host
            if not remaining:
                break
        if slot:
            dest.release()
        for index in remaining:
            outcomes.setdefault(index, Outcome(PENDING, last))
        return outcomes

    def _connect_error(self, plan: HostPlan, address: str, exc: Exception) -> str:
        if isinstance(exc, SMTPClientError):
            code = "5" if exc.permanent else "4"
            return f"{code}51 {exc.enhanced} {exc}"
        return f"451 4.4.1 connect to {plan.host.name}[{address}] failed: {exc}"

    async def _transaction(
        self,
        dest: Destination,
        conn: Connection,
        item: Any,
        indices: list[int],
        chunks: Any,
        outcomes: dict[int, Outcome],
    ) -> list[int]:
        """Send ``indices`` over ``conn``; fill ``outcomes``; return the temporary ones."""
        entry = item.entry
        by_address: dict[str, list[int]] = {}
        rcpts = []
        for index in indices:
            queued = entry.recipients[index]
            if queued.address not in by_address:
                rcpts.append((queued.address, queued.notify, queued.orcpt))
            by_address.setdefault(queued.address, []).append(index)
        txn = Transaction(
            sender=entry.sender,
            recipients=rcpts,
            chunks=chunks,
            size=item.size,
            body=entry.body,
            smtputf8=entry.smtputf8,
            envid=entry.envid,
            ret=entry.ret,
            requiretls=bool(getattr(entry, "requiretls", False)),
        )
        session = conn.session
        label = conn.label
        tls = session.tls_info or None
        conn.messages += 1
        handed = False

        def sent() -> None:
            # RFC 2920 §3.1: the next message waiting for this destination goes out
            # behind our "." at once; the replies stay in order on the connection.
            nonlocal handed
            if (
                dest.waiters
                and not session.protocol.closed
                and conn.messages < self.config.max_messages_per_connection
            ):
                handed = True
                dest.hand_over(conn)

        try:
            replies = await session.send(txn, sent)
        except Exception as exc:
            session.protocol.abort()
            if not handed:  # else the connection (and its slot) is the next message's
                dest.release()
            text = f"451 4.4.2 {label}: {exc}"
            for index in indices:
                outcomes[index] = Outcome(PENDING, text, label, tls)
            return list(indices)
        temporary = []
        has_dsn = "DSN" in session.extensions
        for address, reply in replies.items():
            for index in by_address[address]:
                if reply.positive:
                    notify = entry.recipients[index].notify or ()
                    relayed = not has_dsn and "SUCCESS" in {n.upper() for n in notify}
                    outcomes[index] = Outcome(SENT, _reason(reply), label, tls, relayed)
                elif reply.permanent:
                    outcomes[index] = Outcome(FAILED, _reason(reply), label, tls)
                else:
                    outcomes[index] = Outcome(PENDING, _reason(reply), label, tls)
                    temporary.append(index)
        if not handed:
            self._keep(dest, conn)
        return temporary

    def _keep(self, dest: Destination, conn: Connection) -> None:
        protocol = conn.session.protocol
        if protocol.closed or conn.messages >= self.config.max_messages_per_connection:
            protocol.quit()
            dest.release()
            return
        if dest.hand_over(conn):
            return
        conn.timer = self.reactor.callLater(
            self.config.connection_reuse_time, self._close, dest, conn
        )
        dest.idle.append(conn)

    def _close(self, dest: Destination, conn: Connection) -> None:
        if conn in dest.idle:
            dest.idle.remove(conn)
            if conn.timer is not None and conn.timer.active():
                conn.timer.cancel()
            conn.session.protocol.quit()
            dest.release()
            if not (dest.count or dest.idle or dest.waiters):
                self.destinations.pop(dest.key, None)

    async def _open(self, plan: HostPlan, address: str) -> Connection:
        try:
            return await self._open_once(plan, address, self.tls)
        except SMTPClientError as exc:
            if not (exc.tls_failed and plan.tls == "may"):
                raise
            # RFC 7435 §4: opportunistic TLS that fails may go on in plaintext; only
            # "may" hosts, never those a policy (DANE, MTA-STS, REQUIRETLS) covers.
            log.info("queue: {error}; retrying {address} without TLS", error=exc, address=address)
            return await self._open_once(plan, address, None)

    async def _open_once(self, plan: HostPlan, address: str, tls: Any) -> Connection:
        protocol = SMTPClientProtocol(self.reactor, self.timeouts)
        await self._connect(address, plan.port or self.config.smtp_port, protocol)
        session = Session(
            protocol,
            self.helo_name,
            plan.host.name,
            plan.tls,
            tls,
            plan.names,
            plan.tlsa,
            auth=plan.auth,
        )
        try:
            await session.open()
        except BaseException:
            protocol.abort()
            raise
        return Connection(session, address)

    def _connect_tcp(self, address: str, port: int, protocol: SMTPClientProtocol) -> Any:
        """Connect ``protocol``; fires once it is connected (its transport set)."""
        from mailserv.net import connect_eager

        factory = _OneShot(protocol)
        connect_eager(self.reactor, address, port, factory, self.timeouts.connect)
        return factory.connected

    # ------------------------------------------------------------------
    # Where to go and with which TLS

    async def plan(
        self, domain: str, requiretls: bool = False, relaxed: bool = False
    ) -> list[HostPlan]:
        """The hosts to try for ``domain`` with their TLS requirements (cached briefly).

        ``relaxed`` (RFC 8689 "TLS-Required: No"): the MX hosts with
        opportunistic TLS only, whatever DANE or MTA-STS would require.
        """
        now = self.reactor.seconds()
        key = f"{domain}/requiretls" if requiretls else domain
        if relaxed and not requiretls:
            key = f"{domain}/tls-optional"
        cached = self._plans.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        # Deliveries to a domain whose plan is being made wait for that one (a burst
        # of N messages makes one set of lookups, not N).
        waiters = self._planning.get(key)
        if waiters is not None:
            d: defer.Deferred[list[HostPlan]] = defer.Deferred()
            waiters.append(d)
            return await d
        waiters = self._planning[key] = []
        try:
            if relaxed and not requiretls and self.config.relay_host is None:
                route = await self.mx.resolve(domain)
                plans = [HostPlan(host, "may", [], [host.name]) for host in route.hosts]
            else:
                plans = await self._plan(domain, requiretls)
        except BaseException:
            failure = Failure()
            del self._planning[key]
            for d in waiters:
                d.errback(failure)
            raise
        del self._planning[key]
        if len(self._plans) >= PLAN_CACHE_SIZE:
            self._plans.pop(next(iter(self._plans)))
        self._plans[key] = (now + PLAN_CACHE_TIME, plans)
        for d in waiters:
            d.callback(plans)
        return plans

    async def _plan(self, domain: str, requiretls: bool = False) -> list[HostPlan]:
        relay = self.config.relay_host
        if relay is not None:
            # A smarthost is used by its address records, never its MX (Postfix "[host]").
            name, port = relay
            host = MXHost(name, 0, [name] if _is_ip(name) else [])
            if not host.addresses:
                await self.mx.addresses(host)
            if not host.addresses:
                raise TemporaryFailure(f"relay host {name} has no address")
            tls = "verify" if requiretls else self.config.relay_tls
            return [HostPlan(host, tls, [], [name], port, self.relay_auth)]
        route = await self.mx.resolve(domain)
        policy = None
        if self.mta_sts is not None and self.config.mta_sts:
            policy = await self.mta_sts.policy(domain)
        plans = []
        for host in route.hosts:
            plan = await self._host_plan(domain, route, host, policy)
            if plan is not None:
                plans.append(plan)
        if requiretls:
            plans = self._requiretls(domain, route, policy, plans)
        if not plans:
            raise TemporaryFailure(
                f"no MX host of {domain} satisfies its MTA-STS policy (RFC 8461 §4.1)"
            )
        return plans

    def _requiretls(
        self, domain: str, route: MXRoute, policy: Any, plans: list[HostPlan]
    ) -> list[HostPlan]:
        """RFC 8689 §4.2.1: a DNSSEC-validated MX or one an MTA-STS policy names, and
        a certificate verified by DANE or PKIX, else the message cannot be sent."""
        if not route.secure:
            if policy is None:
                raise SMTPReply(
                    550,
                    "5.7.10",
                    f"REQUIRETLS: the MX of {domain} is neither DNSSEC-validated "
                    "nor covered by an MTA-STS policy",
                )
            plans = [p for p in plans if policy.matches(p.host.name)]
        for p in plans:
            if p.tls not in ("dane", "verify"):
                p.tls, p.names = "verify", [p.host.name]
        return plans

    async def _host_plan(
        self, domain: str, route: MXRoute, host: MXHost, policy: Any
    ) -> HostPlan | None:
        if self.config.dane and self.resolver is not None and route.secure and host.secure:
            name = f"_{self.config.smtp_port}._tcp.{host.name}"
            try:
                answer = await self.resolver.lookup(name, "TLSA")
            except TemporaryFailure:
                # RFC 7672 §2.1.1: a failed TLSA lookup of a secure host: do not use it.
                log.info(
                    "queue: TLSA lookup {name} failed; skipping {host}", name=name, host=host.name
                )
                return None
            if answer.authenticated and answer.records:
                records = dane.usable(answer.records)
                if records:
                    return HostPlan(host, "dane", records, [host.name, domain])
                # §2.2: TLSA records, none usable: TLS still mandatory.
                return HostPlan(host, "encrypt", [], [host.name])
        if policy is not None and policy.mode == "enforce":
            if not policy.matches(host.name):
                log.info(
                    "queue: {host} is not in the MTA-STS policy of {domain}",
                    host=host.name,
                    domain=domain,
                )
                return None
            return HostPlan(host, "verify", [], [host.name])
        return HostPlan(host, "may", [], [host.name])


class _OneShot(ClientFactory):
    """The factory of one outbound connection: ``connected`` fires with the protocol once
    it is connected, or fails with the reason (refused, timeout); no log lines."""

    noisy = False

    def __init__(self, protocol: SMTPClientProtocol) -> None:
        self.protocol_instance = protocol
        self.connected: defer.Deferred[SMTPClientProtocol] = defer.Deferred()
        protocol.on_connect = self._made

    def _made(self) -> None:
        if not self.connected.called:
            self.connected.callback(self.protocol_instance)

    def buildProtocol(self, addr: Any) -> SMTPClientProtocol:
        return self.protocol_instance

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        if not self.connected.called:
            self.connected.errback(reason)


def relay_credentials(config: Any) -> tuple[str, str] | None:
    """(user, password) for the smarthost: the password is the first line of a file."""
    user = getattr(config, "relay_user", None)
    path = getattr(config, "relay_password_file", None)
    if not user or not path:
        return None
    with open(path, encoding="utf-8") as f:
        return user, f.readline().rstrip("\r\n")


def _is_ip(host: str) -> bool:
    return dane._is_ip(host)
