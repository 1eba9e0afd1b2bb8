"""Flag changes go to the per-folder modseq journal, not into dovecot-uidlist.

RFC 7162 section 3.1: every change of a message's flags gets a new, higher
mod-sequence and the folder's HIGHESTMODSEQ is the largest one given out;
these tests pin that the journal keeps this across instances, processes,
folding, torn lines and lost entries, while the uidlist is rewritten (and
fsynced) only when UIDs are given out or messages expunged.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailserv.directory import User
from mailserv.store import maildir
from mailserv.store.uidlist import JOURNAL_NAME, UIDLIST_NAME, parse_uidlist
from tests.store.helpers import make_store

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def user(tmp_path: Path) -> User:
    return User(name="alice", mailbox=str(tmp_path / "Maildir"))


def _box(user: User, count: int = 3) -> maildir.MaildirFolder:
    store = make_store("maildir")
    for i in range(count):
        store.deliver(user, io.BytesIO(b"Subject: %d\r\n\r\nbody\r\n" % i))
    return store.open(user).open_folder("INBOX")


def _reopen(user: User) -> maildir.MaildirFolder:
    return make_store("maildir").open(user).open_folder("INBOX")


def _fsync_counter(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    fsyncs: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        fsyncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    return fsyncs


def test_flag_change_leaves_uidlist_alone_and_fsyncs_only_the_journal(
    user: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = _box(user)
    uidlist = Path(user.mailbox, UIDLIST_NAME)
    before = (uidlist.stat().st_ino, uidlist.read_bytes())
    fsyncs = _fsync_counter(monkeypatch)
    top = box.highest_modseq()
    info = box.set_flags(2, ["\\Seen"])
    # One fsync, of the journal: a modseq handed out must survive a power failure (RFC 7162 §3).
    assert len(fsyncs) == 1
    assert (uidlist.stat().st_ino, uidlist.read_bytes()) == before
    assert info.modseq == top + 1 and box.highest_modseq() == top + 1
    journal = Path(user.mailbox, JOURNAL_NAME).read_text().splitlines()
    validity = box.uidvalidity
    assert journal[0] == f"V{validity}" and journal[1] == f"F{top}"  # expunges recorded after
    assert journal[2].startswith(f"2 {top + 1} ") and journal[2].endswith(":2,S")


def test_journal_is_read_by_other_instances_and_after_reopen(user: User) -> None:
    box = _box(user)
    other = _reopen(user)
    a = box.set_flags(1, ["\\Flagged"])
    b = other.set_flags(2, ["\\Seen"])  # sees a's change: the next modseq
    assert b.modseq == a.modseq + 1
    c = box.set_flags(3, ["\\Answered"])  # and box sees b's
    assert c.modseq == b.modseq + 1
    again = _reopen(user)
    infos = {i.uid: i for i in again.messages()}
    assert infos[1].flags == {"\\Flagged"} and infos[1].modseq == a.modseq
    assert infos[2].flags == {"\\Seen"} and infos[2].modseq == b.modseq
    assert infos[3].flags == {"\\Answered"} and infos[3].modseq == c.modseq
    assert again.highest_modseq() == c.modseq
    box.refresh()
    assert box.message(2).flags == {"\\Seen"} and box.message(2).modseq == b.modseq


def test_expunge_appends_to_the_journal_and_leaves_the_uidlist(
    user: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = _box(user, 1000)
    flagged = box.set_flags(2, ["\\Seen"])
    uidlist = Path(user.mailbox, UIDLIST_NAME)
    before = (uidlist.stat().st_ino, uidlist.read_bytes())
    fsyncs = _fsync_counter(monkeypatch)
    assert box.expunge([1, *range(3, 101)]) == [1, *range(3, 101)]
    # cur/ once for the unlinks, the journal once for the line that records them all.
    assert len(fsyncs) == 2
    assert (uidlist.stat().st_ino, uidlist.read_bytes()) == before
    journal = Path(user.mailbox, JOURNAL_NAME).read_text().splitlines()
    assert journal[-1] == f"X{flagged.modseq + 1} 1,3:100"
    for again in (box, _reopen(user)):
        assert [i.uid for i in again.messages()] == [2, *range(101, 1001)]
        assert again.message(2).modseq == flagged.modseq
        assert again.highest_modseq() == flagged.modseq + 1
        assert again.expunged_since(flagged.modseq) == [1, *range(3, 101)]


def test_bulk_expunge_rewrites_the_uidlist_once(
    user: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POP3 QUIT after reading everything: most records dead, so compact now."""
    box = _box(user, 1000)
    top = box.highest_modseq()
    box.expunge([1])
    fsyncs = _fsync_counter(monkeypatch)
    assert box.expunge(range(2, 1000)) == list(range(2, 1000))
    # cur/, the new uidlist, the journal (expunge history only), the folder.
    assert len(fsyncs) == 4
    ul = parse_uidlist(Path(user.mailbox, UIDLIST_NAME).read_bytes())
    assert [r.uid for r in ul.records] == [1000] and ul.highest_modseq == top + 2
    journal = Path(user.mailbox, JOURNAL_NAME).read_text().splitlines()
    assert journal[1:] == [f"F{top}", f"X{top + 1} 1", f"X{top + 2} 2:999"]
    again = _reopen(user)
    assert [i.uid for i in again.messages()] == [1000]
    assert again.expunged_since(top) == list(range(1, 1000))
    assert again.expunged_since(top + 1) == list(range(2, 1000))


