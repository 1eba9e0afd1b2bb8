"""Delivery helper processes (mailserv/helpers.py, mailserv/helper_child.py).

The child's loop is run in-process over real pipes (batches, the grouped directory
fsync and its failure, errors pickled back); the parent's pool with real child
processes on the running reactor (pytest-twisted); and the whole path through
``twistd mailserv`` (deliveries and queue entries written by the helpers, a
killed helper replaced, helpers gone with the daemon).
"""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from mailserv import durable, helper_child
from mailserv.config.sections import StoreSection
from mailserv.directory import User
from mailserv.envelope import Message
from mailserv.errors import QuotaExceeded, TemporaryFailure
from mailserv.helper_child import HEADER, frame, loads
from mailserv.helpers import DeliveryHelpers
from mailserv.queue import spool as qspool
from tests.support.process import test_config


def store_config(tmp_path: Path, **kw: Any) -> StoreSection:
    return StoreSection(format="maildir", path=str(tmp_path / "{localpart}"), **kw)


def user(tmp_path: Path, name: str = "alice", **kw: Any) -> User:
    return User(name=name, mailbox=str(tmp_path / name / "Maildir"), **kw)


def message(data: bytes = b"Subject: hi\r\n\r\nbody\r\n") -> Message:
    return Message(path=None, size=len(data), data=data)


def run_child(requests: list[Any]) -> list[Any]:
    """Feed ``requests`` to ``serve`` over a pipe, EOF, and return the replies."""
    rfd, wfd = os.pipe()
    out_r, out_w = os.pipe()
    os.write(wfd, b"".join(frame(r) for r in requests))
    os.close(wfd)
    try:
        assert helper_child.serve(rfd, out_w) == 0
    finally:
        os.close(rfd)
        os.close(out_w)
    data = b""
    while chunk := os.read(out_r, 65536):
        data += chunk
    os.close(out_r)
    replies = []
    while data:
        (length,) = HEADER.unpack_from(data)
        replies.append(loads(data[HEADER.size : HEADER.size + length]))
        data = data[HEADER.size + length :]
    return replies


def new_files(u: User, folder: str = "") -> list[Path]:
    base = Path(u.mailbox) / (f".{folder}" if folder else "") / "new"
    return sorted(base.iterdir()) if base.is_dir() else []


def test_child_delivers_a_batch_and_fsyncs_each_directory_once(
    tmp_path: Path, monkeypatch: Any
) -> None:
    synced: list[str] = []
    real = durable.fsync_dir
    monkeypatch.setattr(durable, "fsync_dir", lambda p: (synced.append(p), real(p)))
    alice, bob = user(tmp_path, "alice"), user(tmp_path, "bob")
    prefix = b"Return-Path: <s@example.org>\r\n"
    replies = run_child(
        [
            ("config", store_config(tmp_path)),
            *[(i, "deliver", (alice, None, True, prefix, message())) for i in range(1, 4)],
            (4, "deliver", (bob, None, True, prefix, message())),
        ]
    )
    assert [(rid, ok) for rid, ok, _ in replies] == [(1, True), (2, True), (3, True), (4, True)]
    assert len(new_files(alice)) == 3 and len(new_files(bob)) == 1
    assert new_files(alice)[0].read_bytes().startswith(prefix + b"Subject: hi")
    # The first delivery to a new maildir creates it (fsyncs of its own); then one fsync
    # of each new/ for the whole batch, not one per message.
    assert synced.count(str(Path(alice.mailbox) / "new")) == 1
    assert synced.count(str(Path(bob.mailbox) / "new")) == 1


def test_a_failed_directory_fsync_fails_every_job_it_covered(
    tmp_path: Path, monkeypatch: Any
) -> None:
    alice, bob = user(tmp_path, "alice"), user(tmp_path, "bob")
    run_child(  # make both maildirs first
        [("config", store_config(tmp_path))]
        + [(i, "deliver", (u, None, True, b"", message())) for i, u in enumerate((alice, bob))]
    )
    real = durable.fsync_dir
    alice_new = str(Path(alice.mailbox) / "new")

    def failing(path: str) -> None:
        if path == alice_new:
            raise OSError(5, "Input/output error")
        real(path)

    monkeypatch.setattr(durable, "fsync_dir", failing)
    replies = run_child(
        [
            ("config", store_config(tmp_path)),
            (1, "deliver", (alice, None, True, b"", message())),
            (2, "deliver", (bob, None, True, b"", message())),
            (3, "deliver", (alice, None, True, b"", message())),
        ]
    )
    assert [(rid, ok) for rid, ok, _ in replies] == [(1, False), (2, True), (3, False)]
    assert isinstance(replies[0][2], OSError) and replies[0][2].errno == 5


