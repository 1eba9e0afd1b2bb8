"""MULTIAPPEND (RFC 3502): several messages in one APPEND, all or none, with the
APPENDUID uid-set of UIDPLUS (RFC 4315 section 3)."""

from __future__ import annotations

import io
from typing import Any

import pytest

from mailserv.errors import QuotaExceeded
from mailserv.testing import SharedMemoryFolder
from tests.imap.harness import Env


def _multi(*messages: bytes, mailbox: bytes = b"INBOX") -> bytes:
    """One APPEND with a flag list and a date on the first message, then bare ones."""
    out = b"a APPEND " + mailbox
    for n, data in enumerate(messages):
        if n == 0:
            out += b' (\\Seen) "07-Feb-1994 21:52:25 -0800"'
        elif n == 1:
            out += b" ($Work \\Flagged)"
        out += b" {%d+}\r\n" % len(data) + data
    return out + b"\r\n"


def test_capability_lists_multiappend():
    s = Env().session()
    assert b" MULTIAPPEND" in s.login()


def test_multiappend_appends_every_message_in_order():
    env = Env()
    s = env.session()
    s.login()
    out = s.send(_multi(b"one\r\n", b"two\r\n", b"three\r\n"))
    assert out == b"a OK [APPENDUID 1000 1:3] APPEND completed\r\n"
    folder = env.store.account("alice").folders["INBOX"]
    assert [folder.messages[u][0] for u in (1, 2, 3)] == [b"one\r\n", b"two\r\n", b"three\r\n"]
    first, second, third = (folder.info(u) for u in (1, 2, 3))
    assert first.flags == {"\\Seen"} and first.internal_date == 760686745.0
    assert second.all_flags == {"\\Flagged", "$Work"}
    assert third.all_flags == set()


def test_multiappend_is_announced_once_to_other_sessions():
    env = Env()
    a = env.selected_session()
    assert a.cmd("i IDLE") == b"+ idling\r\n"
    b = env.session()
    b.login()
    b.send(_multi(b"one\r\n", b"two\r\n"))
    assert a.take() == b"* 2 EXISTS\r\n* 2 RECENT\r\n"


def test_multiappend_failing_in_the_store_appends_nothing(monkeypatch: pytest.MonkeyPatch):
    """RFC 3502 section 6.3.11: if the server fails to append any message, none is."""
    env = Env()
    watcher = env.selected_session()
    real = SharedMemoryFolder.append
    calls = []

    def append(self: Any, source: Any, flags: Any = (), internal_date: Any = None) -> int:
        calls.append(1)
        if len(calls) == 3:
            raise QuotaExceeded("over quota")
        return real(self, source, flags, internal_date)

    monkeypatch.setattr(SharedMemoryFolder, "append", append)
    s = env.session()
    s.login()
    out = s.send(_multi(b"one\r\n", b"two\r\n", b"three\r\n"))
    assert out == b"a NO [OVERQUOTA] Quota exceeded\r\n"
    assert env.store.account("alice").folders["INBOX"].messages == {}
    # the session that watches the mailbox never hears of the two rolled back
    watcher.env.clock.advance(1)
    assert watcher.cmd("n NOOP") == b"n OK NOOP completed\r\n"


def test_multiappend_with_an_empty_message_appends_nothing():
    env = Env()
    s = env.session()
    s.login()
    out = s.send(b"a APPEND INBOX {3+}\r\none {0+}\r\n\r\n")
    assert out.startswith(b"a NO ")
    assert env.store.account("alice").folders["INBOX"].messages == {}


def test_multiappend_with_a_malformed_second_message_appends_nothing():
    env = Env()
    s = env.session()
    s.login()
    out = s.send(b"a APPEND INBOX {3+}\r\none (\\Bogus) {3+}\r\ntwo\r\n")
    assert out.startswith(b"a BAD ")
    assert env.store.account("alice").folders["INBOX"].messages == {}


def test_multiappend_to_a_missing_mailbox_asks_to_create_it():
    s = Env().session()
    s.login()
    out = s.send(_multi(b"one\r\n", b"two\r\n", mailbox=b"Nope"))
    assert out == b"a NO [TRYCREATE] No such mailbox\r\n"


