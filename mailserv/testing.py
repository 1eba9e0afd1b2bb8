"""In-memory fakes of mailserv's interfaces, for component and protocol tests.

Each fake implements the real interface from mailserv.interfaces, nothing
more; packages add their own fakes here (additive edits only).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from zope.interface import implementer

from mailserv.interfaces import IMailAccount, IMailbox, IMailStore

# --------------------------------------------------------------------------
# Stores (used by the POP3 tests)


@dataclass
class MemoryMessageInfo:
    """What ``IMailbox.messages()`` lists for one message."""

    uid: int
    size: int
    flags: frozenset[str] = frozenset()
    modseq: int = 1


@implementer(IMailbox)
class MemoryMailbox:
    """An IMailbox held in a dict: uid -> message bytes (CRLF line ends)."""

    def __init__(self, messages: Iterable[bytes] = (), uidvalidity: int = 1) -> None:
        self.uidvalidity = uidvalidity
        self.contents: dict[int, bytes] = {}
        self._next_uid = 1
        self.expunged: list[list[int]] = []
        self.closed = 0
        self.fail_expunge: BaseException | None = None
        for m in messages:
            self.add(m)

    def add(self, data: bytes) -> int:
        uid = self._next_uid
        self._next_uid += 1
        self.contents[uid] = data
        return uid

    def refresh(self) -> list[int]:
        return []

    def messages(self) -> list[MemoryMessageInfo]:
        return [MemoryMessageInfo(uid, len(data)) for uid, data in sorted(self.contents.items())]

    def uidnext(self) -> int:
        return self._next_uid

    def highest_modseq(self) -> int:
        return 1

    def open_message(self, uid: int) -> io.BytesIO:
        return io.BytesIO(self.contents[uid])

    def set_flags(self, uid: int, flags: Any) -> MemoryMessageInfo:
        return MemoryMessageInfo(uid, len(self.contents[uid]), frozenset(flags))

    def append(self, source: Any, flags: Any = (), internal_date: float | None = None) -> int:
        return self.add(source.read())

    def copy_to(self, uids: Any, target: Any) -> dict[int, int]:
        return {uid: target.add(self.contents[uid]) for uid in uids}

    def expunge(self, uids: Any) -> list[int]:
        if self.fail_expunge is not None:
            raise self.fail_expunge
        uids = list(uids)
        self.expunged.append(uids)
        return [uid for uid in uids if self.contents.pop(uid, None) is not None]

    def close(self) -> None:
        self.closed += 1


@implementer(IMailAccount)
class MemoryAccount:
    """The folders of one user of a MemoryMailStore."""

    def __init__(self) -> None:
        self.folders: dict[str, MemoryMailbox] = {"INBOX": MemoryMailbox()}

    def list_folders(self) -> list[str]:
        return sorted(self.folders)

    def open_folder(self, name: str, create: bool = False) -> MemoryMailbox:
        if name not in self.folders and create:
            self.folders[name] = MemoryMailbox()
        return self.folders[name]

    def create_folder(self, name: str) -> None:
        self.folders[name] = MemoryMailbox()

    def delete_folder(self, name: str) -> None:
        del self.folders[name]

    def rename_folder(self, old: str, new: str) -> None:
        self.folders[new] = self.folders.pop(old)

    def quota(self) -> tuple[int, None, int, None]:
        inbox = self.folders["INBOX"]
        return sum(map(len, inbox.contents.values())), None, len(inbox.contents), None


@implementer(IMailStore)
@dataclass
class MemoryMailStore:
    """An IMailStore keeping every user's account in memory (by user name)."""

    accounts: dict[str, MemoryAccount] = field(default_factory=dict)

    def account(self, name: str) -> MemoryAccount:
        return self.accounts.setdefault(name, MemoryAccount())

    def deliver(self, user: Any, source: Any, folder: str | None = None) -> int:
        return (
            self.account(user.name).open_folder(folder or "INBOX", create=True).add(source.read())
        )

    def open(self, user: Any) -> MemoryAccount:
        return self.account(user.name)
