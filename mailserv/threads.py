"""Named, bounded thread pools for blocking work (DNS, auth, disk, crypto).

Nothing may block the reactor: dnspython, ldap3, PAM, password hashing, SQL
and fsync-heavy disk work run here.  Each pool has a fixed maximum size so a
flood of requests queues instead of spawning threads without bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

_R = TypeVar("_R")

POOL_NAMES = ("dns", "auth", "disk", "crypto")


class ThreadPools(Service):
    """The process's thread pools, started and stopped with the service.

    ``pools.run("disk", fn, *args)`` returns a Deferred of ``fn(*args)`` run
    in the ``disk`` pool.  Before the service starts (in tests that never
    start it) the pools are started on first use.
    """

    name = "threads"

    def __init__(self, reactor: Any, sizes: dict[str, int]) -> None:
        self._reactor = reactor
        self._pools: dict[str, ThreadPool] = {}
        for pool_name, size in sizes.items():
            self._pools[pool_name] = ThreadPool(minthreads=0, maxthreads=size, name=pool_name)
        self._started = False
        self._stopped = False

    def pool(self, name: str) -> ThreadPool:
        if name not in self._pools:
            raise KeyError(f"no thread pool named {name!r}")
        pool = self._pools[name]
        if self._stopped:
            raise RuntimeError(f"the {name!r} thread pool is stopped (shutting down)")
        if not pool.started:
            pool.start()
            if not self._started:
                self._reactor.addSystemEventTrigger("during", "shutdown", self._stop_pools)
                self._started = True
        return pool

    @property
    def reactor(self) -> Any:
        """The reactor the pools report to (mailserv.dns sends its queries from it)."""
        return self._reactor

    def pools(self) -> dict[str, ThreadPool]:
        """Every pool by name (for metrics; does not start any)."""
        return dict(self._pools)

    def run(self, name: str, fn: Callable[..., _R], *args: Any, **kwargs: Any) -> Deferred[_R]:
        """``fn(*args)`` in pool ``name``; a failed Deferred once the pools are stopped."""
        try:
            pool = self.pool(name)
        except RuntimeError:
            return fail()
        return deferToThreadPool(self._reactor, pool, fn, *args, **kwargs)

    def startService(self) -> None:
        super().startService()
        for name in self._pools:
            self.pool(name)

    def stopService(self) -> None:
        super().stopService()
        self._stop_pools()

    def _stop_pools(self) -> None:
        self._stopped = True
        for pool in self._pools.values():
            if pool.started:
                pool.stop()
