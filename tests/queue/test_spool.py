"""The spool's durable writes: ids, and the group commit of directory fsyncs (durable.DirSync)."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict
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
    assert spool.read_message(str(tmp_path / "q"), entry.id) == b"Subject: x\r\n\r\nbody\r\n"
    assert spool.load_entry(str(tmp_path / "q"), entry.id) == entry
    # One file per entry (one inode to allocate, fsync and free), nothing else left.
    assert [p.name for p in (tmp_path / "q").iterdir()] == [f"{entry.id}.entry"]
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


def _entry(rcpts: int = 1) -> spool.QueueEntry:
    return spool.QueueEntry(
        id=spool.new_id(),
        sender="a@example.test",
        recipients=[spool.QueuedRecipient(f"r{i}@x.test") for i in range(rcpts)],
    )


@pytest.mark.parametrize(
    ("rcpts", "size"),
    [(1, 0), (1, 100), (1, 300_000), (3000, 10), (3000, 300_000)],  # envelopes up to ~140 KiB
)
def test_the_entry_file_is_the_envelope_line_then_the_message(
    tmp_path: Path, rcpts: int, size: int
) -> None:
    entry = _entry(rcpts)
    message = (b"Subject: x\r\n\r\n" + b"y" * size)[: max(size, 14)] if size else b""
    qdir = str(tmp_path)
    spool.enqueue(qdir, entry, [message[:7], message[7:]] if message else [])
    raw = (tmp_path / f"{entry.id}.entry").read_bytes()
    line, _, rest = raw.partition(b"\n")
    assert spool.QueueEntry.from_json(line) == entry and rest == message
    assert entry.version == spool.FORMAT_VERSION == 2
    for want in (0, 10, spool.HEAD_READ, 1 << 20):
        head = spool.open_head(qdir, entry.id, want)
        assert head.entry == entry
        assert (head.offset, head.size) == (len(line) + 1, len(message))
        assert message.startswith(head.data)
        # All of a message of at most ``want`` bytes, else at least its first HEAD_READ.
        if len(message) <= want:
            assert head.data == message
        else:
            assert len(head.data) >= min(len(message), spool.HEAD_READ)
    assert spool.read_message(qdir, entry.id) == message


def test_a_file_without_an_envelope_line_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.entry").write_bytes(b"{" + b"a" * 200_000)
    with pytest.raises(ValueError, match="envelope line"):
        spool.open_head(str(tmp_path), "x")


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    def chunks() -> Any:
        yield b"Subject: x\r\n"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        spool.enqueue(str(tmp_path), _entry(), chunks())
    assert list(tmp_path.iterdir()) == []


def _version_1(qdir: Path, entry: spool.QueueEntry, message: bytes) -> None:
    """An entry as the version-1 spool wrote it: <id>.msg, then <id>.env."""
    data = asdict(entry) | {"version": 1}
    (qdir / f"{entry.id}.msg").write_bytes(message)
    (qdir / f"{entry.id}.env").write_text(json.dumps(data))


def test_version_1_entries_are_converted_when_listed(tmp_path: Path) -> None:
    from mailserv.queue.state import QueueStore

    old, both, broken = _entry(), _entry(2), _entry()
    _version_1(tmp_path, old, b"Subject: old\r\n\r\nbody\r\n")
    (tmp_path / f"{old.id}.state").write_text('{"attempts": 2, "next_attempt": 5.0}')
    # A conversion cut short by a crash: the new file is there, the old ones too.
    _version_1(tmp_path, both, b"Subject: both\r\n\r\n")
    spool.enqueue(str(tmp_path), both, [b"Subject: both\r\n\r\n"])
    (tmp_path / f"{broken.id}.env").write_text("{not json")
    (tmp_path / f"{broken.id}.msg").write_bytes(b"x")

    assert spool.list_entries(str(tmp_path)) == sorted([old.id, both.id])
    names = sorted(p.name for p in tmp_path.iterdir())
    left = [f"{broken.id}.env", f"{broken.id}.msg"]  # for the operator
    assert names == sorted([f"{old.id}.entry", f"{old.id}.state", f"{both.id}.entry", *left])
    item = QueueStore(str(tmp_path)).load(old.id, preload=1 << 20)
    assert item.entry.recipients == old.recipients and item.entry.sender == old.sender
    assert item.data == b"Subject: old\r\n\r\nbody\r\n" and item.attempts == 2
    assert spool.read_message(str(tmp_path), both.id) == b"Subject: both\r\n\r\n"


def test_a_version_1_entry_loads_by_id_before_any_listing(tmp_path: Path) -> None:
    from mailserv.queue.state import QueueStore

    old = _entry()
    _version_1(tmp_path, old, b"Subject: old\r\n\r\nbody\r\n")
    item = QueueStore(str(tmp_path)).load(old.id)
    assert item.entry.id == old.id and item.size == 22 and item.offset > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{old.id}.entry"]
    with pytest.raises(FileNotFoundError):
        QueueStore(str(tmp_path)).load("nothing")


def test_cleanup_removes_what_a_crash_left_and_keeps_entries(tmp_path: Path) -> None:
    from mailserv.queue.state import ORPHAN_AGE, QueueStore

    kept = _entry()
    spool.enqueue(str(tmp_path), kept, [b"Subject: x\r\n\r\n"])
    (tmp_path / f"{kept.id}.state").write_text("{}")
    (tmp_path / "0123.tmp").write_bytes(b"half")  # an enqueue cut short
    (tmp_path / "0456.state").write_text("{}")  # the state of a removed entry
    store = QueueStore(str(tmp_path))
    assert store.cleanup() == 0  # young files may still be being written
    assert store.cleanup(now=time.time() + ORPHAN_AGE + 1) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{kept.id}.entry", f"{kept.id}.state"]
    assert store.ids() == [kept.id]


def test_loading_a_large_entry_reads_its_head_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailserv.queue.state import PRELOAD, QueueStore

    entry = _entry()
    body = b"Subject: big\r\nTLS-Required: No\r\n\r\n" + b"z" * (2 << 20)
    spool.enqueue(str(tmp_path), entry, [body])
    read: list[int] = []
    real = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: (b := real(fd, n), read.append(len(b)))[0])
    item = QueueStore(str(tmp_path)).load(entry.id, PRELOAD)
    assert item.data is None and item.size == len(body) and item.tls_optional
    assert sum(read) <= 2 * spool.HEAD_READ, read  # not the 2 MiB, nor PRELOAD's 256 KiB
    small = _entry()
    spool.enqueue(str(tmp_path), small, [b"Subject: small\r\n\r\n" + b"s" * 100_000])
    assert QueueStore(str(tmp_path)).load(small.id, PRELOAD).data == b"Subject: small\r\n\r\n" + (
        b"s" * 100_000
    )


def test_a_write_of_an_id_being_written_leaves_the_other_writer_s_file(tmp_path: Path) -> None:
    entry = _entry()
    (tmp_path / f"{entry.id}.tmp").write_bytes(b"being written")
    with pytest.raises(FileExistsError):
        spool.enqueue(str(tmp_path), entry, [b"Subject: x\r\n\r\n"])
    assert (tmp_path / f"{entry.id}.tmp").read_bytes() == b"being written"