def test_errors_come_back_as_the_same_exception(tmp_path: Path) -> None:
    small = user(tmp_path, "alice", quota_bytes=10)
    replies = run_child(
        [
            ("config", store_config(tmp_path, over_quota="reject")),
            (7, "deliver", (small, None, True, b"", message(b"x" * 100))),
        ]
    )
    ((rid, ok, exc),) = replies
    assert (rid, ok) == (7, False)
    assert isinstance(exc, QuotaExceeded) and exc.permanent
    assert new_files(small) == []


def test_detail_folder_and_junk(tmp_path: Path) -> None:
    alice = user(tmp_path)
    replies = run_child(
        [
            ("config", store_config(tmp_path)),
            (1, "deliver", (alice, "nosuchfolder", True, b"", message())),
            (2, "deliver", (alice, "Junk", True, b"", message())),
        ]
    )
    assert [r[2] for r in replies] == [None, "Junk"]
    assert len(new_files(alice)) == 1 and len(new_files(alice, "Junk")) == 1


def test_child_delivers_to_mbox_users(tmp_path: Path) -> None:
    mbox_user = User(name="carol", mailbox=str(tmp_path / "carol.mbox"), store_format="mbox")
    replies = run_child(
        [
            ("config", store_config(tmp_path)),
            (1, "deliver", (mbox_user, None, True, b"Return-Path: <s@x>\r\n", message())),
            (2, "deliver", (mbox_user, None, True, b"", message(b"Subject: 2\r\n\r\nb\r\n"))),
        ]
    )
    assert [(rid, ok) for rid, ok, _ in replies] == [(1, True), (2, True)]
    data = (tmp_path / "carol.mbox").read_bytes()
    assert data.startswith(b"From ") and data.count(b"\nFrom ") == 1
    assert b"Return-Path: <s@x>\nSubject: hi\n" in data and b"Subject: 2\n" in data


def test_child_writes_queue_entries(tmp_path: Path) -> None:
    queue_dir = str(tmp_path / "queue")
    entry = qspool.QueueEntry(
        id=qspool.new_id(),
        sender="a@example.test",
        recipients=qspool.recipients_of([("b@remote.test", None, None, "pending", None)]),
    )
    msg = Message(path=None, size=6, data=b"body\r\n", prefix=b"Received: x\r\n")
    requests = [("config", store_config(tmp_path)), (1, "enqueue", (queue_dir, entry, msg))]
    ((_rid, ok, value),) = run_child(requests)
    assert ok and value == entry.id
    assert qspool.list_entries(queue_dir) == [entry.id]
    assert qspool.read_message(queue_dir, entry.id) == b"Received: x\r\nbody\r\n"


class SyncThreads:
    def __init__(self) -> None:
        self.calls = 0

    def run(self, pool: str, fn: Any, *args: Any) -> Any:
        self.calls += 1
        return defer.maybeDeferred(fn, *args)


def _alive(proto: Any) -> bool:
    return proto is not None and proto.alive


@pytest_twisted.inlineCallbacks
def test_pool_delivers_replaces_a_dead_child_and_falls_back_to_threads(
    tmp_path: Path, monkeypatch: Any
) -> Any:
    monkeypatch.setattr("mailserv.helpers.RESTART_MIN", 0.2)
    threads = SyncThreads()
    pool = DeliveryHelpers(1, store_config(tmp_path), threads, reactor)
    pool.startService()
    try:
        alice = user(tmp_path)
        args = (alice, None, True, b"", message())
        chosen = yield pool.run("deliver", args, lambda: "thread")
        assert chosen is None and threads.calls == 0
        (child_file,) = new_files(alice)
        child = pool.children[0]
        assert child is not None and f"P{child.transport.pid}Q" in child_file.name

        # A child that dies with a job in flight: the job fails temporarily (451).
        os.kill(child.transport.pid, signal.SIGSTOP)
        pending = pool.run("deliver", args, lambda: "thread")
        os.kill(child.transport.pid, signal.SIGKILL)
        with pytest.raises(TemporaryFailure):
            yield pending
        # No child now: the disk threads take the job.
        assert (yield pool.run("deliver", args, lambda: "thread")) == "thread"
        assert threads.calls == 1
        # ... until the replacement runs.
        for _ in range(50):
            if _alive(pool.children[0]):
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        assert _alive(pool.children[0]) and pool.children[0] is not child
        assert pool.restarts == 1 and pool.running_children() == 1
        assert (yield pool.run("deliver", args, lambda: "thread")) is None
        assert threads.calls == 1
    finally:
        yield pool.stopService()
    assert not any(_alive(p) for p in pool.children)


