"""Dotlocks (Dovecot uidlist, mbox) and the mbox fcntl lock, with real processes."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailserv.directory import User
from mailserv.durable import hostname
from mailserv.store.dotlock import DotLock, LockTimeout
from tests.store.helpers import checked_message, config, make_store, read_tags, verify_message


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_dotlock_excludes_and_releases(tmp_path: Path) -> None:
    path = str(tmp_path / "f.lock")
    first = DotLock(path)
    first.acquire()
    assert Path(path).read_text() == f"{os.getpid()}:{hostname()}\n"
    second = DotLock(path, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(LockTimeout):
        second.acquire()  # held by a live process (us): never stale
    assert time.monotonic() - started >= 0.2
    first.release()
    second.acquire()
    second.release()
    assert not os.path.exists(path)
    assert os.listdir(tmp_path) == []  # no temp files left behind


def test_dotlock_of_a_dead_process_is_broken_at_once(tmp_path: Path) -> None:
    path = tmp_path / "f.lock"
    path.write_text(f"{dead_pid()}:{hostname()}\nappend 123\n")
    lock = DotLock(str(path), timeout=5)
    started = time.monotonic()
    lock.acquire()
    assert time.monotonic() - started < 1
    assert lock.broken_content is not None and b"append 123" in lock.broken_content
    lock.release()


def test_foreign_dotlock_is_stale_only_after_the_timeout(tmp_path: Path) -> None:
    path = tmp_path / "f.lock"
    path.write_text("")  # procmail/mutt style: no pid we can check
    with pytest.raises(LockTimeout):
        DotLock(str(path), stale_timeout=500, timeout=0.2).acquire()
    old = time.time() - 501
    os.utime(path, (old, old))
    lock = DotLock(str(path), stale_timeout=500, timeout=1)
    lock.acquire()
    lock.release()


def test_other_host_pid_is_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / "f.lock"
    path.write_text(f"{dead_pid()}:some-other-host\n")
    with pytest.raises(LockTimeout):
        DotLock(str(path), stale_timeout=500, timeout=0.2).acquire()


@contextlib.contextmanager
def fcntl_locked(path: str) -> Iterator[None]:
    """Another process (as mutt or Postfix would) holds an fcntl lock on ``path``."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl,sys\n"
            f"f=open({path!r},'r+b'); fcntl.lockf(f, fcntl.LOCK_EX)\n"
            "print('locked', flush=True); sys.stdin.readline()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        yield
    finally:
        assert holder.stdin is not None
        holder.stdin.write(b"\n")
        holder.stdin.close()
        holder.wait()


def mbox_user(tmp_path: Path) -> User:
    return User(name="alice", mailbox=str(tmp_path / "mbox"), store_format="mbox")


def test_mbox_waits_for_a_mutt_style_dotlock(tmp_path: Path) -> None:
    user = mbox_user(tmp_path)
    store = make_store("mbox", lock_attempts=3, lock_delay=0.05)
    Path(user.mailbox + ".lock").write_text("")
    with pytest.raises(LockTimeout):
        store.deliver(user, io.BytesIO(checked_message("x")))
    assert not os.path.exists(user.mailbox) or os.path.getsize(user.mailbox) == 0
    os.unlink(user.mailbox + ".lock")
    store.deliver(user, io.BytesIO(checked_message("x")))


def test_mbox_respects_an_fcntl_lock_held_by_another_process(tmp_path: Path) -> None:
    user = mbox_user(tmp_path)
    store = make_store("mbox", lock_attempts=4, lock_delay=0.05)
    store.deliver(user, io.BytesIO(checked_message("first")))
    with fcntl_locked(user.mailbox):
        with pytest.raises(LockTimeout):
            store.deliver(user, io.BytesIO(checked_message("blocked")))
        assert not os.path.exists(user.mailbox + ".lock")  # the dotlock was given back
    store.deliver(user, io.BytesIO(checked_message("second")))
    box = store.open(user).open_folder("INBOX")
    assert read_tags(box) == ["first", "second"]


class FailingSource(io.RawIOBase):
    """A spool file whose disk fails after some bytes."""

    def __init__(self, data: bytes, fail_at: int) -> None:
        self.data, self.pos, self.fail_at = data, 0, fail_at

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        if self.pos >= self.fail_at:
            raise OSError(5, "Input/output error")
        n = min(len(b), self.fail_at - self.pos)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


@pytest.mark.parametrize("fmt", ["mbox", "maildir"])
def test_failed_write_leaves_nothing_behind(fmt: str, tmp_path: Path) -> None:
    user = User(
        name="alice",
        mailbox=str(tmp_path / ("mbox" if fmt == "mbox" else "Maildir")),
        store_format=fmt,
    )
    store = make_store(fmt, config(format=fmt))
    store.deliver(user, io.BytesIO(checked_message("kept")))
    size_before = os.path.getsize(user.mailbox) if fmt == "mbox" else 0
    big = checked_message("lost", 300_000)
    with pytest.raises(OSError):
        store.deliver(user, io.BufferedReader(FailingSource(big, 200_000)))
    if fmt == "mbox":
        assert os.path.getsize(user.mailbox) == size_before  # truncated back
        assert not os.path.exists(user.mailbox + ".lock")
    else:
        assert os.listdir(os.path.join(user.mailbox, "tmp")) == []
    box = store.open(user).open_folder("INBOX")
    assert len(box.messages()) == 1


