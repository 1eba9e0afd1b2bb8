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


@pytest_twisted.ensureDeferred
async def test_entries_due_together_are_loaded_in_one_hop(
    queue_env: Any, mx_net: Any, dns_server: Any
) -> None:
    remote_dns(dns_server)
    mx = mx_net.server("127.0.0.2")
    ours = [f"r{i}@remote.test" for i in range(10)]
    for rcpt in ours:
        queue_env.enqueue("a@sender.test", [rcpt], message(rcpt))
    queue = queue_env.build()
    counting = queue.threads = CountingThreads(queue.threads)
    queue.startService()
    await wait_for(lambda: not queue_env.entries())
    assert sorted(m.recipients[0] for m in mx.messages if m.recipients[0] in ours) == sorted(ours)
    loads = sum(n for fn, n in counting.hops.items() if fn.startswith("load"))
    removals = sum(n for fn, n in counting.hops.items() if fn.startswith("remove"))
    assert loads == 1, counting.hops
    assert 1 <= removals < 10, counting.hops