@pytest_twisted.inlineCallbacks
def test_jobs_for_one_mailbox_go_to_one_child(tmp_path: Path, monkeypatch: Any) -> Any:
    """Affinity by directory: shared batches, no cross-process lock contention; the other
    child takes them while that one is down."""
    import zlib

    monkeypatch.setattr("mailserv.helpers.RESTART_MIN", 30.0)
    pool = DeliveryHelpers(2, store_config(tmp_path), SyncThreads(), reactor)
    pool.startService()
    try:
        users = [user(tmp_path, f"u{i}") for i in range(8)]
        slot = {u.name: zlib.crc32(u.mailbox.encode()) % 2 for u in users}
        a = users[0]
        b = next(u for u in users if slot[u.name] != slot[a.name])
        for u in (a, a, a, b, b):
            yield pool.run("deliver", (u, None, True, b"", message()), lambda: "t", key=u.mailbox)
        pids = {u.name: {f.name.split("P")[1].split("Q")[0] for f in new_files(u)} for u in (a, b)}
        assert pids[a.name] == {str(pool.children[slot[a.name]].transport.pid)}
        assert pids[b.name] == {str(pool.children[slot[b.name]].transport.pid)}
        dead = pool.children[slot[a.name]]
        os.kill(dead.transport.pid, signal.SIGKILL)
        yield dead.ended
        yield pool.run("deliver", (a, None, True, b"", message()), lambda: "t", key=a.mailbox)
        other = str(pool.children[slot[b.name]].transport.pid)
        assert any(f"P{other}Q" in f.name for f in new_files(a))
    finally:
        yield pool.stopService()


@pytest_twisted.inlineCallbacks
def test_queue_entries_go_to_the_least_busy_child(tmp_path: Path) -> Any:
    """Queue writes have no affinity (key None): each goes to the child with the fewest jobs
    in flight, so the fsyncs of concurrent enqueues overlap in two processes."""
    pool = DeliveryHelpers(2, store_config(tmp_path), SyncThreads(), reactor)
    pool.startService()
    try:
        queue_dir = str(tmp_path / "queue")
        jobs = []
        for i in range(4):
            entry = qspool.QueueEntry(
                id=qspool.new_id(),
                sender="a@example.test",
                recipients=qspool.recipients_of(
                    [(f"b{i}@remote.test", None, None, "pending", None)]
                ),
            )
            jobs.append(pool.run("enqueue", (queue_dir, entry, message()), lambda: "t", key=None))
        assert [len(child.pending) for child in pool.children] == [2, 2]
        ids = yield defer.gatherResults(jobs)
        assert sorted(ids) == qspool.list_entries(queue_dir)
    finally:
        yield pool.stopService()


@pytest_twisted.inlineCallbacks
def test_a_child_that_stops_answering_is_replaced(tmp_path: Path, monkeypatch: Any) -> Any:
    monkeypatch.setattr("mailserv.helpers.JOB_TIMEOUT", 0.3)
    monkeypatch.setattr("mailserv.helpers.WATCH_INTERVAL", 0.1)
    monkeypatch.setattr("mailserv.helpers.RESTART_MIN", 0.1)
    pool = DeliveryHelpers(1, store_config(tmp_path), SyncThreads(), reactor)
    pool.startService()
    try:
        alice = user(tmp_path)
        args = (alice, None, True, b"", message())
        hung = pool.children[0]
        os.kill(hung.transport.pid, signal.SIGSTOP)  # as if stuck in a system call
        with pytest.raises(TemporaryFailure):
            yield pool.run("deliver", args, lambda: "t", key=alice.mailbox)
        for _ in range(50):
            if _alive(pool.children[0]):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        assert pool.children[0] is not hung
        assert (yield pool.run("deliver", args, lambda: "t", key=alice.mailbox)) is None
    finally:
        yield pool.stopService()


@pytest_twisted.inlineCallbacks
def test_reload_sends_the_new_store_section(tmp_path: Path) -> Any:
    from types import SimpleNamespace

    pool = DeliveryHelpers(1, store_config(tmp_path), SyncThreads(), reactor)
    pool.startService()
    try:
        alice = user(tmp_path)
        args = (alice, None, True, b"", message(b"x" * 1000))
        yield pool.run("deliver", args, lambda: "t", key=alice.mailbox)
        tight = store_config(tmp_path, quota=500, over_quota="reject")
        pool.reload(SimpleNamespace(store=tight, shutdown_timeout=5.0))
        with pytest.raises(QuotaExceeded):
            yield pool.run("deliver", args, lambda: "t", key=alice.mailbox)
        assert len(new_files(alice)) == 1
    finally:
        yield pool.stopService()


