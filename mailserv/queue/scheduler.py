"""The queue scheduler: a Service that delivers what the SMTP server queued.

Life of an entry (state.py keeps it on disk, atomically):

1. spool.py writes ``<id>.entry``; the scheduler learns of it
   by inotify (or its periodic rescan, or at start) and tries it at once.
2. Each attempt groups the pending recipients by destination: local domains
   go back to the router (temporary local failures are queued by it), remote
   domains to the MX of that domain (``Deliverer``).  2xx marks a recipient
   sent, 5xx failed (that recipient only), 4xx leaves it pending.
3. Failed recipients get one DSN (dsn.py) to the sender unless the sender is
   <> or NOTIFY says otherwise; pending ones are retried after 5 minutes,
   doubling to about an hour (LIMITS.md), get a delay DSN once after
   ``delay_warning`` and are bounced when ``lifetime`` (5 days) has passed.
4. When nothing is pending the entry is removed.

Memory is bounded: per entry the scheduler keeps a small ``IndexRow`` and a
heap slot; envelopes and messages are read from disk only for an attempt,
and at most ``max_deliveries`` attempts run at once.  A restart rescans the
directory and resumes from the saved state; an attempt cut short by a crash
is simply made again (at-least-once delivery).
"""

from __future__ import annotations

import heapq
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailserv.address import AddressError, parse_mailbox
from mailserv.errors import SMTPReply, smtp_reply_for
from mailserv.queue import dsn, spool
from mailserv.queue.deliver import Deliverer, Outcome
from mailserv.queue.state import DONE, FAILED, PENDING, SENT, IndexRow, QueueItem, QueueStore

log = Logger()

READ_SIZE = 256 * 1024  # message bytes read per thread hop while sending
# Finished entries are removed in batches gathered over this long (seconds): fewer wake-ups of
# a disk thread and of the reactor, whose GIL hand-overs cost more than the unlinks (drain
# harness: 1150-1300 -> 1720-1800 msgs/s, 0.43-0.45 -> 0.31-0.35 ms CPU per message). A crash
# in the window delivers those messages again, as any crash before the unlink did.
REMOVE_WINDOW = 0.01


def backoff(attempts: int, first: float, maximum: float) -> float:
    """Seconds until the next attempt after ``attempts`` tries (300 s doubling to 4000 s)."""
    if attempts <= 0:
        return 0.0
    return float(min(first * (2 ** min(attempts - 1, 30)), maximum))


