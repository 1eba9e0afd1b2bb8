"""Delivery helper processes: the store's and the queue's disk work off the reactor's GIL.

Every accepted message costs one blocking job: the local delivery (create,
write, fsync, rename, fsync of ``new/``) or the write of an outbound queue
entry.  Run in the reactor process's ``disk`` threads, each of the job's
system calls hands the GIL back and forth with the reactor; under 20 SMTP
sessions that costs more CPU (futex waits, context switches) than the file
system work itself (bench/smtp.sh: ~1 ms of system CPU per 4 KiB message,
against 0.14 ms for the bare create/write/fsync/rename).

``[delivery] processes = N`` (default 2) runs those jobs in N child
processes (``python -m mailserv.helper_child``, single-threaded, no Twisted)
instead.  A delivery goes to the child its mailbox hashes to (the least busy
child if that one is not running), a queue entry to the least busy child
(``_pick`` has the measurements), over its stdin;
its Deferred fires on the child's reply, after its fsyncs, so "a 250
means on disk" holds as before.  The failure of a job in a child is the same
exception as in a thread (pickled back), mapped to an SMTP reply by the
caller.

- A child that dies fails its jobs in flight with ``TemporaryFailure`` (the
  client gets 451 and retries; a job the child had finished is then
  delivered twice, never lost) and is started again after 1 s, doubling to
  30 s while children die within a second of starting.
- A child that leaves its oldest job unanswered for ``JOB_TIMEOUT`` (300 s: a
  hung disk, a bug) is killed and replaced the same way.
- While no child runs, jobs go to the ``disk`` threads as before.
- SIGHUP: the new ``[store]`` section is sent to every child.
- Stopping closes the children's stdin: each finishes the jobs it has read
  and exits; one still running after ``shutdown_timeout`` is killed.

Helpers are started by a MailService that owns its process (twistd, the
.tac: ``handle_signals``), like the GIL switch interval: a service embedded in
another program (the tests) keeps the threads.
"""

from __future__ import annotations

import os
import sys
import zlib
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, error, task
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailserv.errors import TemporaryFailure
from mailserv.helper_child import frame, split_frames
from mailserv.interfaces import IReloadable

log = Logger()

RESTART_MIN = 1.0
RESTART_MAX = 30.0
# A child that has not answered its oldest job for this long is killed (its jobs get 451)
# and replaced: below the 10 minutes a client waits for the reply to the end of data
# (RFC 5321 §4.5.3.2.6), so the client hears a 451, not a timeout.
JOB_TIMEOUT = 300.0
WATCH_INTERVAL = 10.0


def child_command() -> list[str]:
    return [sys.executable, "-m", "mailserv.helper_child"]


