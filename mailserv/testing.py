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

from mailserv.interfaces import IMailAccount, IMailbox, IMailStore, IUserDirectory

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

    def message(self, uid: int) -> MemoryMessageInfo:
        return MemoryMessageInfo(uid, len(self.contents[uid]))

    def move_to(self, uids: Any, target: Any) -> dict[int, int]:
        mapping = self.copy_to(uids, target)
        self.expunge(list(mapping))
        return mapping

    def expunge(self, uids: Any) -> list[int]:
        if self.fail_expunge is not None:
            raise self.fail_expunge
        uids = list(uids)
        self.expunged.append(uids)
        return [uid for uid in uids if self.contents.pop(uid, None) is not None]

    def expunged_since(self, modseq: int) -> list[int]:
        return sorted({uid for uids in self.expunged for uid in uids} - set(self.contents))

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

    def special_use(self) -> dict[str, str]:
        return {}

    def subscriptions(self) -> list[str]:
        return self.list_folders()  # every folder counts as subscribed

    def subscribe(self, name: str) -> None:
        pass

    def unsubscribe(self, name: str) -> None:
        pass


@implementer(IMailStore)
@dataclass
class MemoryMailStore:
    """An IMailStore keeping every user's account in memory (by user name)."""

    accounts: dict[str, MemoryAccount] = field(default_factory=dict)

    def account(self, name: str) -> MemoryAccount:
        return self.accounts.setdefault(name, MemoryAccount())

    def deliver(
        self, user: Any, source: Any, folder: str | None = None, prefix: bytes = b""
    ) -> int:
        box = self.account(user.name).open_folder(folder or "INBOX", create=True)
        return box.add(prefix + source.read())

    def open(self, user: Any) -> MemoryAccount:
        return self.account(user.name)


# --------------------------------------------------------------------------
# SMTP: directory, store with prefix and failures, synchronous threads, a
# service object with the attributes MailService exposes (used by tests/smtp/).


class SyncThreads:
    """ThreadPools stand-in running ``fn`` at once on the calling thread."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def run(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from twisted.internet import defer

        self.calls.append(name)
        return defer.maybeDeferred(fn, *args, **kwargs)


@implementer(IUserDirectory)
class MemoryDirectory:
    """An IUserDirectory of ``address -> User`` (lower-case keys).

    Setting ``fail`` makes lookups fail with TemporaryFailure.
    """

    def __init__(self, users: dict[str, Any] | None = None) -> None:
        self.users = {k.lower(): v for k, v in (users or {}).items()}
        self.fail = False
        self.lookups: list[str] = []

    def add(self, address: str, name: str | None = None, **extra: Any) -> Any:
        from mailserv.directory import User

        user = User(name=name or address, mailbox=f"/nonexistent/{address}", **extra)
        self.users[address.lower()] = user
        return user

    def lookup(self, address: str) -> Any:
        from twisted.internet import defer

        from mailserv.errors import TemporaryFailure

        self.lookups.append(address)
        if self.fail:
            return defer.fail(TemporaryFailure("directory down"))
        return defer.succeed(self.users.get(address.lower()))


class PrefixMemoryStore(MemoryMailStore):
    """MemoryMailStore with the ``prefix`` argument of IMailStore.deliver and injected failures."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: dict[str, BaseException] = {}

    def deliver(  # type: ignore[override]
        self, user: Any, source: Any, folder: str | None = None, prefix: bytes = b""
    ) -> int:
        if user.name in self.failures:
            raise self.failures[user.name]
        account = self.account(user.name)
        return account.open_folder(folder or "INBOX", create=True).add(prefix + source.read())

    def messages(self, name: str, folder: str = "INBOX") -> list[bytes]:
        box = self.account(name).folders.get(folder)
        return [] if box is None else [box.contents[uid] for uid in sorted(box.contents)]


class FakeSMTPService:
    """The attributes of MailService that mailserv.smtp uses, with in-memory parts."""

    def __init__(self, config: Any, reactor: Any, portal: Any = None) -> None:
        from mailserv.smtp.delivery import build_router

        self.config = config
        self.reactor = reactor
        self.threads = SyncThreads()
        self.directory = MemoryDirectory()
        self.store = PrefixMemoryStore()
        self.portal = portal
        self.helpers = None  # deliveries in (synchronous) threads
        self.router = build_router(self)
        self.tls_contexts: list[Any] = []

    def store_for(self, user: Any) -> PrefixMemoryStore:
        return self.store

    def tls_options(self) -> Any:
        marker = object()
        self.tls_contexts.append(marker)
        return marker