@pytest.mark.integration
def test_twistd_writes_mail_and_queue_entries_in_helper_processes(
    mailserv: Any, state_dir: Path
) -> None:
    (state_dir / "users.passwd").write_text("alice@example.test:{PLAIN}x::::::\n")
    config = test_config(
        state_dir,
        ["mx"],
        aliases={"fwd@example.test": ["someone@remote.test"]},
        queue={"relay_host": "127.0.0.1:1"},
    )
    process = mailserv.start(config)
    twistd_pid = process.proc.pid
    helpers = wait_children(twistd_pid, 2)  # [delivery] processes default
    with smtplib.SMTP("127.0.0.1", process.port("mx"), timeout=10) as s:
        s.sendmail("s@example.org", ["alice@example.test"], b"Subject: 1\r\n\r\none\r\n")
        s.sendmail("s@example.org", ["fwd@example.test"], b"Subject: 2\r\n\r\ntwo\r\n")
    maildir = state_dir / "mail" / "example.test" / "alice" / "Maildir" / "new"
    (delivered,) = list(maildir.iterdir())
    assert any(f"P{pid}Q" in delivered.name for pid in helpers)
    queue_dir = state_dir / "queue"
    assert len(qspool.list_entries(str(queue_dir))) == 1

    # A helper killed is replaced, and mail keeps flowing meanwhile.  (Once twistd has
    # reaped it: a job sent in the instant before that was in flight and gets 451.)
    os.kill(helpers[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{helpers[0]}") and time.monotonic() < deadline:
        time.sleep(0.01)
    with smtplib.SMTP("127.0.0.1", process.port("mx"), timeout=10) as s:
        s.sendmail("s@example.org", ["alice@example.test"], b"Subject: 3\r\n\r\nthree\r\n")
    now = wait_children(twistd_pid, 2, gone=helpers[0])
    assert helpers[0] not in now
    assert len(list(maildir.iterdir())) == 2

    process.proc.send_signal(signal.SIGTERM)
    process.proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in now) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in now)


def children_of(pid: int, needle: str) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True
    ).stdout
    return [int(line.split()[0]) for line in out.splitlines() if needle in line]


def wait_children(pid: int, count: int, gone: int = 0) -> list[int]:
    """The helper children of ``pid`` once there are ``count`` of them (and ``gone`` is not)."""
    deadline = time.monotonic() + 10
    while True:
        found = children_of(pid, "mailserv.helper_child")
        if (len(found) == count and gone not in found) or time.monotonic() > deadline:
            assert len(found) == count, found
            return found
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.integration
def test_killing_helpers_during_a_stream_loses_no_acknowledged_message(
    mailserv: Any, state_dir: Path
) -> None:
    """SIGKILL of delivery helpers (not of twistd) while 4 sessions send: every message
    answered 250 is in the maildir, whole; the others got 451 and the sessions go on."""
    import threading

    (state_dir / "users.passwd").write_text("alice@example.test:{PLAIN}x::::::\n")
    process = mailserv.start(test_config(state_dir, ["mx"]))
    port = process.port("mx")
    acked: list[str] = []
    refused: list[str] = []
    stop = threading.Event()
    body = (b"y" * 70 + b"\r\n") * 45

    def sender(n: int) -> None:
        i = 0
        while not stop.is_set():  # a new connection after max_messages_per_connection
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                while not stop.is_set():
                    mid = f"<kill-{n}-{i}@test>"
                    i += 1
                    data = f"Message-ID: {mid}\r\n\r\n".encode() + body
                    try:
                        s.sendmail("s@example.org", ["alice@example.test"], data)
                        acked.append(mid)
                    except smtplib.SMTPDataError as exc:
                        assert exc.smtp_code == 451, exc
                        refused.append(mid)
                    except smtplib.SMTPSenderRefused as exc:
                        assert exc.smtp_code == 421, exc
                        break

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    killed = 0
    for _ in range(6):
        time.sleep(0.4)
        for pid in children_of(process.proc.pid, "mailserv.helper_child"):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    time.sleep(2.5)  # restarted (1 s, then 2 s while they die young) and delivering again
    stop.set()
    for t in threads:
        t.join(30)
    assert killed >= 3 and len(acked) > 50
    maildir = state_dir / "mail" / "example.test" / "alice" / "Maildir"
    files = [p.read_bytes() for sub in ("new", "cur") for p in (maildir / sub).iterdir()]
    assert all(f.endswith(body) for f in files)  # no partial message visible
    stored = b"\n".join(files)
    assert [m for m in acked if m.encode() not in stored] == []
    print(f"{len(acked)} acknowledged, {len(refused)} refused with 451, {killed} helpers killed")
