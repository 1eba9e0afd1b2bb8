"""Maildir specifics: file names, info letters, dovecot-keywords, delivery layout."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pytest

from mailserv.directory import User
from mailserv.store import TooManyKeywords
from tests.store.helpers import make_store

MSG = b"Subject: x\r\n\r\nbody\r\n"


@pytest.fixture
def user(tmp_path: Path) -> User:
    return User(name="alice", mailbox=str(tmp_path / "Maildir"))


def test_delivery_lands_in_new_with_size_fields(user: User) -> None:
    name = make_store("maildir").deliver(user, io.BytesIO(MSG), prefix=b"Delivered-To: a\r\n")
    size = len(MSG) + len(b"Delivered-To: a\r\n")
    assert name.endswith(f",S={size},W={size}")
    assert os.listdir(Path(user.mailbox, "new")) == [name]
    assert os.listdir(Path(user.mailbox, "tmp")) == []
    sec, rest = name.split(".", 1)
    assert sec.isdigit() and rest.startswith("M") and f"P{os.getpid()}Q" in rest


def test_big_messages_are_copied_whole_and_their_crlf_size_counted(
    user: User, tmp_path: Path
) -> None:
    """Past the first write (256 KiB) the copy goes through a reused buffer; bare LFs
    are counted there too, unless the source says it has only CRLF (an SMTP message,
    ``Message.crlf``), whose CRLF size is its size."""
    from mailserv.envelope import Message

    store = make_store("maildir")
    crlf = b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 40_000  # 3.2 MB
    lf = crlf.replace(b"\r\n", b"\n")
    spool = tmp_path / "spool"
    for data, trusted in ((crlf, False), (lf, False), (crlf, True)):
        spool.write_bytes(data)
        with Message(str(spool), len(data), crlf=trusted).open() as source:
            assert getattr(source, "crlf_only", False) is trusted
            name = store.deliver(user, source, prefix=b"Delivered-To: a\r\n")
        size = len(data) + 17
        wsize = size + data.count(b"\n") - data.count(b"\r\n")
        assert name.endswith(f",S={size},W={wsize}")
        assert Path(user.mailbox, "new", name).read_bytes() == b"Delivered-To: a\r\n" + data


def test_info_letters_and_unknown_letters_are_kept(user: User) -> None:
    store = make_store("maildir")
    store.deliver(user, io.BytesIO(MSG))
    box = store.open(user).open_folder("INBOX")
    [info] = box.messages()
    cur = Path(user.mailbox, "cur")
    [name] = os.listdir(cur)
    assert name.endswith(":2,")
    os.rename(cur / name, cur / (name + "P"))  # "passed", set by another MUA
    box.refresh()
    box.set_flags(info.uid, ["\\Draft", "\\Flagged", "\\Answered", "\\Seen", "\\Deleted"])
    [name] = os.listdir(cur)
    assert name.endswith(":2,DFPRST")


def test_keywords_use_dovecot_letters_up_to_26(user: User) -> None:
    store = make_store("maildir")
    store.deliver(user, io.BytesIO(MSG))
    box = store.open(user).open_folder("INBOX")
    uid = box.messages()[0].uid
    box.set_flags(uid, [f"kw{i:02d}" for i in range(26)])
    keywords = Path(user.mailbox, "dovecot-keywords").read_text().splitlines()
    assert keywords[0] == "0 kw00" and keywords[25] == "25 kw25"
    [name] = os.listdir(Path(user.mailbox, "cur"))
    assert name.endswith(":2,abcdefghijklmnopqrstuvwxyz")
    with pytest.raises(TooManyKeywords):
        box.set_flags(uid, ["one-too-many"])
    assert box.message(uid).keywords == {f"kw{i:02d}" for i in range(26)}


def test_external_flag_change_bumps_modseq(user: User) -> None:
    store = make_store("maildir")
    store.deliver(user, io.BytesIO(MSG))
    box = store.open(user).open_folder("INBOX")
    info = box.messages()[0]
    cur = Path(user.mailbox, "cur")
    [name] = os.listdir(cur)
    os.rename(cur / name, cur / (name + "S"))  # mutt marks it read
    assert box.refresh() == []
    after = box.message(info.uid)
    assert after.flags == {"\\Seen"} and after.modseq > info.modseq
    assert box.highest_modseq() == after.modseq


def test_message_list_is_reused_until_something_changes(user: User) -> None:
    store = make_store("maildir")
    for _ in range(3):
        store.deliver(user, io.BytesIO(MSG))
    box = store.open(user).open_folder("INBOX")
    first = box.messages()
    box.refresh()
    again = box.messages()
    assert again == first and all(a is b for a, b in zip(again, first, strict=True))
    again.clear()  # the caller's copy
    assert len(box.messages()) == 3
    box.set_flags(1, ["\\Seen", "$Work"])
    assert box.messages()[0].all_flags == {"\\Seen", "$Work"}
    store.deliver(user, io.BytesIO(MSG))
    box.refresh()
    assert [i.uid for i in box.messages()] == [1, 2, 3, 4]
    box.expunge([2])
    assert [i.uid for i in box.messages()] == [1, 3, 4]
    other = store.open(user).open_folder("INBOX")
    other.set_flags(3, ["\\Flagged"])
    box.refresh()
    assert box.messages()[1].flags == {"\\Flagged"}


def test_first_deliveries_at_once_create_the_maildir_once(tmp_path: Path) -> None:
    """SMTP delivers concurrently through the disk pool, also into a mailbox not yet made."""
    store = make_store("maildir")
    errors: list[BaseException] = []
    for round_no in range(20):
        user = User(name="alice", mailbox=str(tmp_path / f"Maildir{round_no}"))
        start = threading.Barrier(8)

        def deliver(user: User = user, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                store.deliver(user, io.BytesIO(MSG))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=deliver) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(os.listdir(Path(user.mailbox, "new"))) == 8 - len(errors)
    assert errors == []


def test_delivery_from_a_missing_source_fails(user: User, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        make_store("maildir").deliver(user, str(tmp_path / "nothing"))
    assert os.listdir(Path(user.mailbox, "tmp")) == []


def test_append_does_not_list_the_directories(user: User, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our own APPEND knows its file: its uidlist record is appended without a scan."""
    from mailserv.store import maildir

    store = make_store("maildir")
    for _ in range(3):
        store.deliver(user, io.BytesIO(MSG))
    box = store.open(user).open_folder("INBOX")
    assert len(box.messages()) == 3
    listed: list[str] = []
    real = maildir._listdir
    monkeypatch.setattr(maildir, "_listdir", lambda d: listed.append(d) or real(d))
    uid = box.append(io.BytesIO(MSG), ["\\Seen"])
    assert [os.path.basename(d) for d in listed] == ["new"]  # empty: no delivery waits
    assert uid == 4 and box.message(uid).flags == {"\\Seen"}
    assert box.message(uid).modseq == box.highest_modseq()
    monkeypatch.setattr(maildir, "_listdir", real)
    # the index on disk says the same to a fresh reader
    again = make_store("maildir").open(user).open_folder("INBOX")
    assert [(m.uid, m.flags, m.modseq) for m in again.messages()] == [
        (m.uid, m.flags, m.modseq) for m in box.messages()
    ]