def test_folding_rewrites_the_uidlist_and_keeps_the_expunge_history(
    user: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = _box(user, 4)
    top = box.highest_modseq()
    flagged = box.set_flags(2, ["\\Seen"])
    box.expunge([1])
    monkeypatch.setattr(maildir, "JOURNAL_FOLD", 10)
    box.expunge([3])  # the journal is now past the limit: fold
    ul = parse_uidlist(Path(user.mailbox, UIDLIST_NAME).read_bytes())
    assert [r.uid for r in ul.records] == [2, 4]
    rec = ul.records[0]
    assert rec.modseq == flagged.modseq and rec.filename.endswith(":2,S")
    assert ul.highest_modseq == flagged.modseq + 2
    journal = Path(user.mailbox, JOURNAL_NAME).read_text().splitlines()
    assert journal[1:] == [f"F{top}", f"X{flagged.modseq + 1} 1", f"X{flagged.modseq + 2} 3"]
    again = _reopen(user)
    assert [i.uid for i in again.messages()] == [2, 4]
    assert again.message(2).modseq == flagged.modseq
    assert again.expunged_since(top) == [1, 3]
    assert again.expunged_since(flagged.modseq + 1) == [3]


def test_expunge_history_is_bounded_and_then_answers_with_a_superset(
    user: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(maildir, "EXPUNGE_HISTORY", 2)
    monkeypatch.setattr(maildir, "JOURNAL_FOLD", 10)
    box = _box(user, 6)
    top = box.highest_modseq()
    box.expunge([1, 2])
    box.expunge([4])
    box.expunge([5])  # folds: only the last two UIDs' expunges are kept
    again = _reopen(user)
    assert again.expunged_since(top + 1) == [4, 5]
    # Before the history kept: every UID not present, including 1 and 2 (a superset is allowed).
    assert again.expunged_since(top) == [1, 2, 4, 5]
    assert again.expunged_since(0) == [1, 2, 4, 5]


def test_new_uids_are_appended_to_the_uidlist(user: User, monkeypatch: pytest.MonkeyPatch) -> None:
    box = _box(user, 3)
    uidlist = Path(user.mailbox, UIDLIST_NAME)
    before = (uidlist.stat().st_ino, uidlist.read_bytes())
    store = make_store("maildir")
    store.deliver(user, io.BytesIO(b"Subject: 4\r\n\r\nbody\r\n"))
    fsyncs = _fsync_counter(monkeypatch)
    uid = box.append(io.BytesIO(b"Subject: 5\r\n\r\nbody\r\n"), ["\\Seen"])
    assert uid == 5
    assert len(fsyncs) == 3  # the message, cur/, the uidlist
    assert uidlist.stat().st_ino == before[0]
    data = uidlist.read_bytes()
    assert data.startswith(before[1])
    assert data[len(before[1]) :].count(b"\n") == 2  # the delivered one, then the appended one
    ul = parse_uidlist(data)
    assert ul.nextuid == 6 and ul.highest_modseq == box.highest_modseq()
    again = _reopen(user)
    assert [i.uid for i in again.messages()] == [1, 2, 3, 4, 5]
    assert again.message(5).flags == {"\\Seen"} and again.uidnext() == 6


def test_torn_uidlist_append_is_ignored_then_cut(user: User) -> None:
    box = _box(user, 2)
    uidlist = Path(user.mailbox, UIDLIST_NAME)
    with uidlist.open("ab") as f:
        f.write(b"3 M9 :17956")  # a writer killed in the middle of an append
    again = _reopen(user)
    assert again.uidvalidity == box.uidvalidity
    assert [i.uid for i in again.messages()] == [1, 2]
    make_store("maildir").deliver(user, io.BytesIO(b"Subject: 3\r\n\r\nbody\r\n"))
    again.refresh()
    assert [i.uid for i in again.messages()] == [1, 2, 3]
    assert b"17956\n" not in uidlist.read_bytes() and uidlist.read_bytes().endswith(b"\n")
    assert [r.uid for r in parse_uidlist(uidlist.read_bytes()).records] == [1, 2, 3]


def test_journal_is_folded_when_it_grows(user: User, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maildir, "JOURNAL_FOLD", 300)
    box = _box(user)
    journal = Path(user.mailbox, JOURNAL_NAME)
    last = None
    for i in range(12):
        last = box.set_flags(1 + i % 3, ["\\Seen"] if i % 2 else [])
        assert not journal.exists() or journal.stat().st_size <= 300
    assert last is not None
    ul = parse_uidlist(Path(user.mailbox, UIDLIST_NAME).read_bytes())
    assert ul.highest_modseq >= last.modseq - 5  # folded at least once meanwhile
    again = _reopen(user)
    assert again.highest_modseq() == last.modseq
    assert again.message(last.uid).flags == last.flags


def test_torn_last_line_is_ignored_and_ended(user: User) -> None:
    box = _box(user)
    first = box.set_flags(1, ["\\Seen"])
    journal = Path(user.mailbox, JOURNAL_NAME)
    with journal.open("ab") as f:
        f.write(b"2 999")  # a crash in the middle of an append
    again = _reopen(user)
    assert again.highest_modseq() == first.modseq
    assert again.message(2).flags == frozenset()
    nxt = again.set_flags(2, ["\\Draft"])
    assert nxt.modseq == first.modseq + 1
    assert _reopen(user).message(2).modseq == nxt.modseq


def test_journal_of_another_uidvalidity_is_dropped(user: User) -> None:
    box = _box(user)
    Path(user.mailbox, JOURNAL_NAME).write_text("V1\n1 500 nothing:2,S\n")
    again = _reopen(user)
    assert again.highest_modseq() < 500 and again.message(1).flags == frozenset()
    assert not Path(user.mailbox, JOURNAL_NAME).exists()
    info = again.set_flags(1, ["\\Seen"])
    assert _reopen(user).message(1).modseq == info.modseq
    assert box.uidvalidity == again.uidvalidity


def test_lost_journal_entry_still_gives_a_new_modseq(user: User) -> None:
    """A crash may lose a flag change's journal line; the renamed file is seen again."""
    box = _box(user)
    top = box.highest_modseq()
    box.set_flags(3, ["\\Seen"])
    Path(user.mailbox, JOURNAL_NAME).unlink()
    again = _reopen(user)
    assert again.message(3).flags == {"\\Seen"}
    assert again.message(3).modseq > top and again.highest_modseq() > top


def test_expunge_finds_a_file_renamed_by_another_program(user: User) -> None:
    box = _box(user)
    box.set_flags(1, ["\\Seen"])
    cur = Path(user.mailbox, "cur")
    [name] = [n for n in os.listdir(cur) if n.endswith(":2,S")]
    os.rename(cur / name, cur / (name + "T"))  # mutt marks it deleted meanwhile
    assert box.expunge([1]) == [1]
    assert len(os.listdir(cur)) == 2
    assert [i.uid for i in _reopen(user).messages()] == [2, 3]


WORKER = """
import json, sys
from mailserv.directory import User
from tests.store.helpers import make_store
mailbox, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
box = make_store("maildir").open(User(name="alice", mailbox=mailbox)).open_folder("INBOX")
out = {}
for uid in range(first, first + count):
    out[uid] = box.set_flags(uid, ["\\\\Seen", "kw%d" % (uid % 3)]).modseq
print(json.dumps(out))
"""


@pytest.mark.slow
def test_processes_flagging_at_once_get_distinct_modseqs(user: User) -> None:
    box = _box(user, 120)
    top = box.highest_modseq()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, user.mailbox, str(1 + 30 * n), "30"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        for n in range(4)
    ]
    given: dict[int, int] = {}
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        given.update({int(k): v for k, v in json.loads(out).items()})
    assert sorted(given) == list(range(1, 121))
    assert sorted(given.values()) == list(range(top + 1, top + 121))  # one each, no gaps
    again = _reopen(user)
    assert again.highest_modseq() == top + 120
    for info in again.messages():
        assert info.modseq == given[info.uid]
        assert info.flags == {"\\Seen"} and info.keywords == {f"kw{info.uid % 3}"}
    box.refresh()
    assert box.highest_modseq() == top + 120


def test_index_kept_in_memory_still_sees_outside_changes(user: User) -> None:
    """The parsed uidlist is reused under the lock, but the files are always listed."""
    box = _box(user)
    cur = Path(user.mailbox, "cur")
    [first] = [n for n in os.listdir(cur) if n.startswith(box.message(1).key)]
    os.unlink(cur / first)  # expunged by another program
    top = box.highest_modseq()
    new = box.append(io.BytesIO(b"Subject: appended\r\n\r\nbody\r\n"))  # as many as before
    assert [i.uid for i in box.messages()] == [2, 3, 4] and new == 4
    with pytest.raises(KeyError):
        box.message(1)
    assert box.highest_modseq() > top
    again = _reopen(user)
    assert [(i.uid, i.modseq) for i in again.messages()] == [
        (i.uid, i.modseq) for i in box.messages()
    ]


def test_uidlist_ending_in_a_huge_torn_line_is_rewritten(user: User) -> None:
    box = _box(user, 2)
    uidlist = Path(user.mailbox, UIDLIST_NAME)
    with uidlist.open("ab") as f:
        f.write(b"3 M9 :" + b"x" * 70_000)  # no newline anywhere in the last 64 KiB
    make_store("maildir").deliver(user, io.BytesIO(b"Subject: 3\r\n\r\nbody\r\n"))
    again = _reopen(user)
    assert again.uidvalidity == box.uidvalidity
    assert [i.uid for i in again.messages()] == [1, 2, 3]
    assert [r.uid for r in parse_uidlist(uidlist.read_bytes()).records] == [1, 2, 3]