def test_half_written_mbox_append_of_a_dead_writer_is_undone(tmp_path: Path) -> None:
    user = mbox_user(tmp_path)
    store = make_store("mbox")
    store.deliver(user, io.BytesIO(checked_message("complete")))
    good = os.path.getsize(user.mailbox)
    with open(user.mailbox, "ab") as f:  # what a writer killed mid-append leaves
        f.write(b"From MAILER-DAEMON Thu Jan  1 00:00:00 2026\nSubject: lost\nX-Tag: lost\n")
    Path(user.mailbox + ".lock").write_text(f"{dead_pid()}:{hostname()}\nappend {good}\n")
    store.deliver(user, io.BytesIO(checked_message("after")))
    box = store.open(user).open_folder("INBOX")
    assert read_tags(box) == ["complete", "after"]


def test_uidlist_lock_of_a_dead_process_does_not_block(tmp_path: Path) -> None:
    user = User(name="alice", mailbox=str(tmp_path / "Maildir"))
    store = make_store("maildir")
    store.deliver(user, io.BytesIO(checked_message("a")))
    lock = Path(user.mailbox) / "dovecot-uidlist.lock"
    lock.write_text(f"{dead_pid()}:{hostname()}\n")
    started = time.monotonic()
    box = store.open(user).open_folder("INBOX")
    assert [i.uid for i in box.messages()] == [1]
    assert time.monotonic() - started < 2
    assert not lock.exists()


def test_stale_tmp_files_are_removed_on_open(tmp_path: Path) -> None:
    """Maildir: tmp/ files untouched for 36 hours are a dead delivery's leftovers."""
    user = User(name="alice", mailbox=str(tmp_path / "Maildir"))
    store = make_store("maildir")
    store.open(user)
    tmp = Path(user.mailbox) / "tmp"
    old, fresh = tmp / "1.M1P1.host", tmp / "2.M2P2.host"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"being written")
    then = time.time() - 37 * 3600
    os.utime(old, (then, then))
    box = store.open(user).open_folder("INBOX")
    assert sorted(os.listdir(tmp)) == ["2.M2P2.host"]
    assert box.messages() == []


@pytest.mark.parametrize("fmt", ["mbox", "maildir"])
def test_threads_of_one_process_share_the_locks(fmt: str, tmp_path: Path) -> None:
    """The disk pool delivers and synchronises from several threads at once."""
    import threading

    user = User(
        name="alice",
        mailbox=str(tmp_path / ("mbox" if fmt == "mbox" else "Maildir")),
        store_format=fmt,
    )
    store = make_store(fmt)
    box = store.open(user).open_folder("INBOX")
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(15):
                store.deliver(user, io.BytesIO(checked_message(f"t{n}-{i}")))
                box.refresh()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    box.refresh()
    infos = box.messages()
    assert len({i.uid for i in infos}) == 90
    tags = set()
    for info in infos:
        with box.open_message(info.uid) as f:
            tags.add(verify_message(f.read()))
    assert tags == {f"t{n}-{i}" for n in range(6) for i in range(15)}


def test_repair_note_survives_a_failed_lock_attempt(tmp_path: Path) -> None:
    """The dead writer's note is kept on disk until someone holding the lock repairs."""
    user = mbox_user(tmp_path)
    store = make_store("mbox", lock_attempts=3, lock_delay=0.05)
    store.deliver(user, io.BytesIO(checked_message("complete")))
    good = os.path.getsize(user.mailbox)
    with open(user.mailbox, "ab") as f:
        f.write(b"From MAILER-DAEMON Thu Jan  1 00:00:00 2026\nSubject: lost\n")
    Path(user.mailbox + ".lock").write_text(f"{dead_pid()}:{hostname()}\nappend {good}\n")
    with fcntl_locked(user.mailbox):
        with pytest.raises(LockTimeout):
            store.deliver(user, io.BytesIO(checked_message("blocked")))
        assert os.path.exists(user.mailbox + ".lock.repair")
    box = store.open(user).open_folder("INBOX")
    assert read_tags(box) == ["complete"]
    assert not os.path.exists(user.mailbox + ".lock.repair")


@pytest.mark.parametrize("fmt", ["mbox", "maildir"])
def test_one_folder_object_shared_by_threads(fmt: str, tmp_path: Path) -> None:
    """IMAP sessions of one process share a folder: flags, expunge and reads at once."""
    import threading

    user = User(
        name="alice",
        mailbox=str(tmp_path / ("mbox" if fmt == "mbox" else "Maildir")),
        store_format=fmt,
    )
    store = make_store(fmt, config(format=fmt, fsync=False))
    for i in range(40):
        store.deliver(user, io.BytesIO(checked_message(f"s{i}")))
    box = store.open(user).open_folder("INBOX")
    uids = [i.uid for i in box.messages()]
    errors: list[BaseException] = []

    def flagger() -> None:
        for uid in uids:
            try:
                box.set_flags(uid, ["\\Seen", f"kw{uid % 5}"])
            except KeyError:
                pass  # expunged by the other thread
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

    def expunger() -> None:
        try:
            box.expunge(uids[::3])
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    def reader() -> None:
        try:
            for _ in range(5):
                box.refresh()
                for info in box.messages():
                    try:
                        with box.open_message(info.uid) as f:
                            verify_message(f.read())
                    except KeyError:
                        pass
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=t) for t in (flagger, expunger, reader, reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    left = store.open(user).open_folder("INBOX").messages()
    assert [i.uid for i in left] == [u for u in uids if u not in uids[::3]]
    assert all(i.flags == {"\\Seen"} for i in left)
    modseqs = [i.modseq for i in left]
    assert len(set(modseqs)) == len(modseqs)  # each flag change got its own modseq