def test_multiappend_holds_many_messages_without_keeping_them_in_memory(
    monkeypatch: pytest.MonkeyPatch,
):
    """Once a command's literals pass the spool threshold the next ones go to
    temporary files, however small each is."""
    import tempfile

    from mailserv.imap import server as servermod
    from mailserv.imap.server import Settings

    spooled = []
    real = tempfile.TemporaryFile

    def temporary_file(*args: Any, **kw: Any) -> Any:
        spooled.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(servermod.tempfile, "TemporaryFile", temporary_file)
    env = Env(Settings(spool_threshold=1000))
    s = env.session()
    s.login()
    data = b"x" * 600 + b"\r\n"
    out = s.send(_multi(data, data, data))
    assert out == b"a OK [APPENDUID 1000 1:3] APPEND completed\r\n"
    assert len(spooled) == 2  # the first fits under the threshold, the others do not
    folder = env.store.account("alice").folders["INBOX"]
    assert [folder.messages[u][0] for u in (1, 2, 3)] == [data] * 3


class _Staged:
    """What a store's ``stage`` returns in these tests: the bytes, and whether discarded."""

    def __init__(self, data: bytes, locked: bool) -> None:
        self.data = data
        self.locked = locked
        self.discarded = False

    def discard(self) -> None:
        self.discarded = True


def _staging(monkeypatch: pytest.MonkeyPatch, env: Env, fail_at: int = 0) -> list[_Staged]:
    """Give the in-memory folder a ``stage`` (as the maildir store has) and an append
    that takes what it staged; ``fail_at``: the n-th append fails."""
    staged: list[_Staged] = []
    real = SharedMemoryFolder.append

    def stage(self: Any, source: Any, internal_date: Any = None) -> _Staged:
        shared = env.hub.hold(("alice", "INBOX"))
        assert shared is not None
        item = _Staged(source.read(), shared.lock.locked())
        env.hub.release(shared)
        staged.append(item)
        return item

    def append(self: Any, source: Any, flags: Any = (), internal_date: Any = None) -> int:
        assert isinstance(source, _Staged)
        if fail_at and source is staged[fail_at - 1]:
            raise QuotaExceeded("over quota")
        return real(self, io.BytesIO(source.data), flags, internal_date)

    monkeypatch.setattr(SharedMemoryFolder, "stage", stage, raising=False)
    monkeypatch.setattr(SharedMemoryFolder, "append", append)
    return staged


def test_append_to_an_open_mailbox_is_staged_before_the_folder_lock(
    monkeypatch: pytest.MonkeyPatch,
):
    """A store that can write a message ahead of its APPEND (maildir's ``stage``) does so
    outside the folder's write turn: the fsync of the data does not hold up other writers."""
    env = Env()
    watcher = env.selected_session()
    staged = _staging(monkeypatch, env)
    s = env.session()
    s.login()
    out = s.send(_multi(b"one\r\n", b"two\r\n"))
    assert out == b"a OK [APPENDUID 1000 1:2] APPEND completed\r\n"
    assert [(x.data, x.locked, x.discarded) for x in staged] == [
        (b"one\r\n", False, False),
        (b"two\r\n", False, False),
    ]
    folder = env.store.account("alice").folders["INBOX"]
    assert [folder.messages[u][0] for u in (1, 2)] == [b"one\r\n", b"two\r\n"]
    assert watcher.cmd("n NOOP").startswith(b"* 2 EXISTS")


def test_staged_messages_of_a_failed_multiappend_are_discarded(monkeypatch: pytest.MonkeyPatch):
    env = Env()
    env.selected_session()
    staged = _staging(monkeypatch, env, fail_at=2)
    s = env.session()
    s.login()
    out = s.send(_multi(b"one\r\n", b"two\r\n", b"three\r\n"))
    assert out == b"a NO [OVERQUOTA] Quota exceeded\r\n"
    assert env.store.account("alice").folders["INBOX"].messages == {}
    assert [x.discarded for x in staged] == [True, True, True]


def test_writes_announce_themselves_to_the_store_before_the_folder_lock(
    monkeypatch: pytest.MonkeyPatch,
):
    """A store that can batch its writers (maildir's ``batch``: one take of the dotlock
    for writes queued back to back) hears of each write before it waits for its turn."""
    import contextlib

    env = Env()
    watcher = env.selected_session()
    seen: list[tuple[str, bool]] = []

    @contextlib.contextmanager
    def batch(self: Any) -> Any:
        shared = env.hub.hold(("alice", "INBOX"))
        assert shared is not None
        seen.append(("enter", shared.lock.locked()))
        yield
        seen.append(("exit", shared.lock.locked()))
        env.hub.release(shared)

    monkeypatch.setattr(SharedMemoryFolder, "batch", batch, raising=False)
    s = env.selected_session()
    assert s.send(_multi(b"one\r\n")).endswith(b"APPEND completed\r\n")
    assert seen and seen[0] == ("enter", False) and seen[-1] == ("exit", False)
    assert watcher.cmd("n NOOP").endswith(b"n OK NOOP completed\r\n")
