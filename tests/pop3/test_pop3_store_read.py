"""The read-ahead over a real maildir: the store's bulk read, with files renamed or gone."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from mailserv.directory import User
from mailserv.pop3.content import stuff
from mailserv.pop3.mailbox import Maildrop
from tests.store.helpers import make_store

MSG = b"Subject: m\r\n\r\n.dot line\r\nbody %d\r\n"


def maildrop(tmp_path: Path, count: int) -> tuple[Maildrop, Path]:
    user = User(name="alice", mailbox=str(tmp_path / "Maildir"))
    store = make_store("maildir")
    for n in range(count):
        store.deliver(user, io.BytesIO(MSG % n))
    box = store.open(user).open_folder("INBOX")
    return Maildrop(box, box.messages(), None), Path(user.mailbox, "cur")


def test_read_ahead_uses_the_stores_bulk_read(tmp_path: Path) -> None:
    drop, _ = maildrop(tmp_path, 3)
    calls: list[list[int]] = []
    bulk = drop.mailbox.read_messages
    drop.mailbox.read_messages = lambda uids: calls.append(list(uids)) or bulk(uids)
    uids = [drop.uid(n) for n in (1, 2, 3)]
    found = drop.read_messages(uids)
    assert calls == [uids]
    for n, uid in enumerate(uids):
        data, body, end = found[uid]
        assert data == MSG % n and body + end == stuff(MSG % n)


def test_read_ahead_follows_a_renamed_file_and_skips_a_gone_one(tmp_path: Path) -> None:
    drop, cur = maildrop(tmp_path, 3)
    uids = [drop.uid(n) for n in (1, 2, 3)]
    names = {uid: drop.mailbox._by_uid[uid].filename for uid in uids}
    os.rename(cur / names[uids[1]], cur / (names[uids[1]] + "S"))  # flag change elsewhere
    os.unlink(cur / names[uids[2]])
    found = drop.read_messages(uids)
    assert sorted(found) == uids[:2] and found[uids[1]][0] == MSG % 1
    with pytest.raises(KeyError):  # the message a RETR waits for is gone: -ERR as before
        drop.read_messages([uids[2], uids[0]])
    assert list(drop.read_messages([uids[2], uids[0]], required=False)) == [uids[0]]
