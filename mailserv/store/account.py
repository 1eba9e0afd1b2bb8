"""What maildir and mbox share: folder bookkeeping, quota, subscriptions, copy and move.

An account subclass says how a folder maps to the disk (``_fs_path``,
``_fs_names``, ``_exists``, ``_make_one``, ``_remove``, ``_rename_one``,
``_open``); a folder subclass keeps ``_by_uid`` up to date in ``_sync``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

from mailserv.durable import fsync_dir, read_file, write_atomic
from mailserv.errors import FolderExists, InvalidFolderName, NoSuchFolder
from mailserv.store import (
    SEPARATOR,
    SPECIAL_USE,
    folder_from_fs_name,
    folder_fs_name,
    split_folder_name,
)
from mailserv.store.quota import MaildirSize


class AccountBase:
    """The folders of one user (IMailAccount), whatever the format."""

    def __init__(self, store: Any, user: Any) -> None:
        self.store = store
        self.user = user
        self.fsync: bool = store.fsync
        self.inbox_path: str = user.mailbox

    # -- the format's part ---------------------------------------------------

    def _fs_path(self, fs_name: str) -> str:
        raise NotImplementedError

    def _fs_names(self) -> list[str]:
        """On-disk names (``A.B``) of the existing folders other than INBOX."""
        raise NotImplementedError

    def _exists(self, path: str) -> bool:
        raise NotImplementedError

    def _make_one(self, path: str) -> None:
        """Create one empty folder; FileExistsError if it is there."""
        raise NotImplementedError

    def _remove(self, name: str, path: str) -> None:
        raise NotImplementedError

    def _rename_one(self, old_fs: str, new_fs: str) -> None:
        raise NotImplementedError

    def _open(self, name: str, path: str) -> Any:
        raise NotImplementedError

    def _quota(self) -> MaildirSize:
        raise NotImplementedError

    def _subscriptions_path(self) -> str:
        raise NotImplementedError

    # -- shared --------------------------------------------------------------

    def _ensure_special_folders(self) -> None:
        """Create the RFC 6154 folders on first use of the account."""
        existing = set(self.list_folders())
        for name in SPECIAL_USE:
            if name not in existing:
                with contextlib.suppress(FolderExists):
                    self.create_folder(name)

    def _path(self, name: str) -> str:
        parts = split_folder_name(name)
        if parts == ("INBOX",):
            return self.inbox_path
        return self._fs_path(folder_fs_name(parts))

    def list_folders(self) -> list[str]:
        """INBOX first, then every folder in name order."""
        names = {folder_from_fs_name(fs) for fs in self._fs_names()}
        return ["INBOX", *sorted(n for n in names if n is not None)]

    def special_use(self) -> dict[str, str]:
        """Folder name → RFC 6154 role."""
        return dict(SPECIAL_USE)

    def open_folder(self, name: str, create: bool = False) -> Any:
        path = self._path(name)
        canonical = "INBOX" if path == self.inbox_path else name
        if not self._exists(path):
            if not create:
                raise NoSuchFolder(name)
            with contextlib.suppress(FolderExists):
                self.create_folder(name)
        return self._open(canonical, path)

    def create_folder(self, name: str) -> None:
        """CREATE (RFC 3501 §6.3.3), superior levels included."""
        parts = split_folder_name(name)
        if parts == ("INBOX",):
            raise FolderExists(name)
        path = self.inbox_path
        for depth in range(1, len(parts) + 1):
            path = self._fs_path(folder_fs_name(parts[:depth]))
            try:
                self._make_one(path)
            except FileExistsError:
                if depth == len(parts):
                    raise FolderExists(name) from None
        if self.fsync:
            fsync_dir(os.path.dirname(path))

    def delete_folder(self, name: str) -> None:
        """DELETE (RFC 3501 §6.3.4); inferior folders stay."""
        path = self._path(name)
        if path == self.inbox_path:
            raise InvalidFolderName("INBOX cannot be deleted")
        if not self._exists(path):
            raise NoSuchFolder(name)
        self._remove(name, path)
        if self.fsync:
            fsync_dir(os.path.dirname(path))
        self._quota().recalculate()

    def rename_folder(self, old: str, new: str) -> None:
        """RENAME (RFC 3501 §6.3.5): the folder and its inferiors."""
        old_path, new_path = self._path(old), self._path(new)
        if old_path == self.inbox_path:
            raise InvalidFolderName("renaming INBOX is not supported")
        if new_path == self.inbox_path or self._exists(new_path):
            raise FolderExists(new)
        if not self._exists(old_path):
            raise NoSuchFolder(old)
        new_parts = split_folder_name(new)
        if len(new_parts) > 1:
            with contextlib.suppress(FolderExists):
                self.create_folder(SEPARATOR.join(new_parts[:-1]))
        old_fs, new_fs = folder_fs_name(split_folder_name(old)), folder_fs_name(new_parts)
        for fs in self._fs_names():
            if fs == old_fs or fs.startswith(old_fs + "."):
                self._rename_one(fs, new_fs + fs[len(old_fs) :])
        if self.fsync:
            fsync_dir(os.path.dirname(new_path))

    def quota(self) -> tuple[int, int | None, int, int | None]:
        """(used bytes, byte limit, used messages, message limit); None = unlimited."""
        q = self._quota()
        used_bytes, used_messages = q.usage()
        return used_bytes, q.limits.bytes or None, used_messages, q.limits.messages or None

    # Subscriptions (RFC 3501 §6.3.6): Dovecot's "V\t2" file, levels separated by TAB.

    def subscriptions(self) -> list[str]:
        return read_subscriptions(self._subscriptions_path())

    def subscribe(self, name: str) -> None:
        split_folder_name(name)
        names = self.subscriptions()
        if name not in names:
            write_subscriptions(self._subscriptions_path(), [*names, name], self.fsync)

    def unsubscribe(self, name: str) -> None:
        names = self.subscriptions()
        if name in names:
            names.remove(name)
            write_subscriptions(self._subscriptions_path(), names, self.fsync)


def read_subscriptions(path: str) -> list[str]:
    """Read a subscriptions file (Dovecot v2 or the plain one-name-per-line form)."""
    data = read_file(path)
    if not data:
        return []
    lines = data.decode("utf-8", "replace").split("\n")
    if lines[0].startswith("V\t"):
        return [line.replace("\t", SEPARATOR) for line in lines[2:] if line]
    return [line.replace(".", SEPARATOR) for line in lines if line]


def write_subscriptions(path: str, names: list[str], fsync: bool) -> None:
    body = "".join(n.replace(SEPARATOR, "\t") + "\n" for n in names)
    write_atomic(path, ("V\t2\n\n" + body).encode(), fsync=fsync)


class FolderBase:
    """The format-independent half of an IMailbox."""

    _mutex: threading.RLock
    _by_uid: dict[int, Any]

    def _sync(self) -> None:
        raise NotImplementedError

    def message(self, uid: int) -> Any:
        raise NotImplementedError

    def open_message(self, uid: int) -> Any:
        raise NotImplementedError

    def copy_to(self, uids: Any, target: Any) -> dict[int, int]:
        raise NotImplementedError

    def expunge(self, uids: Any) -> list[int]:
        raise NotImplementedError

    def refresh(self) -> list[int]:
        """Synchronise with the disk; returns the UIDs that went away."""
        with self._mutex:
            before = set(self._by_uid)
            self._sync()
            return sorted(before - set(self._by_uid))

    def uids(self) -> list[int]:
        return sorted(self._by_uid)

    def _expunge_history(self) -> tuple[list[tuple[int, list[int]]], int, int]:
        """(expunges as (modseq, UIDs), history floor, UIDNEXT) of the index in memory."""
        raise NotImplementedError

    def expunged_since(self, modseq: int) -> list[int]:
        """UIDs expunged with a modseq above ``modseq``, sorted (RFC 7162 VANISHED (EARLIER)).

        As of the last refresh.  For a modseq older than the recorded history
        (bounded; expunges before mailserv recorded them), every UID below
        UIDNEXT that is not present is returned: a superset, which RFC 7162
        §3.2.10 allows.
        """
        with self._mutex:
            history, floor, uidnext = self._expunge_history()
            found = {uid for m, uids in history if m > modseq for uid in uids}
            if modseq < floor:
                present = self._by_uid
                found.update(u for u in range(1, uidnext) if u not in present)
            return sorted(found)

    def _copy_by_append(self, uids: Any, target: Any) -> dict[int, int]:
        """COPY into any IMailbox: append each message with its flags and date."""
        out = {}
        for uid in sorted(set(uids)):
            try:
                info = self.message(uid)
                f = self.open_message(uid)
            except KeyError:
                continue  # expunged meanwhile
            with f:
                out[uid] = target.append(f, info.all_flags, info.internal_date)
        return out

    def move_to(self, uids: Any, target: Any) -> dict[int, int]:
        """MOVE (RFC 6851): copy, then expunge the originals."""
        mapping = self.copy_to(uids, target)
        self.expunge(list(mapping))
        return mapping
