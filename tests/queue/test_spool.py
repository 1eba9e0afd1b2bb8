"""The spool's durable writes: ids, and the group commit of directory fsyncs (durable.DirSync)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mailserv import durable
from mailserv.queue import spool


def test_new_ids_are_unique_and_time_ordered() -> None:
    ids = [spool.new_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 23 for i in ids)
    assert [i[:13] for i in ids] == sorted(i[:13] for i in ids)


def test_dir_sync_returns_only_after_an_fsync_started_after_the_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[tuple[float, float]] = []

    def slow_fsync_dir(path: str) -> None:
        start = time.monotonic()
        time.sleep(0.02)
        runs.append((start, time.monotonic()))

    monkeypatch.setattr(durable, "fsync_dir", slow_fsync_dir)
    sync = durable.DirSync(str(tmp_path))
    calls: list[tuple[float, float]] = []
    lock = threading.Lock()

    def caller(delay: float) -> None:
        time.sleep(delay)
        called = time.monotonic()
        sync.sync()
        with lock:
            calls.append((called, time.monotonic()))

    threads = [threading.Thread(target=caller, args=(i * 0.003,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 30
    for called, returned in calls:
        # Some fsync began after this caller's call and ended before it returned.
        assert any(called <= s and e <= returned for s, e in runs), (called, returned, runs)
    assert len(runs) < 15  # grouped: far fewer fsyncs than callers


def test_dir_sync_reports_a_failed_fsync_to_its_waiters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(path: str) -> None:
        time.sleep(0.01)
        raise OSError(5, "EIO")

    monkeypatch.setattr(durable, "fsync_dir", broken)
    sync = durable.DirSync(str(tmp_path))
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            sync.sync()
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 8


def test_enqueue_writes_message_and_envelope_durably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Any] = []
    real = durable.fsync_dir
    monkeypatch.setattr(durable, "fsync_dir", lambda p: (synced.append(p), real(p)))
    entry = spool.QueueEntry(
        id=spool.new_id(), sender="a@example.test", recipients=[spool.QueuedRecipient("b@x.test")]
    )
    spool.enqueue(str(tmp_path / "q"), entry, [b"Subject: x\r\n", b"\r\nbody\r\n"])
    assert (tmp_path / "q" / f"{entry.id}.msg").read_bytes() == b"Subject: x\r\n\r\nbody\r\n"
    assert spool.load_entry(str(tmp_path / "q"), entry.id) == entry
    assert synced == [str(tmp_path / "q")]
    with pytest.raises(FileExistsError):  # never overwrites an entry
        spool.enqueue(str(tmp_path / "q"), entry, [b"other"])


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (b"TLS-Required: No\r\nSubject: x\r\n\r\nbody\r\n", True),
        (b"Subject: x\r\ntls-required:   no  \r\n\r\nbody\r\n", True),
        (b"Subject: x\r\nTLS-Required:\r\n No\r\n\r\n", True),  # folded
        (b"Subject: x\r\nTLS-Required: Yes\r\n\r\n", False),
        (b"Subject: x\r\nX-TLS-Required: No\r\n\r\n", False),
        (b"Subject: x\r\n\r\nTLS-Required: No\r\n", False),  # in the body
    ],
)
def test_tls_required_no_is_read_from_the_header_only(message: bytes, expected: bool) -> None:
    from mailserv.queue.state import tls_required_no

    assert tls_required_no(message) is expected