def test_delivery_waiting_in_new_gets_its_uid_before_an_append(user: User) -> None:
    store = make_store("maildir")
    store.deliver(user, io.BytesIO(MSG))
    box = store.open(user).open_folder("INBOX")
    store.deliver(user, io.BytesIO(b"Subject: later\r\n\r\n\r\n"))  # not seen yet
    uid = box.append(io.BytesIO(MSG))
    uids = [m.uid for m in box.messages()]
    assert uids == [1, 2, uid] and uid == 3  # arrival order
    assert os.listdir(Path(user.mailbox, "new")) == []
    reread = make_store("maildir").open(user).open_folder("INBOX")
    assert [m.uid for m in reread.messages()] == uids


def test_append_after_an_external_uidlist_change_reads_it_first(user: User) -> None:
    """Another process (Dovecot) gave UIDs meanwhile: the append continues after them."""
    store = make_store("maildir")
    store.deliver(user, io.BytesIO(MSG))
    box = store.open(user).open_folder("INBOX")
    other = make_store("maildir").open(user).open_folder("INBOX")
    store.deliver(user, io.BytesIO(MSG))
    other.refresh()  # gives UID 2 in the other process
    uid = box.append(io.BytesIO(MSG))
    assert uid == 3
    assert [m.uid for m in box.messages()] == [1, 2, 3]


