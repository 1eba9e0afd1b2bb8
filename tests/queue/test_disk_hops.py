"""The scheduler's disk work goes to the thread pool in batches, not one hop per entry."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import pytest_twisted

from tests.queue.conftest import message
from tests.queue.test_delivery import remote_dns, wait_for

pytestmark = pytest.mark.integration


class CountingThreads:
    """Wraps the queue's ThreadPools, counting hops per function name."""

    def __init__(self, threads: Any) -> None:
        self.threads = threads
        self.hops: Counter[str] = Counter()

    def run(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        self.hops[getattr(fn, "__name__", repr(fn))] += 1
        return self.threads.run(name, fn, *args, **kwargs)


async def deliver_counting(
    queue_env: Any, mx_net: Any, dns_server: Any, count: int, disk_in_reactor: bool
) -> Counter[str]:
    """Deliver ``count`` entries due together; the thread hops per function name."""
    remote_dns(dns_server)
    mx = mx_net.server("127.0.0.2")
    ours = [f"r{i}@remote.test" for i in range(count)]
    for rcpt in ours:
        queue_env.enqueue("a@sender.test", [rcpt], message(rcpt))
    queue = queue_env.build()
    queue.disk_in_reactor = disk_in_reactor
    counting = queue.threads = CountingThreads(queue.threads)
    queue.startService()
    await wait_for(lambda: not queue_env.entries())
    assert sorted(m.recipients[0] for m in mx.messages if m.recipients[0] in ours) == sorted(ours)
    return counting.hops


def hops_of(hops: Counter[str], prefix: str) -> int:
    return sum(n for fn, n in hops.items() if fn.startswith(prefix))


@pytest_twisted.ensureDeferred
async def test_entries_due_together_are_loaded_in_one_hop(
    queue_env: Any, mx_net: Any, dns_server: Any
) -> None:
    hops = await deliver_counting(queue_env, mx_net, dns_server, 10, False)
    assert hops_of(hops, "load") == 1, hops
    assert 1 <= hops_of(hops, "remove") < 10, hops


@pytest_twisted.ensureDeferred
async def test_the_delivery_process_loads_and_removes_entries_without_a_thread_hop(
    queue_env: Any, mx_net: Any, dns_server: Any
) -> None:
    """In the worker process (disk_in_reactor) an entry's file is read and removed on the
    reactor: no thread's GIL hand-overs (measured: the removal thread cost the worker
    0.1-0.15 ms of CPU per relayed message; an unlink itself ~0.02 ms)."""
    hops = await deliver_counting(queue_env, mx_net, dns_server, 5, True)
    assert hops_of(hops, "load") == 0, hops
    assert hops_of(hops, "remove") == 0, hops


def test_the_worker_reads_in_its_reactor(tmp_path: Any) -> None:
    from twisted.internet import reactor

    from mailserv.config import from_dict
    from mailserv.queue.worker import build_worker_service
    from tests.support.process import test_config

    (tmp_path / "users.passwd").write_text("")
    config = from_dict(test_config(tmp_path, {}))
    assert build_worker_service(config, reactor).queue.disk_in_reactor is True


def test_removals_of_a_short_window_share_one_hop() -> None:
    from twisted.internet import defer
    from twisted.internet.task import Clock

    from mailserv.queue.scheduler import REMOVE_WINDOW, Batch

    clock = Clock()
    hops: list[list[str]] = []

    def run(fn: Any, ids: list[str]) -> Any:
        hops.append(ids)
        return defer.succeed(fn(ids))

    batch = Batch(clock, run, lambda ids: [None] * len(ids), delay=REMOVE_WINDOW)
    first = batch("a")
    clock.advance(REMOVE_WINDOW / 2)
    second = batch("b")
    assert hops == [] and not first.called
    clock.advance(REMOVE_WINDOW / 2)
    assert hops == [["a", "b"]]
    assert first.called and second.called
    batch("c")
    clock.advance(REMOVE_WINDOW)
    assert hops == [["a", "b"], ["c"]]
