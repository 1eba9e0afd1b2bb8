"""One conformance suite for every IMailStore provider (maildir and mbox).

Behaviour from RFC 3501 (UIDs §2.3.1.1, flags §2.3.2, internal date §2.3.3,
APPEND §6.3.11, COPY §6.4.7, EXPUNGE §6.4.3), RFC 4315 (UIDPLUS), RFC 6851
(MOVE), RFC 7162 (CONDSTORE modseq) and RFC 6154 (SPECIAL-USE).
"""

from __future__ import annotations

import io
import mailbox
import os
import time
from pathlib import Path
from typing import Any

import pytest
from zope.interface.verify import verifyObject

from mailserv.errors import FolderExists, InvalidFolderName, NoSuchFolder, QuotaExceeded
from mailserv.interfaces import IMailAccount, IMailbox, IMailStore
from mailserv.store import TooManyKeywords, store_for
from tests.store.helpers import checked_message, config, make_store, make_user

MSG = b"From: a@example.test\r\nSubject: hello\r\n\r\nbody line\r\nFrom the start\r\n"


class MailStoreConformance:
    """Mixin: subclasses set ``fmt``; the fixture gives self.store/self.user."""

    fmt = ""

    @pytest.fixture(autouse=True)
    def _setup(self, tmp_path: Path) -> None:
        self.tmp = str(tmp_path)
        self.cfg = config(format=self.fmt)
        self.store = make_store(self.fmt, self.cfg)
        self.user = make_user(self.tmp, self.fmt)

    def inbox(self) -> Any:
        return self.store.open(self.user).open_folder("INBOX")

    def read(self, box: Any, uid: int) -> bytes:
        with box.open_message(uid) as f:
            data: bytes = f.read()
            return data

    # -- interfaces and delivery ------------------------------------------

    def test_provides_interfaces(self) -> None:
        assert verifyObject(IMailStore, self.store)
        account = self.store.open(self.user)
        assert verifyObject(IMailAccount, account)
        assert verifyObject(IMailbox, account.open_folder("INBOX"))

    def test_store_for_chooses_by_user_format(self) -> None:
        assert type(store_for(self.user, config())) is type(self.store)

    def test_deliver_with_prefix_gives_exact_bytes(self) -> None:
        prefix = b"Return-Path: <s@example.test>\r\nDelivered-To: alice@example.test\r\n"
        self.store.deliver(self.user, io.BytesIO(MSG), prefix=prefix)
        box = self.inbox()
        [info] = box.messages()
        assert self.read(box, info.uid) == prefix + MSG
        assert info.size == len(prefix + MSG)
        assert info.flags == frozenset() and info.keywords == frozenset()

    def test_deliver_from_path_and_rewinds_file(self, tmp_path: Path) -> None:
        spool = tmp_path / "spool"
        spool.write_bytes(MSG)
        self.store.deliver(self.user, str(spool))
        f = io.BytesIO(MSG)
        f.seek(10)
        self.store.deliver(self.user, f)
        box = self.inbox()
        assert [self.read(box, i.uid) for i in box.messages()] == [MSG, MSG]

    def test_deliver_large_message_roundtrip(self) -> None:
        big = checked_message("big", 3 * 1024 * 1024)
        self.store.deliver(self.user, io.BytesIO(big))
        box = self.inbox()
        [info] = box.messages()
        assert info.size == len(big)
        assert self.read(box, info.uid) == big

    def test_from_lines_and_quoted_from_lines_survive(self) -> None:
        tricky = b"Subject: x\r\n\r\nFrom here\r\n>From there\r\n>>From far\r\nlast"
        self.store.deliver(self.user, io.BytesIO(tricky))
        self.store.deliver(self.user, io.BytesIO(MSG))
        box = self.inbox()
        first, second = box.messages()
        assert self.read(box, first.uid) == tricky + b"\r\n"[: 0 if self.fmt == "maildir" else 2]
        assert self.read(box, second.uid) == MSG

    def test_deliver_to_folder_creates_it(self) -> None:
        self.store.deliver(self.user, io.BytesIO(MSG), folder="Lists/Python")
        account = self.store.open(self.user)
        assert "Lists/Python" in account.list_folders()
        box = account.open_folder("Lists/Python")
        assert self.read(box, box.messages()[0].uid) == MSG

    def test_deliver_refuses_bad_folder(self) -> None:
        with pytest.raises(InvalidFolderName):
            self.store.deliver(self.user, io.BytesIO(MSG), folder="../../etc")

    # -- UIDs ---------------------------------------------------------------

    def test_uids_ascend_and_are_stable_across_reopen(self) -> None:
        for i in range(5):
            self.store.deliver(self.user, io.BytesIO(MSG + str(i).encode() + b"\r\n"))
        box = self.inbox()
        uids = [i.uid for i in box.messages()]
        assert uids == sorted(uids) and len(set(uids)) == 5
        assert box.uidnext() > uids[-1]
        validity = box.uidvalidity
        assert 0 < validity < 2**32
        again = make_store(self.fmt, self.cfg).open(self.user).open_folder("INBOX")
        assert [i.uid for i in again.messages()] == uids
        assert again.uidvalidity == validity
        for info in again.messages():
            assert self.read(again, info.uid).endswith(str(uids.index(info.uid)).encode() + b"\r\n")

    def test_new_messages_get_higher_uids_after_expunge(self) -> None:
        for i in range(3):
            self.store.deliver(self.user, io.BytesIO(MSG + str(i).encode() + b"\r\n"))
        box = self.inbox()
        uids = [i.uid for i in box.messages()]
        assert box.expunge([uids[2]]) == [uids[2]]
        self.store.deliver(self.user, io.BytesIO(MSG))
        box.refresh()
        assert [i.uid for i in box.messages()] == [uids[0], uids[1], uids[2] + 1]

    def test_open_unknown_uid_raises_key_error(self) -> None:
        with pytest.raises(KeyError):
            self.inbox().open_message(42)

    def test_refresh_reports_vanished_uids(self) -> None:
        for _ in range(2):
            self.store.deliver(self.user, io.BytesIO(MSG))
        mine, theirs = self.inbox(), self.inbox()
        uid = mine.messages()[0].uid
        theirs.expunge([uid])
        assert mine.refresh() == [uid]
        assert [i.uid for i in mine.messages()] == [uid + 1]

    def test_recreated_folder_gets_new_uidvalidity(self) -> None:
        account = self.store.open(self.user)
        account.create_folder("Tmp")
        first = account.open_folder("Tmp").uidvalidity
        account.delete_folder("Tmp")
        account.create_folder("Tmp")
        assert account.open_folder("Tmp").uidvalidity != first

    # -- flags, keywords, modseq -------------------------------------------

    def test_flags_and_keywords_persist_and_bump_modseq(self) -> None:
        self.store.deliver(self.user, io.BytesIO(MSG))
        box = self.inbox()
        uid = box.messages()[0].uid
        before = box.highest_modseq()
        info = box.set_flags(uid, ["\\Seen", "\\Flagged", "$Junk", "work"])
        assert info.flags == {"\\Seen", "\\Flagged"}
        assert info.keywords == {"$Junk", "work"}
        assert info.modseq > before and box.highest_modseq() == info.modseq
        again = self.inbox()
        assert again.message(uid).all_flags == {"\\Seen", "\\Flagged", "$Junk", "work"}
        assert again.message(uid).modseq == info.modseq
        same = again.set_flags(uid, ["\\Flagged", "\\Seen", "work", "$Junk"])
        assert same.modseq == info.modseq  # nothing changed, no new modseq
        cleared = again.set_flags(uid, ["\\Deleted"])
        assert cleared.flags == {"\\Deleted"} and cleared.keywords == frozenset()
        assert cleared.modseq > info.modseq

    def test_system_flags_are_case_insensitive_and_recent_ignored(self) -> None:
        self.store.deliver(self.user, io.BytesIO(MSG))
        box = self.inbox()
        info = box.set_flags(box.messages()[0].uid, ["\\SEEN", "\\answered", "\\Recent"])
        assert info.flags == {"\\Seen", "\\Answered"}

    def test_bad_flags_are_refused(self) -> None:
        self.store.deliver(self.user, io.BytesIO(MSG))
        box = self.inbox()
        uid = box.messages()[0].uid
        for bad in (["\\Bogus"], ["has space"], ["a" * 51], ["paren("]):
            with pytest.raises(ValueError):
                box.set_flags(uid, bad)
        with pytest.raises(KeyError):
            box.set_flags(uid + 100, ["\\Seen"])
        with pytest.raises(TooManyKeywords):  # LIMITS.md: 64 keywords per message
            box.set_flags(uid, [f"k{i}" for i in range(65)])

    def test_append_with_flags_and_internal_date(self) -> None:
        box = self.inbox()
        expected_uid = box.uidnext()
        uid = box.append(io.BytesIO(MSG), ["\\Draft", "$Forwarded"], 1_000_000_000.0)
        assert uid == expected_uid
        info = box.message(uid)
        assert info.all_flags == {"\\Draft", "$Forwarded"}
        assert info.internal_date == 1_000_000_000.0
        assert self.read(box, uid) == MSG
        assert box.uidnext() == uid + 1

    def test_append_then_deliver_keep_order(self) -> None:
        box = self.inbox()
        a = box.append(io.BytesIO(MSG))
        self.store.deliver(self.user, io.BytesIO(MSG))
        b = box.append(io.BytesIO(MSG))
        box.refresh()
        assert [i.uid for i in box.messages()] == [a, a + 1, b] and b == a + 2

    # -- copy, move, expunge -------------------------------------------------

    def test_copy_keeps_flags_and_source(self) -> None:
        for i in range(3):
            self.store.deliver(self.user, io.BytesIO(MSG + str(i).encode() + b"\r\n"))
        account = self.store.open(self.user)
        box, sent = account.open_folder("INBOX"), account.open_folder("Sent")
        uids = [i.uid for i in box.messages()]
        box.set_flags(uids[1], ["\\Seen", "label"])
        mapping = box.copy_to([uids[1], uids[2]], sent)
        assert sorted(mapping) == [uids[1], uids[2]]
        assert sorted(mapping.values()) == [i.uid for i in sent.messages()]
        assert sent.message(mapping[uids[1]]).all_flags == {"\\Seen", "label"}
        assert self.read(sent, mapping[uids[2]]) == MSG + b"2\r\n"
        assert [i.uid for i in box.messages()] == uids

    def test_move_removes_source(self) -> None:
        for i in range(2):
            self.store.deliver(self.user, io.BytesIO(MSG + str(i).encode() + b"\r\n"))
        account = self.store.open(self.user)
        box, trash = account.open_folder("INBOX"), account.open_folder("Trash")
        first, second = (i.uid for i in box.messages())
        mapping = box.move_to([first], trash)
        assert list(mapping) == [first]
        assert [i.uid for i in box.messages()] == [second]
        assert self.read(trash, mapping[first]) == MSG + b"0\r\n"
        assert self.read(box, second) == MSG + b"1\r\n"

    def test_expunge_returns_only_what_was_removed(self) -> None:
        for _ in range(3):
            self.store.deliver(self.user, io.BytesIO(MSG))
        box = self.inbox()
        uids = [i.uid for i in box.messages()]
        before = box.highest_modseq()
        assert box.expunge([uids[0], 999]) == [uids[0]]
        assert box.expunge([uids[0]]) == []
        assert box.highest_modseq() > before
        reopened = self.inbox()
        assert [i.uid for i in reopened.messages()] == uids[1:]
        assert all(self.read(reopened, u) == MSG for u in uids[1:])

    def test_expunged_since_gives_the_uids_expunged_after_a_modseq(self) -> None:
        """QRESYNC (RFC 7162 §3.2.5.2): UID FETCH ... (CHANGEDSINCE m VANISHED)."""
        for _ in range(6):
            self.store.deliver(self.user, io.BytesIO(MSG))
        box = self.inbox()
        start = box.highest_modseq()
        assert box.expunged_since(start) == []
        box.expunge([2])
        mid = box.highest_modseq()
        flagged = box.set_flags(3, ["\\Seen"])
        other = self.inbox()  # another session (or process) expunges too
        other.expunge([4, 5])
        box.refresh()
        for view in (box, self.inbox()):
            assert view.expunged_since(start) == [2, 4, 5]
            assert view.expunged_since(mid) == [4, 5]
            assert view.expunged_since(flagged.modseq) == [4, 5]
            assert view.expunged_since(view.highest_modseq()) == []
        box.move_to([1], self.store.open(self.user).open_folder("Archive"))
        assert self.inbox().expunged_since(start) == [1, 2, 4, 5]

    def test_expunged_since_includes_messages_removed_by_another_program(self) -> None:
        for i in range(3):
            self.store.deliver(self.user, io.BytesIO(MSG + b"%d\r\n" % i))
        box = self.inbox()
        start = box.highest_modseq()
        if self.fmt == "maildir":
            cur = os.path.join(self.user.mailbox, "cur")
            victim = next(n for n in os.listdir(cur) if n.startswith(box.message(2).key))
            os.unlink(os.path.join(cur, victim))
        else:  # Python's mailbox module rewrites the file under its own locks
            other = mailbox.mbox(self.user.mailbox)
            other.lock()
            try:
                other.remove(sorted(other.keys())[1])
                other.flush()
            finally:
                other.unlock()
                other.close()
        assert box.refresh() == [2]
        assert box.expunged_since(start) == [2]
        assert self.inbox().expunged_since(start) == [2]

    # -- folders -------------------------------------------------------------

    def test_special_use_folders_exist(self) -> None:
        account = self.store.open(self.user)
        names = account.list_folders()
        assert names[0] == "INBOX"
        for name in ("Sent", "Drafts", "Trash", "Junk", "Archive"):
            assert name in names
        assert account.special_use()["Sent"] == "\\Sent"
        assert account.special_use()["Junk"] == "\\Junk"

    def test_create_delete_rename_folders(self) -> None:
        account = self.store.open(self.user)
        account.create_folder("Projects/2024/Q1")
        assert {"Projects", "Projects/2024", "Projects/2024/Q1"} <= set(account.list_folders())
        with pytest.raises(FolderExists):
            account.create_folder("Projects/2024")
        with pytest.raises(FolderExists):
            account.create_folder("inbox")
        account.open_folder("Projects/2024").append(io.BytesIO(MSG))
        account.rename_folder("Projects", "Old/Projects")
        names = set(account.list_folders())
        assert {"Old/Projects", "Old/Projects/2024", "Old/Projects/2024/Q1"} <= names
        assert not any(n.startswith("Projects") for n in names)
        box = account.open_folder("Old/Projects/2024")
        assert self.read(box, box.messages()[0].uid) == MSG
        account.delete_folder("Old/Projects/2024/Q1")
        assert "Old/Projects/2024/Q1" not in account.list_folders()
        with pytest.raises(NoSuchFolder):
            account.open_folder("Old/Projects/2024/Q1")
        with pytest.raises(NoSuchFolder):
            account.delete_folder("Nope")
        with pytest.raises(InvalidFolderName):
            account.delete_folder("INBOX")

    def test_unicode_folder_names(self) -> None:
        account = self.store.open(self.user)
        account.create_folder("Entwürfe & Co/日本")
        assert "Entwürfe & Co/日本" in account.list_folders()
        account.open_folder("Entwürfe & Co/日本").append(io.BytesIO(MSG))

    @pytest.mark.parametrize(
        "name",
        ["", "a/../b", "..", "~root", "/abs", "a//b", "a.b", "x\x00", "tab\there", "w*", "w%"],
    )
    def test_invalid_folder_names(self, name: str) -> None:
        account = self.store.open(self.user)
        with pytest.raises(InvalidFolderName):
            account.create_folder(name)
        with pytest.raises(InvalidFolderName):
            account.open_folder(name, create=True)

    def test_open_missing_folder(self) -> None:
        account = self.store.open(self.user)
        with pytest.raises(NoSuchFolder):
            account.open_folder("Missing")
        account.open_folder("Missing", create=True)
        assert "Missing" in account.list_folders()

    def test_subscriptions_persist(self) -> None:
        account = self.store.open(self.user)
        account.subscribe("INBOX")
        account.subscribe("Lists/Python")
        account.subscribe("INBOX")
        account.unsubscribe("Nope")
        assert self.store.open(self.user).subscriptions() == ["INBOX", "Lists/Python"]
        account.unsubscribe("INBOX")
        assert self.store.open(self.user).subscriptions() == ["Lists/Python"]

    # -- quota ---------------------------------------------------------------

    def test_quota_bytes_tempfail_by_default(self) -> None:
        user = make_user(self.tmp, self.fmt, quota_bytes=1000)
        self.store.deliver(user, io.BytesIO(b"x" * 600))
        with pytest.raises(QuotaExceeded) as exc:
            self.store.deliver(user, io.BytesIO(b"y" * 600))
        assert exc.value.permanent is False
        used, limit, count, count_limit = self.store.open(user).quota()
        assert limit == 1000 and count == 1 and count_limit is None
        assert 600 <= used < 1000
        box = self.store.open(user).open_folder("INBOX")
        assert len(box.messages()) == 1

    def test_quota_reject_is_permanent_and_expunge_frees(self) -> None:
        store = make_store(self.fmt, config(format=self.fmt, over_quota="reject"))
        user = make_user(self.tmp, self.fmt, quota_messages=2)
        store.deliver(user, io.BytesIO(MSG))
        store.deliver(user, io.BytesIO(MSG))
        with pytest.raises(QuotaExceeded) as exc:
            store.deliver(user, io.BytesIO(MSG))
        assert exc.value.permanent is True
        box = store.open(user).open_folder("INBOX")
        with pytest.raises(QuotaExceeded):
            box.append(io.BytesIO(MSG))
        box.expunge([box.messages()[0].uid])
        assert store.open(user).quota()[2] == 1
        store.deliver(user, io.BytesIO(MSG))

    def test_quota_from_config_when_user_has_none(self) -> None:
        store = make_store(self.fmt, config(format=self.fmt, quota=500))
        store.deliver(self.user, io.BytesIO(b"x" * 400))
        with pytest.raises(QuotaExceeded):
            store.deliver(self.user, io.BytesIO(b"x" * 400))
        assert store.open(self.user).quota()[1] == 500

    def test_quota_survives_lost_maildirsize(self) -> None:
        self.store.deliver(self.user, io.BytesIO(b"x" * 300))
        self.store.deliver(self.user, io.BytesIO(b"x" * 300))
        account = self.store.open(self.user)
        used = account.quota()[0]
        for root, _dirs, files in os.walk(self.tmp):
            if "maildirsize" in files:
                os.unlink(os.path.join(root, "maildirsize"))
        assert self.store.open(self.user).quota()[0] == used