def test_staged_append_writes_the_message_before_the_lock(
    user: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stage() writes and fsyncs the file; append() of it only places it and gives its UID."""
    from mailserv.store import maildir

    store = make_store("maildir")
    box = store.open(user).open_folder("INBOX")
    staged = box.stage(io.BytesIO(MSG), 1_000_000_000.0)
    [name] = os.listdir(Path(user.mailbox, "tmp"))
    assert Path(user.mailbox, "tmp", name).read_bytes() == MSG
    writes: list[str] = []
    real = maildir.write_message
    monkeypatch.setattr(
        maildir, "write_message", lambda *a, **k: writes.append("w") or real(*a, **k)
    )
    uid = box.append(staged, ["\\Flagged"], 1_000_000_000.0)
    assert writes == []
    assert os.listdir(Path(user.mailbox, "tmp")) == []
    info = box.message(uid)
    assert info.flags == {"\\Flagged"} and info.internal_date == 1_000_000_000.0
    with box.open_message(uid) as f:
        assert f.read() == MSG
    staged.discard()  # after the append: nothing to remove, no error
    assert len(box.messages()) == 1


def test_a_staged_message_never_appended_is_discarded(user: User) -> None:
    box = make_store("maildir").open(user).open_folder("INBOX")
    staged = box.stage(io.BytesIO(MSG))
    staged.discard()
    assert os.listdir(Path(user.mailbox, "tmp")) == []
    box.refresh()
    assert box.messages() == []


def test_writes_of_a_batch_take_the_dotlock_once(
    user: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers queued for a folder (``batch()``) share one take of dovecot-uidlist.lock."""
    from mailserv.store.dotlock import DotLock

    store = make_store("maildir")
    for _ in range(3):
        store.deliver(user, io.BytesIO(MSG))
    box = store.open(user).open_folder("INBOX")
    takes: list[str] = []
    real = DotLock._try_link
    monkeypatch.setattr(DotLock, "_try_link", lambda self: takes.append("t") or real(self))
    lock = Path(user.mailbox, "dovecot-uidlist.lock")
    with box.batch():
        box.set_flags(1, ["\\Seen"])
        assert lock.exists()  # still held for the next writer of the batch
        box.set_flags(2, ["\\Seen"])
        box.append(io.BytesIO(MSG))
        box.expunge([3])
    assert not lock.exists()
    assert takes == ["t"]
    box.set_flags(1, [])  # outside a batch: taken and given back at once
    assert takes == ["t", "t"] and not lock.exists()
    again = make_store("maildir").open(user).open_folder("INBOX")
    assert [(m.uid, m.flags) for m in again.messages()] == [
        (1, frozenset()),
        (2, {"\\Seen"}),
        (4, frozenset()),
    ]


def test_another_writer_gets_the_dotlock_when_the_batch_ends(user: User) -> None:
    store = make_store("maildir")
    store.deliver(user, io.BytesIO(MSG))
    box = store.open(user).open_folder("INBOX")
    other = make_store("maildir").open(user).open_folder("INBOX")  # as another program
    done = threading.Event()
    with box.batch():
        box.set_flags(1, ["\\Seen"])
        t = threading.Thread(target=lambda: (other.set_flags(1, ["\\Flagged"]), done.set()))
        t.start()
        assert not done.wait(0.2)  # waits for the dotlock the batch holds
    assert done.wait(10)
    t.join()
    box.refresh()
    assert box.message(1).flags == {"\\Flagged"}


def test_a_batch_trusts_its_index_while_it_keeps_the_dotlock(
    user: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nobody else can change the uidlist or the journal while the dotlock is ours:
    writes after the first of a batch do not stat them again before writing."""
    from mailserv.store import maildir

    store = make_store("maildir")
    for _ in range(2):
        store.deliver(user, io.BytesIO(MSG))
    box = store.open(user).open_folder("INBOX")
    other = make_store("maildir").open(user).open_folder("INBOX")
    stats: list[str] = []
    real = maildir._stat3
    monkeypatch.setattr(maildir, "_stat3", lambda p: stats.append(os.path.basename(p)) or real(p))
    with box.batch():
        box.set_flags(1, ["\\Seen"])
        del stats[:]
        box.set_flags(2, ["\\Seen"])
        first_write = stats.index("cur")  # _cur_ours() just before the rename
        assert "dovecot-uidlist" not in stats[:first_write]
    other.set_flags(1, ["\\Flagged"])  # another program, once the batch is over
    box.set_flags(2, ["\\Seen", "\\Answered"])  # sees that change first
    assert box.message(1).flags == {"\\Flagged"}
    assert box.highest_modseq() == other.highest_modseq() + 1


def test_reading_a_message_does_not_wait_for_a_write_in_progress(user: User) -> None:
    """FETCH reads many messages; a writer holding the folder (its fsyncs) must not hold
    them up, unless the file was renamed under the reader (then it waits and looks again)."""
    store = make_store("maildir")
    store.deliver(user, io.BytesIO(MSG))
    box = store.open(user).open_folder("INBOX")
    held, release = threading.Event(), threading.Event()

    def writer() -> None:
        with box._mutex:
            held.set()
            release.wait(10)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert held.wait(10)
        done = threading.Event()
        result: list[bytes] = []

        def read() -> None:
            with box.open_message(1) as f:
                result.append(f.read())
            done.set()

        threading.Thread(target=read, daemon=True).start()
        assert done.wait(2), "open_message waited for the writer"
        assert result == [MSG]
    finally:
        release.set()
        t.join()
    cur = Path(user.mailbox, "cur")
    [name] = os.listdir(cur)
    os.rename(cur / name, cur / (name + "S"))  # renamed by another program
    with box.open_message(1) as f:
        assert f.read() == MSG


def test_read_messages_reads_small_messages_in_bulk(user: User) -> None:
    """POP3 read-ahead: uid -> text of each message, a gone one left out."""
    store = make_store("maildir")
    texts = [MSG + b"n%d\r\n" % n * (n + 1) for n in range(5)]
    for text in texts:
        store.deliver(user, io.BytesIO(text))
    box = store.open(user).open_folder("INBOX")
    uids = [i.uid for i in box.messages()]
    assert box.read_messages(uids) == dict(zip(uids, texts, strict=True))
    assert box.read_messages([uids[1], 999]) == {uids[1]: texts[1]}


def test_read_messages_finds_a_renamed_file_and_leaves_out_a_removed_one(user: User) -> None:
    store = make_store("maildir")
    for n in range(3):
        store.deliver(user, io.BytesIO(MSG + b"%d\r\n" % n))
    box = store.open(user).open_folder("INBOX")
    uids = [i.uid for i in box.messages()]
    cur = Path(user.mailbox, "cur")
    names = sorted(os.listdir(cur))
    by_uid = {uid: box._by_uid[uid].filename for uid in uids}
    assert sorted(by_uid.values()) == names
    os.rename(cur / by_uid[uids[0]], cur / (by_uid[uids[0]] + "S"))  # a flag change elsewhere
    os.unlink(cur / by_uid[uids[2]])  # removed by another program
    assert box.read_messages(uids) == {uids[0]: MSG + b"0\r\n", uids[1]: MSG + b"1\r\n"}


def test_read_messages_gives_an_lf_file_crlf_and_reads_past_a_wrong_size(user: User) -> None:
    """A file whose name has no sizes (procmail, LF) is read through its CRLF view; a file
    longer than its name says is read whole."""
    store = make_store("maildir")
    store.deliver(user, io.BytesIO(MSG))
    cur = Path(user.mailbox, "cur")
    Path(user.mailbox, "new", "1700000000.P1Q1.host").write_bytes(b"Subject: y\n\nlf\n")
    box = store.open(user).open_folder("INBOX")
    [lf] = [u for u, r in box._by_uid.items() if r.filename.startswith("1700000000.")]
    [crlf] = [u for u in box._by_uid if u != lf]
    (cur / box._by_uid[crlf].filename).write_bytes(MSG + b"x" * 100_000)  # bigger than ,S=
    assert box.read_messages([crlf, lf]) == {
        crlf: MSG + b"x" * 100_000,
        lf: b"Subject: y\r\n\r\nlf\r\n",
    }
