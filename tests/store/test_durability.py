"""Concurrency and crash tests with real processes and real files.

- 20 processes deliver 50 messages each into one mailbox at once while they
  also hand out UIDs: 1000 complete messages, 1000 distinct UIDs, every
  process saw the same UID for the same message, UIDs stable after reopening
  (with ``fsync = false``: this one is about locks and UIDs, and runs in
  seconds instead of waiting for 1000 serialised disk flushes).
- A writer killed with SIGKILL at random points, 200 times per store: no
  partial message is ever visible, and every delivery that returned is there
  with the UID it was first seen with.
"""

from __future__ import annotations

import io
import json
import mailbox
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailserv.directory import User
from tests.store.helpers import checked_message, make_store, verify_message

ROOT = Path(__file__).resolve().parents[2]
WORKERS = 20
PER_WORKER = 50
KILLS = 200


def mailbox_for(fmt: str, tmp_path: Path) -> str:
    return str(tmp_path / ("mbox" if fmt == "mbox" else "Maildir"))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["maildir", "mbox"])
def test_twenty_processes_deliver_at_once(fmt: str, tmp_path: Path) -> None:
    path = mailbox_for(fmt, tmp_path)
    start = time.time() + 2.0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [str(PER_WORKER), repr(start)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.store.worker", fmt, path, str(n), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for n in range(WORKERS)
    ]
    views: list[dict[str, str]] = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err.decode()[-2000:]
        views.append(json.loads(out)["seen"])
    # Every process saw the same message under the same UID.
    by_uid: dict[str, set[str]] = {}
    for view in views:
        for uid, key in view.items():
            by_uid.setdefault(uid, set()).add(key)
    assert all(len(keys) == 1 for keys in by_uid.values())
    assert len({next(iter(k)) for k in by_uid.values()}) == len(by_uid)

    box = make_store(fmt).open(User("alice", path, fmt)).open_folder("INBOX")
    infos = box.messages()
    assert len(infos) == WORKERS * PER_WORKER
    assert len({i.uid for i in infos}) == WORKERS * PER_WORKER
    tags = set()
    for info in infos:
        assert by_uid[str(info.uid)] == {info.key}
        with box.open_message(info.uid) as f:
            tags.add(verify_message(f.read()))
    assert tags == {f"w{n}-{i}" for n in range(WORKERS) for i in range(PER_WORKER)}
    again = make_store(fmt).open(User("alice", path, fmt)).open_folder("INBOX")
    assert [(i.uid, i.key) for i in again.messages()] == [(i.uid, i.key) for i in infos]
    assert again.uidvalidity == box.uidvalidity


def _child(fmt: str, path: str, round_no: int, ack: int) -> None:
    """Deliver until killed; write each tag to ``ack`` once deliver() returned."""
    try:
        store = make_store(fmt)
        user = User("alice", path, fmt)
        box = None
        for i in range(1000):
            tag = f"k{round_no}-{i}"
            size = random.choice((200, 5_000, 80_000))
            store.deliver(user, io.BytesIO(checked_message(tag, size)))
            os.write(ack, tag.encode() + b"\n")
            if i % 2:  # also die while handing out UIDs
                box = box or store.open(user).open_folder("INBOX")
                box.refresh()
    finally:
        os._exit(0)


def _wait_for_acks(fd: int, count: int, timeout: float = 10.0) -> bytes:
    """Read from the child's pipe until ``count`` deliveries were acknowledged."""
    data = b""
    deadline = time.monotonic() + timeout
    while data.count(b"\n") < count:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError("the writer made no progress")
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["maildir", "mbox"])
def test_sigkill_never_leaves_a_partial_message(fmt: str, tmp_path: Path) -> None:
    path = mailbox_for(fmt, tmp_path)
    rng = random.Random(4155)
    acknowledged: set[str] = set()
    uid_of: dict[str, int] = {}
    verified: set[str] = set()
    validity: dict[str, int] = {}
    store = make_store(fmt, lock_stale=500.0) if fmt == "mbox" else make_store(fmt)
    deadline = time.monotonic() + 90
    for round_no in range(KILLS):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            _child(fmt, path, round_no, write_end)
        os.close(write_end)
        # Let it finish 0-3 deliveries (whatever the machine's load), then kill it
        # at a random point of the next ones.
        received = _wait_for_acks(read_end, rng.randint(0, 3))
        time.sleep(rng.uniform(0.0, 0.01))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(read_end, "rb") as pipe:
            received += pipe.read()
        acknowledged |= {line.decode() for line in received.split(b"\n") if line}
        # Through the store (which repairs what the dead writer left under its lock).
        box = store.open(User("alice", path, fmt)).open_folder("INBOX")
        # A reader killed while appending to the index never costs the folder its UIDs.
        assert validity.setdefault("first", box.uidvalidity) == box.uidvalidity
        present = {}
        for info in box.messages():
            if info.key not in verified:
                with box.open_message(info.uid) as f:
                    tag = verify_message(f.read())
                verified.add(info.key)
                uid_of.setdefault(tag, info.uid)
            present[info.uid] = info
        assert {uid_of[t] for t in acknowledged} <= set(present), "a delivered message is lost"
        if fmt == "maildir":  # nothing half written in new/ or cur/, whatever the index says
            for sub in ("new", "cur"):
                for name in os.listdir(os.path.join(path, sub)):
                    if name.split(",S=")[0] not in verified:
                        verify_message(Path(path, sub, name).read_bytes())
                        verified.add(name.split(",S=")[0])
        assert time.monotonic() < deadline, f"only {round_no} kills in the time budget"
    # The whole file, read by another program, holds only complete messages.
    if fmt == "mbox":
        tags = [verify_message(m.as_bytes()) for m in mailbox.mbox(path, create=False)]
    else:
        md = mailbox.Maildir(path, factory=None, create=False)
        tags = [verify_message(md.get_bytes(k)) for k in md.keys()]
    assert acknowledged <= set(tags)
    assert len(tags) == len(set(tags))
    final = store.open(User("alice", path, fmt)).open_folder("INBOX")
    assert {uid_of[t] for t in tags} == {i.uid for i in final.messages()}
    assert len(acknowledged) > KILLS // 2  # the writer did get work done between kills
