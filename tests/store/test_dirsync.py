"""Group commit of directory fsyncs at delivery (durable.DirSync, as maildir uses it)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from mailserv import durable
from mailserv.store.maildir import DirSync


class BlockingFsync:
    """Stands in for fsync_dir: each call blocks until released; counts rounds."""

    def __init__(self) -> None:
        self.calls = 0
        self.entered = threading.Semaphore(0)
        self.release = threading.Semaphore(0)
        self.fail_next = False

    def __call__(self, path: str) -> None:
        self.calls += 1
        self.entered.release()
        assert self.release.acquire(timeout=10)
        if self.fail_next:
            self.fail_next = False
            raise OSError(5, "Input/output error")


def wait_for_waiters(syncer: DirSync, n: int) -> None:
    """Until ``n`` callers are blocked waiting for the next round."""
    deadline = time.monotonic() + 10
    while len(syncer._cond._waiters) < n:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline
        time.sleep(0.001)


def start(syncer: DirSync, results: list[object]) -> threading.Thread:
    def run() -> None:
        try:
            syncer.sync()
            results.append("ok")
        except OSError as exc:
            results.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def leader_and_waiters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int
) -> tuple[
    BlockingFsync, DirSync, threading.Thread, list[object], list[threading.Thread], list[object]
]:
    """One caller whose fsync (round 1) is running, ``n`` more arrived during it."""
    fake = BlockingFsync()
    monkeypatch.setattr(durable, "fsync_dir", fake)
    syncer = DirSync(str(tmp_path))
    first: list[object] = []
    leader = start(syncer, first)
    assert fake.entered.acquire(timeout=10)  # round 1 running
    later: list[object] = []
    waiters = [start(syncer, later) for _ in range(n)]
    wait_for_waiters(syncer, n)
    return fake, syncer, leader, first, waiters, later


def test_callers_during_a_running_fsync_share_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, _, leader, first, waiters, later = leader_and_waiters(tmp_path, monkeypatch, 5)
    leader.join(0.2)
    assert leader.is_alive() and not first  # round 1 not finished
    fake.release.release()  # round 1 ends: acknowledges only the leader
    leader.join(10)
    assert first == ["ok"]
    assert fake.entered.acquire(timeout=10)  # round 2 began for the five that came later
    assert later == []  # they renamed while round 1 ran: round 1 does not cover them
    fake.release.release()
    for t in waiters:
        t.join(10)
    assert later == ["ok"] * 5
    assert fake.calls == 2


def test_a_failed_fsync_fails_the_deliveries_it_covered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, syncer, leader, _, waiters, later = leader_and_waiters(tmp_path, monkeypatch, 3)
    fake.release.release()
    leader.join(10)
    assert fake.entered.acquire(timeout=10)
    fake.fail_next = True
    fake.release.release()
    for t in waiters:
        t.join(10)
    assert len(later) == 3 and all(isinstance(r, OSError) for r in later)
    # The next caller gets a fresh fsync of its own.
    again: list[object] = []
    t = start(syncer, again)
    assert fake.entered.acquire(timeout=10)
    fake.release.release()
    t.join(10)
    assert again == ["ok"] and fake.calls == 3


def test_one_syncer_per_directory(tmp_path: Path) -> None:
    a = DirSync.of(str(tmp_path / "new"))
    assert DirSync.of(str(tmp_path / "new")) is a
    assert DirSync.of(str(tmp_path / "cur")) is not a