class QueueService(Service):
    """Delivers queue entries; see the module docstring.

    ``router`` (a callable returning the service's router, or None) takes the
    recipients of local domains; ``deliverer`` sends the others; ``signer``
    (dkimsign.Signer or None) adds DKIM signatures before remote delivery.
    """

    name = "queue"

    def __init__(
        self,
        config: Any,
        hostname: str,
        queue_dir: str,
        threads: Any,
        reactor: Any,
        deliverer: Deliverer,
        router: Callable[[], Any] | None = None,
        signer: Any = None,
    ) -> None:
        self.config = config
        self.hostname = hostname
        self.store = QueueStore(queue_dir)
        self.threads = threads
        self.reactor = reactor
        self.deliverer = deliverer
        self.router = router
        self.signer = signer
        self.rows: dict[str, IndexRow] = {}
        self._heap: list[tuple[float, str]] = []
        self.active: dict[str, defer.Deferred[None]] = {}
        self._timer: Any = None
        self._scan_timer: Any = None
        self._notifier: Any = None
        self._scanning: defer.Deferred[None] | None = None
        self._locked = False
        self._idle_waiters: list[defer.Deferred[None]] = []
        # Disk work asked for in one reactor turn goes to the pool in one hop.
        self._load = Batch(reactor, self._entry_io, self.store.load_many)
        self._remove = Batch(reactor, self._entry_io, self.store.remove_many, REMOVE_WINDOW)
        # In a process of its own (worker.py) the scheduler reads and removes entries on the
        # reactor: page-cache reads and unlinks cost less than a thread's GIL hand-overs
        # (measured), and no listener waits behind them. Inline, next to the SMTP server,
        # they go to a thread.
        self.disk_in_reactor = False

    # ------------------------------------------------------------------
    # Lifecycle

    def startService(self) -> None:
        super().startService()
        if not self.store.try_lock():
            log.error(
                "queue {dir} is locked by another process; this one will not deliver",
                dir=self.store.directory,
            )
            return
        self._locked = True
        self._watch()
        self.scan()

    @property
    def delivering(self) -> bool:
        """True while this service holds the queue's lock (only the holder delivers)."""
        return self._locked

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        for timer in (self._timer, self._scan_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._scan_timer = None
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
        self.deliverer.close_all()
        if self._locked:
            self.store.unlock()
            self._locked = False
        return None

    def _watch(self) -> None:
        """inotify on the queue and control directories (Linux); else the rescan finds entries."""
        try:
            from twisted.internet import inotify
            from twisted.python import filepath
        except ImportError:  # pragma: no cover - not Linux
            return
        try:
            notifier = inotify.INotify(self.reactor)
            notifier.startReading()
            # Entries and control requests appear by rename only (spool.enqueue,
            # post_control): one event per message, not one per file written.
            mask = inotify.IN_MOVED_TO
            notifier.watch(
                filepath.FilePath(self.store.directory), mask, callbacks=[self._inotified]
            )
            notifier.watch(
                filepath.FilePath(self.store.control_dir), mask, callbacks=[self._inotified]
            )
        except Exception as exc:
            log.warn("inotify unavailable ({error}); polling the queue", error=exc)
            return
        self._notifier = notifier

    def _inotified(self, _: Any, path: Any, mask: int) -> None:
        name = path.basename().decode() if isinstance(path.basename(), bytes) else path.basename()
        if name.endswith(spool.SUFFIX):
            self.notify(name[: -len(spool.SUFFIX)])
        elif name.endswith(".json") and not name.startswith("."):
            self._controls()

    # ------------------------------------------------------------------
    # Knowing what is queued

    def notify(self, entry_id: str, when: float = 0.0) -> None:
        """A new entry (or one to try again) is due at ``when`` (0: now)."""
        if not self.running or not self._locked:
            return
        row = self.rows.get(entry_id)
        if row is None:
            row = IndexRow(entry_id, when)
            self.rows[entry_id] = row
        else:
            row.next_attempt = when
        heapq.heappush(self._heap, (row.next_attempt, entry_id))
        self._wake()

    def scan(self) -> defer.Deferred[None]:
        """Rescan the directory (start, periodic safety net), then deliver what is due."""
        if self._scanning is not None:
            return self._scanning
        d = self.threads.run("disk", self.store.scan, frozenset(self.rows))

        def loaded(result: tuple[list[str], list[IndexRow]]) -> None:
            ids, rows = result
            seen = set(ids)
            for row in rows:
                if row.id not in self.rows:
                    self.rows[row.id] = row
                    heapq.heappush(self._heap, (row.next_attempt, row.id))
            for entry_id in list(self.rows):
                if entry_id not in seen and entry_id not in self.active:
                    del self.rows[entry_id]

        def done(result: Any) -> None:
            self._scanning = None
            if self.running:
                self._scan_timer = self.reactor.callLater(self.config.scan_interval, self._periodic)
                self._controls()
                self._wake()
            if isinstance(result, Exception) or hasattr(result, "getErrorMessage"):
                log.failure("queue scan failed", result)

        d.addCallback(loaded)
        d.addBoth(done)
        self._scanning = d
        return d

    def _periodic(self) -> None:
        self._scan_timer = None
        self.scan()

    # ------------------------------------------------------------------
    # Control requests (mailserv queue ...)

    def _controls(self) -> None:
        d = self.threads.run("disk", self.store.take_controls)
        d.addCallback(lambda requests: defer.ensureDeferred(self._apply(requests)))
        d.addErrback(lambda f: log.failure("queue control request failed", f))

    async def _apply(self, requests: list[dict[str, Any]]) -> None:
        for request in requests:
            await self.control(str(request.get("op")), request.get("id"))

    async def control(self, op: str, entry_id: str | None = None) -> bool:
        """flush | retry ID | hold ID | release ID | delete ID; False if ID is unknown."""
        now = self.reactor.seconds()
        if op == "flush":
            for row in self.rows.values():
                if not row.hold:
                    row.next_attempt = now
                    if row.id in self.active:
                        row.extra["retry"] = True
            self._heap = [(r.next_attempt, r.id) for r in self.rows.values()]
            heapq.heapify(self._heap)
            self._wake()
            return True
        if entry_id is None or entry_id not in self.rows:
            return False
        row = self.rows[entry_id]
        if op == "retry":
            if entry_id in self.active:
                row.extra["retry"] = True
            self.notify(entry_id)
        elif op in ("hold", "release"):
            row.hold = op == "hold"
            await self.threads.run("disk", set_hold, self.store, entry_id, row.hold)
            if not row.hold:
                self.notify(entry_id)
        elif op == "delete":
            await self.threads.run("disk", self.store.remove, entry_id)
            if entry_id not in self.active:
                self.rows.pop(entry_id, None)
        else:
            return False
        log.info("queue {op} {id}", op=op, id=entry_id)
        return True

    # ------------------------------------------------------------------
    # Dispatch

    def _wake(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self.running:
            return
        self._dispatch()
        while self._heap:
            when, entry_id = self._heap[0]
            row = self.rows.get(entry_id)
            if row is None or row.next_attempt != when or row.hold or entry_id in self.active:
                heapq.heappop(self._heap)  # stale slot
                continue
            delay = max(0.0, when - self.reactor.seconds())
            if not delay and len(self.active) >= self.config.max_deliveries:
                break  # due but no room: the next attempt to finish wakes us (no busy timer)
            self._timer = self.reactor.callLater(delay, self._wake)
            break

    def _dispatch(self) -> None:
        now = self.reactor.seconds()
        while self._heap and len(self.active) < self.config.max_deliveries:
            when, entry_id = self._heap[0]
            if when > now:
                break
            heapq.heappop(self._heap)
            row = self.rows.get(entry_id)
            if row is None or row.next_attempt != when or row.hold or entry_id in self.active:
                continue
            d = defer.ensureDeferred(self._attempt(entry_id))
            self.active[entry_id] = d
            d.addErrback(_log_attempt_failure, entry_id)
            d.addBoth(self._attempt_done, entry_id)

    def _attempt_done(self, _: Any, entry_id: str) -> None:
        self.active.pop(entry_id, None)
        row = self.rows.get(entry_id)
        if row is not None and self.running:
            heapq.heappush(self._heap, (row.next_attempt, entry_id))
        if not self.active:
            waiters, self._idle_waiters = self._idle_waiters, []
            for w in waiters:
                w.callback(None)
        if self.running:
            self._wake()

    def _disk(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return self.threads.run("disk", fn, *args)  # type: ignore[no-any-return]

    def _entry_io(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """Loads and removals of entries: on the reactor in the delivery process
        (``disk_in_reactor``), else in the "disk" pool."""
        if self.disk_in_reactor:
            return defer.maybeDeferred(fn, *args)
        return self._disk(fn, *args)

    def gauges(self) -> dict[str, int]:
        """Messages in the queue now: held, in delivery, waiting (the metrics' gauges)."""
        held = sum(1 for row in self.rows.values() if row.hold)
        delivering = len(self.active)
        waiting = max(0, len(self.rows) - held - delivering)
        return {"held": held, "delivering": delivering, "waiting": waiting}

    def wait_idle(self) -> defer.Deferred[None]:
        """Fires when no attempt is running (tests, drain)."""
        if not self.active:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    # ------------------------------------------------------------------
    # One attempt

    async def _attempt(self, entry_id: str) -> None:
        try:
            item = await self._load(entry_id)
        except FileNotFoundError:
            self.rows.pop(entry_id, None)
            return
        row = self.rows.get(entry_id)
        if item.hold or (row is not None and row.hold):
            if row is not None:
                row.hold = True
            return
        now = self.reactor.seconds()
        pending = item.pending()
        expired = now - item.entry.arrival >= self.config.lifetime
        if pending and not expired:
            outcomes = await self._deliver(item, pending)
            for index, outcome in outcomes.items():
                self._record(item, index, outcome)
            item.attempts += 1
            item.last_attempt = now
        if expired:
            days = self.config.lifetime / 86400
            for index in item.pending():
                r = item.recipients[index]
                last = f" (last error: {r.reason})" if r.reason else ""
                r.status = FAILED
                r.reason = f"500 5.4.7 delivery time expired after {days:g} days{last}"
        await self._report(item, now)
        if row is not None and row.hold:
            item.hold = True
        if item.finished:
            await self._remove(entry_id)
            self.rows.pop(entry_id, None)
            return
        delay = backoff(item.attempts, self.config.retry_first, self.config.retry_max)
        deadline = item.entry.arrival + self.config.lifetime
        item.next_attempt = max(now + 1.0, min(now + delay, deadline)) if item.pending() else now
        try:
            await self.threads.run("disk", self.store.save, item)
        except FileNotFoundError:  # deleted while we were delivering
            self.rows.pop(entry_id, None)
            return
        if row is not None:
            row.next_attempt = item.next_attempt
            if row.extra.pop("retry", False):
                # flush/retry arrived while this attempt ran: it applies to the next one.
                row.next_attempt = self.reactor.seconds()

    def _record(self, item: QueueItem, index: int, outcome: Outcome) -> None:
        r = item.recipients[index]
        r.reason = outcome.reason
        r.mta = outcome.mta
        if outcome.status == SENT:
            r.status = SENT
            r.relayed = outcome.relayed
        elif outcome.status == FAILED:
            r.status = FAILED
        log.info(
            "queue {id} to=<{rcpt}> status={status} via={mta} tls={tls} reply={reason}",
            id=item.id,
            rcpt=item.entry.recipients[index].address,
            status="deferred" if outcome.status == PENDING else outcome.status,
            mta=outcome.mta or "-",
            tls=outcome.tls or "-",
            reason=outcome.reason,
        )

    async def _deliver(self, item: QueueItem, indices: list[int]) -> dict[int, Outcome]:
        """Local recipients to the router, remote ones grouped by domain to the deliverer."""
        router = self.router() if self.router is not None else None
        local: list[int] = []
        remote: dict[str, list[int]] = {}
        outcomes: dict[int, Outcome] = {}
        for index in indices:
            address = item.entry.recipients[index].address
            try:
                parsed = parse_mailbox(address)
            except AddressError as exc:
                outcomes[index] = Outcome(FAILED, f"550 5.1.3 bad recipient address: {exc}")
                continue
            if router is not None and router.is_local(parsed):
                local.append(index)
            else:
                remote.setdefault(parsed.domain, []).append(index)
        jobs: list[defer.Deferred[dict[int, Outcome]]] = []
        if local:
            jobs.append(defer.ensureDeferred(self._deliver_local(router, item, local)))
        if remote:
            chunks = await self._chunk_source(item)
            for domain, group in remote.items():
                jobs.append(
                    defer.ensureDeferred(self.deliverer.deliver(domain, item, group, chunks))
                )
        for result in await defer.gatherResults(jobs):
            outcomes.update(result)
        return outcomes

    async def _chunk_source(self, item: QueueItem) -> Callable[[], AsyncIterator[bytes]]:
        """What the client sends: DKIM signatures (if we sign for the sender) then the file."""
        path = self.store.entry_path(item.id)
        start = item.offset
        prefix = b""
        if self.signer is not None and self.signer.has_keys():
            try:
                prefix = await self.threads.run("crypto", self.signer.sign_file, path, start)
            except Exception:
                log.failure("DKIM signing of {id} failed; sending unsigned", id=item.id)
        item.size += len(prefix)
        threads = self.threads

        preloaded = item.data

        async def chunks() -> AsyncIterator[bytes]:
            if prefix:
                yield prefix
            if preloaded is not None:
                yield preloaded
                return
            offset = start
            while True:
                data = await threads.run("disk", read_at, path, offset, READ_SIZE)
                if data:
                    yield data
                if len(data) < READ_SIZE:
                    break
                offset += len(data)

        return chunks

    async def _deliver_local(
        self, router: Any, item: QueueItem, indices: list[int]
    ) -> dict[int, Outcome]:
        """Hand local recipients back to the router (RFC 5321 §4.4 Return-Path is its job)."""
        from mailserv.envelope import Envelope, Message, Recipient

        entry = item.entry
        try:
            sender = parse_mailbox(entry.sender) if entry.sender else None
        except AddressError:
            sender = None
        envelope = Envelope(id=entry.id, mail_from=sender, body=entry.body, smtputf8=entry.smtputf8)
        delivery = await router.start_delivery(envelope)
        outcomes: dict[int, Outcome] = {}
        added: dict[int, Any] = {}
        for index in indices:
            queued = entry.recipients[index]
            rcpt = Recipient(parse_mailbox(queued.address), tuple(queued.notify or ()) or None)
            try:
                await delivery.add_recipient(rcpt)
            except Exception as exc:
                outcomes[index] = _local_outcome(smtp_reply_for(exc))
                continue
            added[index] = rcpt
        if added:
            if item.data is not None:
                message = Message(path=None, size=item.size, data=item.data)
            else:
                path = self.store.entry_path(entry.id)
                message = Message(path=path, size=item.size, offset=item.offset)
            await delivery.body(message)
            try:
                result = await delivery.commit()
            except Exception as exc:
                reply = smtp_reply_for(exc)
                result = dict.fromkeys(added.values(), reply)
            for index, rcpt in added.items():
                outcomes[index] = _local_outcome(result.get(rcpt))
        return outcomes

    # ------------------------------------------------------------------
    # Reports

    async def _report(self, item: QueueItem, now: float) -> None:
        """Send the DSNs this state calls for, then mark what they cover (RFC 3464)."""
        entry = item.entry
        groups: dict[str, list[int]] = {dsn.FAILED: [], dsn.DELAYED: [], dsn.DELIVERED: []}
        for index, r in enumerate(item.recipients):
            notify = entry.recipients[index].notify
            if r.status == FAILED:
                if dsn.wants(notify, dsn.FAILED):
                    groups[dsn.FAILED].append(index)
                r.status = DONE
            elif r.status == SENT and (r.relayed or r.mta is None):
                # Delivered here, or relayed to a peer without DSN (RFC 3461 §5.2.2).
                if dsn.wants(notify, dsn.DELIVERED):
                    groups[dsn.DELIVERED].append(index)
                    r.status = DONE
        warn_after = self.config.delay_warning
        if warn_after and not item.warned and item.pending() and now - entry.arrival >= warn_after:
            item.warned = True
            groups[dsn.DELAYED] = [
                i for i in item.pending() if dsn.wants(entry.recipients[i].notify, dsn.DELAYED)
            ]
        if not entry.sender:
            return  # never a DSN to <> (RFC 3461 §6.2): no bounce loops
        for action, indices in groups.items():
            if not indices:
                continue
            await self._send_dsn(item, action, indices, now)

    async def _send_dsn(self, item: QueueItem, action: str, indices: list[int], now: float) -> None:
        entry = item.entry
        reports = []
        for index in indices:
            queued, r = entry.recipients[index], item.recipients[index]
            this = action
            if action == dsn.DELIVERED and r.relayed:
                this = dsn.RELAYED
            default = {dsn.FAILED: "5.0.0", dsn.DELAYED: "4.0.0"}.get(action, "2.0.0")
            reports.append(
                dsn.Report(
                    queued.address,
                    queued.orcpt,
                    this,
                    dsn.status_of(r.reason, action) if r.reason else default,
                    r.reason,
                    r.mta,
                )
            )
        limit = self.config.bounce_size_limit
        path = self.store.entry_path(entry.id)
        original, complete = await self.threads.run("disk", read_head, path, limit, item.offset)
        retry_until = entry.arrival + self.config.lifetime
        message = dsn.build(
            self.hostname, item, reports, action, original, complete, now, retry_until
        )
        bounce = spool.QueueEntry(
            id=spool.new_id(),
            sender="",
            recipients=[spool.QueuedRecipient(entry.sender)],
            smtputf8=entry.smtputf8,
            body="8BITMIME" if not message.isascii() else "7BIT",
            # RFC 8689 §5: the non-delivery report of a REQUIRETLS message is sent so too.
            requiretls=entry.requiretls,
        )
        await self.threads.run("disk", spool.enqueue, self.store.directory, bounce, [message])
        log.info(
            "queue {id}: {action} DSN {dsn_id} to <{sender}>",
            id=entry.id,
            action=action,
            dsn_id=bounce.id,
            sender=entry.sender,
        )
        self.notify(bounce.id)


class Batch:
    """Calls of a blocking ``many(args) -> results`` made in one reactor turn (or within
    ``delay`` seconds of the first), in one hop.

    ``batch(arg)`` returns a Deferred of that argument's result; every call of
    the turn goes to ``run`` together (``QueueService._entry_io``: the "disk" pool, one
    thread hop and one wake-up of the reactor for many entries instead of one each; or
    the reactor itself in the delivery process).  A result that is an exception fails
    that caller only.
    """

    def __init__(
        self,
        reactor: Any,
        run: Callable[..., defer.Deferred[Any]],
        many: Callable[[list[Any]], list[Any]],
        delay: float = 0.0,
    ) -> None:
        self.reactor = reactor
        self.run = run
        self.many = many
        self.delay = delay
        self._calls: list[tuple[Any, defer.Deferred[Any]]] = []

    def __call__(self, arg: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self._calls.append((arg, d))
        if len(self._calls) == 1:
            self.reactor.callLater(self.delay, self._flush)
        return d

    def _flush(self) -> None:
        calls, self._calls = self._calls, []
        done = self.run(self.many, [arg for arg, _ in calls])

        def fire(results: Any) -> None:
            if isinstance(results, Failure):
                for _, d in calls:
                    d.errback(results)
                return
            for (_, d), result in zip(calls, results, strict=True):
                if isinstance(result, BaseException):
                    d.errback(Failure(result))
                else:
                    d.callback(result)

        done.addBoth(fire)


def _log_attempt_failure(failure: Any, entry_id: str) -> None:
    log.failure("queue attempt {id} failed", failure, id=entry_id)


def _local_outcome(reply: SMTPReply | None) -> Outcome:
    if reply is None:
        return Outcome(SENT, "250 2.0.0 delivered locally")
    text = f"{reply.code} {reply.enhanced} {reply.text}"
    return Outcome(PENDING if reply.temporary else FAILED, text)


def read_at(path: str, offset: int, size: int) -> bytes:
    """``size`` bytes of a file from ``offset`` (one thread hop per chunk, no open file kept)."""
    with open(path, "rb") as f:
        if offset:
            f.seek(offset)
        return f.read(size)


def read_head(path: str, limit: int, offset: int = 0) -> tuple[bytes, bool]:
    """The first ``limit`` bytes of a file from ``offset``, and whether that is all of it."""
    with open(path, "rb") as f:
        if offset:
            f.seek(offset)
        data = f.read(limit + 1)
    return data[:limit], len(data) <= limit


def set_hold(store: QueueStore, entry_id: str, hold: bool) -> None:
    """Persist hold/release of an entry (blocking)."""
    item = store.load(entry_id)
    item.hold = hold
    store.save(item)


def queue_dir_of(config: Any) -> str:
    return os.path.join(config.state_dir, "queue")