def child_env() -> dict[str, str]:
    """The parent's environment, with the directory this mailserv is imported from first
    (for the delivery helpers and the queue worker)."""
    import mailserv

    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(mailserv.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


class HelperProtocol(ProcessProtocol):
    """One child: frames out on its stdin, replies in from its stdout."""

    def __init__(self, pool: DeliveryHelpers, slot: int) -> None:
        self.pool = pool
        self.slot = slot
        # jobs in flight, oldest first (a child answers in order): id -> (Deferred, sent at)
        self.pending: dict[int, tuple[defer.Deferred[Any], float]] = {}
        self.buffer = bytearray()
        self.alive = False
        self.started_at = 0.0
        self.ended: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.alive = True
        self.started_at = self.pool.reactor.seconds()

    def send(self, request: bytes, d: defer.Deferred[Any], rid: int) -> None:
        self.pending[rid] = (d, self.pool.reactor.seconds())
        assert self.transport is not None
        self.transport.write(request)

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        replies, error = split_frames(self.buffer)
        for rid, ok, value in replies:
            job = self.pending.pop(rid, None)
            if job is None:
                continue
            if ok:
                job[0].callback(value)
            else:
                job[0].errback(Failure(value))
        if error is not None:
            log.error(
                "delivery helper {slot} sent an unreadable reply ({error}); killing it",
                slot=self.slot,
                error=error,
            )
            self._kill()

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                log.warn("delivery helper {slot}: {line}", slot=self.slot, line=line)

    def oldest_job_age(self, now: float) -> float:
        for _, sent in self.pending.values():
            return now - sent
        return 0.0

    def _kill(self) -> None:
        try:
            assert self.transport is not None
            self.transport.signalProcess("KILL")
        except (error.ProcessExitedAlready, AssertionError):
            pass

    def processEnded(self, reason: Failure) -> None:
        self.alive = False
        pending, self.pending = self.pending, {}
        if pending:
            log.warn(
                "delivery helper {slot} exited with {n} jobs in flight ({reason})",
                slot=self.slot,
                n=len(pending),
                reason=reason.getErrorMessage(),
            )
        for d, _ in pending.values():
            d.errback(Failure(TemporaryFailure("delivery helper exited")))
        self.ended.callback(None)
        self.pool.child_ended(self)


@implementer(IReloadable)
class DeliveryHelpers(Service):
    """The parent's side: N children, restarted when they die (see the module docstring)."""

    name = "delivery-helpers"

    def __init__(self, count: int, store_config: Any, threads: Any, reactor: Any) -> None:
        self.count = count
        self.store_config = store_config
        self.threads = threads
        self.reactor = reactor
        self.shutdown_timeout = 30.0
        self.children: list[HelperProtocol | None] = [None] * count
        self._delays = [RESTART_MIN] * count
        self._pending_spawns: dict[int, Any] = {}
        self._next_id = 0
        self._watchdog: task.LoopingCall | None = None
        self.restarts = 0  # children started again after one died (metrics)

    # -- lifecycle

    def startService(self) -> None:
        super().startService()
        for slot in range(self.count):
            self._spawn(slot)
        self._watchdog = task.LoopingCall(self._watch)
        self._watchdog.clock = self.reactor
        self._watchdog.start(WATCH_INTERVAL, now=False)

    def _watch(self) -> None:
        now = self.reactor.seconds()
        for proto in self.children:
            if proto is not None and proto.alive and proto.oldest_job_age(now) > JOB_TIMEOUT:
                log.error(
                    "delivery helper {slot} has not answered for {age:.0f}s; killing it",
                    slot=proto.slot,
                    age=proto.oldest_job_age(now),
                )
                proto._kill()

    def _spawn(self, slot: int) -> None:
        if self._pending_spawns.pop(slot, None) is not None:
            self.restarts += 1
        if not self.running:
            return
        proto = HelperProtocol(self, slot)
        try:
            self.reactor.spawnProcess(
                proto,
                sys.executable,
                child_command(),
                env=child_env(),
                childFDs={0: "w", 1: "r", 2: "r"},
            )
        except OSError as exc:
            log.error("delivery helper {slot} not started: {error}", slot=slot, error=exc)
            self._schedule_restart(slot)
            return
        self.children[slot] = proto
        assert proto.transport is not None
        proto.transport.write(frame(("config", self.store_config)))
        log.info("delivery helper {slot} running, pid {pid}", slot=slot, pid=proto.transport.pid)

    def child_ended(self, proto: HelperProtocol) -> None:
        slot = proto.slot
        if self.children[slot] is proto:
            self.children[slot] = None
        if not self.running:
            return
        young = self.reactor.seconds() - proto.started_at < 1.0
        self._delays[slot] = min(self._delays[slot] * 2, RESTART_MAX) if young else RESTART_MIN
        log.warn(
            "delivery helper {slot} exited; starting it again in {delay:.0f}s",
            slot=slot,
            delay=self._delays[slot],
        )
        self._schedule_restart(slot)

    def _schedule_restart(self, slot: int) -> None:
        if slot not in self._pending_spawns:
            delay = self._delays[slot]
            self._pending_spawns[slot] = self.reactor.callLater(delay, self._spawn, slot)

    def stopService(self) -> defer.Deferred[Any]:  # type: ignore[override]
        super().stopService()
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        for call in self._pending_spawns.values():
            if call.active():
                call.cancel()
        self._pending_spawns.clear()
        running = [p for p in self.children if p is not None and p.alive]
        for proto in running:
            assert proto.transport is not None
            proto.transport.closeStdin()  # the child finishes what it read, then exits
        if not running:
            return defer.succeed(None)
        done = defer.DeferredList([p.ended for p in running])
        timer = self.reactor.callLater(self.shutdown_timeout, self._kill_all, running)

        def finished(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return done.addBoth(finished)

    def _kill_all(self, running: list[HelperProtocol]) -> None:
        for proto in running:
            if proto.alive:
                log.warn("delivery helper {slot} did not exit; killing it", slot=proto.slot)
                proto._kill()

    def reload(self, config: Any) -> None:
        self.store_config = config.store
        self.shutdown_timeout = config.shutdown_timeout
        request = frame(("config", self.store_config))
        for proto in self.children:
            if proto is not None and proto.alive and proto.transport is not None:
                proto.transport.write(request)

    # -- state (metrics)

    def running_children(self) -> int:
        return sum(1 for p in self.children if p is not None and p.alive)

    def jobs_in_flight(self) -> int:
        return sum(len(p.pending) for p in self.children if p is not None)

    # -- jobs

    def _pick(self, key: str | None) -> HelperProtocol | None:
        """The child for ``key`` (a mailbox), else the least busy (``key`` None: any).

        Jobs for one mailbox go to one child: they share its batches (one directory
        fsync for all that arrive together) and never contend for the directory's lock
        across processes.  Measured on 2000 x 4 KiB to one mailbox under 20 sessions:
        0.99-1.16 ms of CPU per message with one child, 1.40-1.57 with two taking
        turns, 1.53-1.78 with three (perf: inode lock spinning, smaller batches).
        Queue entries are the opposite case (one file each, no folder to rename into):
        spread over two children the fsyncs of concurrent enqueues overlap at the same
        CPU per entry (bench/relay.sh, the same rounds: 1095-1236 msgs/s against
        865-1016 with one child for the queue).
        """
        if key is not None:
            proto = self.children[zlib.crc32(key.encode("utf-8", "surrogateescape")) % self.count]
            if proto is not None and proto.alive:
                return proto
        best: HelperProtocol | None = None
        for proto in self.children:
            if proto is not None and proto.alive:
                if best is None or len(proto.pending) < len(best.pending):
                    best = proto
        return best

    def run(
        self, op: str, args: tuple[Any, ...], fallback: Callable[[], Any], key: str | None = None
    ) -> defer.Deferred[Any]:
        """Run ``op(*args)`` in the child for ``key`` (None: the least busy); ``fallback()``
        in a ``disk`` thread if no child runs."""
        proto = self._pick(key)
        if proto is None:
            return self.threads.run("disk", fallback)  # type: ignore[no-any-return]
        self._next_id += 1
        rid = self._next_id
        d: defer.Deferred[Any] = defer.Deferred()
        try:
            request = frame((rid, op, args))
        except Exception:
            return defer.fail()
        proto.send(request, d, rid)
        return d


def build_helpers(service: Any) -> DeliveryHelpers | None:
    """The MailService's helpers (``[delivery] processes``), or None for the threads."""
    count = service.config.delivery.processes
    if count <= 0 or not service.handle_signals:
        return None
    helpers = DeliveryHelpers(count, service.config.store, service.threads, service.reactor)
    helpers.shutdown_timeout = service.config.shutdown_timeout
    return helpers