def tls_string_transport(peer: str = "192.0.2.1", port: int = 40000) -> Any:
    """A StringTransport that provides ITLSTransport; startTLS records its context
    and makes the transport provide ISSLTransport, as the real one does."""
    from twisted.internet.address import IPv4Address, IPv6Address
    from twisted.internet.interfaces import ISSLTransport, ITLSTransport
    from twisted.internet.testing import StringTransport
    from zope.interface import alsoProvides, directlyProvides

    kind = IPv6Address if ":" in peer else IPv4Address
    transport = StringTransport(peerAddress=kind("TCP", peer, port))
    transport.tls_started = []  # type: ignore[attr-defined]

    def start_tls(context: Any, normal: bool = True) -> None:
        transport.tls_started.append(context)  # type: ignore[attr-defined]
        alsoProvides(transport, ISSLTransport)

    transport.startTLS = start_tls  # type: ignore[attr-defined]
    directlyProvides(transport, ITLSTransport)
    return transport


# --------------------------------------------------------------------------
# A shared-state store with flags, keywords and modseq (used by the IMAP tests)


@dataclass(frozen=True)
class FlaggedMessageInfo:
    """The fields of mailserv.store.MessageInfo that IMAP reads."""

    uid: int
    size: int
    flags: frozenset[str]
    keywords: frozenset[str]
    modseq: int
    internal_date: float
    key: str = ""

    @property
    def all_flags(self) -> frozenset[str]:
        return self.flags | self.keywords


_SYSTEM_FLAGS = frozenset({"\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft"})


class _FolderData:
    """One folder's messages, shared by every open view of it (as files on disk would be)."""

    def __init__(self, uidvalidity: int) -> None:
        self.uidvalidity = uidvalidity
        self.next_uid = 1
        self.modseq = 1
        # uid -> (data, flags, keywords, modseq, internal_date)
        self.messages: dict[int, tuple[bytes, frozenset[str], frozenset[str], int, float]] = {}
        self.expunged: dict[int, int] = {}  # uid -> modseq of its expunge

    def add(self, data: bytes, flags: Iterable[str] = (), internal_date: float = 1.7e9) -> int:
        uid = self.next_uid
        self.next_uid += 1
        self.modseq += 1
        flags = set(flags)
        system = frozenset(f for f in flags if f in _SYSTEM_FLAGS)
        keywords = frozenset(f for f in flags if not f.startswith("\\"))
        self.messages[uid] = (data, system, keywords, self.modseq, internal_date)
        return uid

    def info(self, uid: int) -> FlaggedMessageInfo:
        data, flags, keywords, modseq, date = self.messages[uid]
        return FlaggedMessageInfo(uid, len(data), flags, keywords, modseq, date, str(uid))


@implementer(IMailbox)
class SharedMemoryFolder:
    """One open view of a _FolderData: IMailbox with refresh() semantics."""

    def __init__(self, data: _FolderData, name: str) -> None:
        self.data = data
        self.name = name
        self.known: set[int] = set(data.messages)
        self.closed = False

    @property
    def uidvalidity(self) -> int:
        return self.data.uidvalidity

    def refresh(self) -> list[int]:
        now = set(self.data.messages)
        gone = sorted(self.known - now)
        self.known = now
        return gone

    def messages(self) -> list[FlaggedMessageInfo]:
        return [self.data.info(uid) for uid in sorted(self.data.messages)]

    def uidnext(self) -> int:
        return self.data.next_uid

    def highest_modseq(self) -> int:
        return self.data.modseq

    def open_message(self, uid: int) -> io.BytesIO:
        return io.BytesIO(self.data.messages[uid][0])

    def set_flags(self, uid: int, flags: Any) -> FlaggedMessageInfo:
        data, old_flags, old_kw, _modseq, date = self.data.messages[uid]
        flags = set(flags)
        system = frozenset(f for f in flags if f in _SYSTEM_FLAGS)
        keywords = frozenset(f for f in flags if not f.startswith("\\"))
        if (system, keywords) != (old_flags, old_kw):
            self.data.modseq += 1
            self.data.messages[uid] = (data, system, keywords, self.data.modseq, date)
        return self.data.info(uid)

    def append(self, source: Any, flags: Any = (), internal_date: float | None = None) -> int:
        uid = self.data.add(source.read(), flags, internal_date or 1.7e9)
        self.known.add(uid)
        return uid

    def copy_to(self, uids: Any, target: Any) -> dict[int, int]:
        out = {}
        for uid in sorted(set(uids)):
            if uid in self.data.messages:
                data, flags, keywords, _m, date = self.data.messages[uid]
                out[uid] = target.data.add(data, flags | keywords, date)
        return out

    def message(self, uid: int) -> FlaggedMessageInfo:
        return self.data.info(uid)

    def move_to(self, uids: Any, target: Any) -> dict[int, int]:
        mapping = self.copy_to(uids, target)
        self.expunge(list(mapping))
        return mapping

    def expunge(self, uids: Any) -> list[int]:
        removed = [uid for uid in sorted(set(uids)) if self.data.messages.pop(uid, None)]
        if removed:
            self.data.modseq += 1
            self.data.expunged.update(dict.fromkeys(removed, self.data.modseq))
        self.known -= set(removed)
        return removed

    def expunged_since(self, modseq: int) -> list[int]:
        return sorted(uid for uid, m in self.data.expunged.items() if m > modseq)

    def close(self) -> None:
        self.closed = True