class TestMaildirConformance(MailStoreConformance):
    fmt = "maildir"


class TestMboxConformance(MailStoreConformance):
    fmt = "mbox"


def _age(paths: list[str], seconds: float = 10.0) -> None:
    then = time.time() - seconds
    for p in paths:
        if os.path.exists(p):
            os.utime(p, (then, then))


@pytest.mark.parametrize("fmt", ["maildir", "mbox"])
def test_refresh_reads_nothing_when_nothing_changed(
    fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IMAP polls refresh() twice a second: unchanged folders cost a few stat calls."""
    store = make_store(fmt)
    user = make_user(str(tmp_path), fmt)
    store.deliver(user, io.BytesIO(MSG))
    box = store.open(user).open_folder("INBOX")
    uid = box.messages()[0].uid
    if fmt == "maildir":
        watched = [os.path.join(user.mailbox, n) for n in ("dovecot-uidlist", "new", "cur")]
        reader = "_read_uidlist"
    else:
        watched = [user.mailbox, box.index_path]
        reader = "_load"
    _age(watched)
    box.refresh()  # (the mbox index records the mbox's new mtime: it is written again)
    _age(watched[1:])
    box.refresh()  # settled: remembers what the files look like
    calls = []
    original = getattr(type(box), reader)
    monkeypatch.setattr(type(box), reader, lambda self: calls.append(1) or original(self))
    assert box.refresh() == []
    assert calls == []
    # Another process changes a flag: the folder is read again at once.
    make_store(fmt).open(user).open_folder("INBOX").set_flags(uid, ["\\Seen"])
    box.refresh()
    assert calls and box.message(uid).flags == {"\\Seen"}