@implementer(IMailAccount)
class SharedMemoryAccount:
    """Folders of one user, with subscriptions, special-use roles and a quota."""

    def __init__(self, quota_bytes: int | None = None) -> None:
        self.folders: dict[str, _FolderData] = {"INBOX": _FolderData(1000)}
        self.subscribed: list[str] = ["INBOX"]
        self.quota_bytes = quota_bytes
        for name in ("Drafts", "Sent", "Trash", "Junk", "Archive"):
            self.create_folder(name)

    def list_folders(self) -> list[str]:
        return ["INBOX", *sorted(n for n in self.folders if n != "INBOX")]

    def special_use(self) -> dict[str, str]:
        return {n: "\\" + n for n in ("Drafts", "Sent", "Trash", "Junk", "Archive")}

    def open_folder(self, name: str, create: bool = False) -> SharedMemoryFolder:
        from mailserv.errors import NoSuchFolder

        if name not in self.folders:
            if not create:
                raise NoSuchFolder(name)
            self.create_folder(name)
        return SharedMemoryFolder(self.folders[name], name)

    def create_folder(self, name: str) -> None:
        from mailserv.errors import FolderExists

        if name in self.folders or name.upper() == "INBOX":
            raise FolderExists(name)
        self.folders[name] = _FolderData(1000 + len(self.folders))

    def delete_folder(self, name: str) -> None:
        from mailserv.errors import NoSuchFolder

        if name not in self.folders:
            raise NoSuchFolder(name)
        del self.folders[name]

    def rename_folder(self, old: str, new: str) -> None:
        from mailserv.errors import FolderExists, NoSuchFolder

        if old not in self.folders:
            raise NoSuchFolder(old)
        if new in self.folders:
            raise FolderExists(new)
        self.folders[new] = self.folders.pop(old)

    def quota(self) -> tuple[int, int | None, int, int | None]:
        used = sum(len(m[0]) for f in self.folders.values() for m in f.messages.values())
        count = sum(len(f.messages) for f in self.folders.values())
        return used, self.quota_bytes, count, None

    def subscriptions(self) -> list[str]:
        return list(self.subscribed)

    def subscribe(self, name: str) -> None:
        if name not in self.subscribed:
            self.subscribed.append(name)

    def unsubscribe(self, name: str) -> None:
        if name in self.subscribed:
            self.subscribed.remove(name)


@implementer(IMailStore)
@dataclass
class SharedMemoryStore:
    """An IMailStore whose accounts are shared by every session of a user."""

    accounts: dict[str, SharedMemoryAccount] = field(default_factory=dict)

    def account(self, name: str) -> SharedMemoryAccount:
        return self.accounts.setdefault(name, SharedMemoryAccount())

    def deliver(
        self, user: Any, source: Any, folder: str | None = None, prefix: bytes = b""
    ) -> int:
        return self.account(user.name).folders[folder or "INBOX"].add(prefix + source.read())

    def open(self, user: Any) -> SharedMemoryAccount:
        return self.account(user.name)
