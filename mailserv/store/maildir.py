"""Maildir++ store with Dovecot-compatible index files.

Layout (cr.yp.to/proto/maildir.html, Courier's Maildir++, Dovecot)::

    <root>/{tmp,new,cur}/           INBOX
    <root>/.Sent/{tmp,new,cur}/     folder "Sent" (with an empty maildirfolder file)
    <root>/.A.B/                    folder "A/B" (levels in modified UTF-7)
    <root>/maildirsize              Maildir++ quota (mailserv.store.quota)
    <root>/subscriptions            Dovecot v2 subscriptions file
    <folder>/dovecot-uidlist        UIDVALIDITY, UIDNEXT, uid → file, modseq (store.uidlist)
    <folder>/dovecot-uidlist.lock   dotlock serialising every writer of the uidlist
    <folder>/dovecot-keywords       keyword ↔ letter a..z
    <folder>/mailserv-modseq        flag changes since the last uidlist write (store.uidlist)

Delivery writes ``tmp/<unique>`` (time, microseconds, pid, counter, host),
fsyncs it, renames it to ``new/<unique>,S=<size>,W=<size>`` and fsyncs
``new/``: a message is never visible half written.  Deliveries running at
once share the fsyncs of ``new/`` (``durable.DirSync``: each waits for one that began
after its rename).  Delivery does not take the uidlist lock; UIDs are given
out when a reader synchronises the folder (as Dovecot does), under the lock,
moving new/ files to cur/ and appending their records to the uidlist.  Flags
live in the ``:2,<letters>`` info suffix (D F P R S T, keywords a..z); every
flag change, append and expunge bumps the folder's highest modseq (RFC 7162).
A flag change renames the file and appends its new modseq to the folder's
journal; an expunge unlinks the files, fsyncs cur/ once and appends one
journal line for all of them (the expunge history QRESYNC reads).  APPEND
and COPY place their files in cur/ and append their records without listing
cur/ (``_add_placed``), unless the index or cur/ changed outside this process
or deliveries wait in new/; ``stage()`` writes an APPEND's message before the
lock.  Writers announced with ``batch()`` share one take of the dotlock.  The
uidlist is rewritten only to fold a long journal or drop many dead records
(a POP3 QUIT that empties the folder).  The parsed index and the message list
are kept in memory and reused while the files are unchanged.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, BinaryIO, NamedTuple

from zope.interface import implementer

from mailserv.durable import (
    DirSync,
    LineEnds,
    copy_into,
    crlf_size,
    fsync_dir,
    next_uidvalidity,
    open_crlf,
    open_source,
    read_file,
    stat_signature,
    unique_name,
    write_all,
    write_atomic,
)
from mailserv.durable import (
    listdir as _listdir,
)
from mailserv.interfaces import IMailAccount, IMailbox, IMailStore
from mailserv.store import (
    MessageInfo,
    TooManyKeywords,
    folder_fs_name,
    split_flags,
    split_folder_name,
)
from mailserv.store.account import AccountBase, FolderBase
from mailserv.store.dotlock import DotLock
from mailserv.store.quota import MAILDIRSIZE, MaildirSize, limits_for
from mailserv.store.uidlist import (
    EXPUNGE_HISTORY,
    JOURNAL_FOLD,
    JOURNAL_NAME,
    KEYWORDS_NAME,
    MAX_KEYWORDS,
    UIDLIST_NAME,
    UidList,
    UidListError,
    UidRecord,
    apply_journal,
    base_name,
    journal_expunge,
    journal_header,
    journal_record,
    parse_journal,
    parse_keywords,
    parse_uidlist,
    serialize_keywords,
    serialize_records,
    serialize_uidlist,
)

#: maildir info letters of the IMAP system flags (Dovecot's mapping).
FLAG_LETTERS = {
    "\\Draft": "D",
    "\\Flagged": "F",
    "\\Answered": "R",
    "\\Seen": "S",
    "\\Deleted": "T",
}
LETTER_FLAGS = {v: k for k, v in FLAG_LETTERS.items()}
UIDLIST_STALE = 120.0  # Dovecot's MAILDIR_UIDLIST_LOCK_STALE_TIMEOUT
BATCH_HOLD = 0.05  # seconds a batch of writers keeps the uidlist dotlock at most
TMP_MAX_AGE = 36 * 3600  # maildir spec: tmp files older than 36 hours are garbage
_SIZE = re.compile(r",S=(\d+)")
_VSIZE = re.compile(r",W=(\d+)")
# read_messages reads files up to this size in one read.
SMALL_READ = 1024 * 1024


def info_letters(filename: str) -> str:
    """The flag letters of a maildir file name (``"FS"`` for ``x:2,FS``)."""
    _, sep, info = filename.partition(":")
    return info[2:] if sep and info.startswith("2,") else ""


def with_letters(base: str, letters: Iterable[str]) -> str:
    return f"{base}:2,{''.join(sorted(set(letters)))}"


_NAME_TIME = re.compile(r"^(\d+)\.(?:M(\d+))?(?:P\d+)?(?:Q(\d+))?")


def _sort_key(name: str) -> tuple[int, int, int, str]:
    """Delivery order of new files: seconds, microseconds, per-process counter."""
    m = _NAME_TIME.match(name)
    if m is None:
        return (0, 0, 0, name)
    return (int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0), name)


_Stat = tuple[int, int, int]


def _stat3(path: str) -> _Stat:
    """(inode, size, mtime_ns) of a file, zeros if it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return (0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class IndexKey(NamedTuple):
    """What the uidlist and journal looked like when the index in memory was read."""

    uidlist: _Stat
    journal: _Stat
    stale: bool  # a journal of another UIDVALIDITY (or without uidlist): to be removed


def _make_maildir(path: str, subfolder: bool) -> None:
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
    if subfolder and not os.path.exists(os.path.join(path, "maildirfolder")):
        os.close(os.open(os.path.join(path, "maildirfolder"), os.O_WRONLY | os.O_CREAT, 0o600))


# The prefix and a message up to this size go out in one write; a bigger one is then
# copied through copy_into's reused buffer (no fresh 1 MiB bytes per message).
FIRST_CHUNK = 256 * 1024


def write_message(
    directory: str,
    source: str | os.PathLike[str] | IO[bytes],
    prefix: bytes,
    *,
    fsync: bool = True,
    quota: MaildirSize | None = None,
    internal_date: float | None = None,
) -> tuple[str, int, int]:
    """Write ``prefix`` + ``source`` to ``<directory>/tmp/<unique>``, fsynced.

    Returns (tmp path, size, size with CRLF line ends).  Nothing is left
    behind on failure.  The prefix and the first piece of the source go out
    in one write (a small message is one write).
    """
    with _open_source(source) as src:
        hint = _bytes_left(src)
        if quota is not None and hint is not None:
            quota.check(len(prefix) + hint)
        tmp = os.path.join(directory, "tmp", unique_name())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                ends = LineEnds()
                first = prefix + src.read(FIRST_CHUNK)
                ends.feed(first)
                write_all(fd, first)
                size = len(first)
                if len(first) > len(prefix):
                    # A source that says it has only CRLF line ends (an SMTP message) is
                    # not scanned again: counting CRLF costs ~0.8 ms per MiB.
                    trusted = getattr(src, "crlf_only", False)
                    size += copy_into(fd, src, None if trusted else ends)
                if quota is not None and hint is None:
                    quota.check(size)
                if internal_date is not None:
                    os.utime(fd, (internal_date, internal_date))
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return tmp, size, size + ends.bare_lf


@contextlib.contextmanager
def _open_source(source: str | os.PathLike[str] | IO[bytes]) -> Iterator[BinaryIO]:
    """A path opened unbuffered (fewer system calls than ``open_source``), else as is."""
    if isinstance(source, str | os.PathLike):
        with open(source, "rb", buffering=0) as f:
            yield f  # type: ignore[misc]
        return
    with open_source(source) as f:
        yield f


def _bytes_left(src: BinaryIO) -> int | None:
    try:
        return os.fstat(src.fileno()).st_size - src.tell()
    except (OSError, AttributeError, ValueError):
        return None


def size_suffix(size: int, vsize: int) -> str:
    """Dovecot's ``,S=<size>,W=<size with CRLF>`` file name fields."""
    return f",S={size},W={vsize}"


def _read_rest(fd: int, data: bytes) -> bytes:
    """``data`` and the rest of the file ``fd`` (a short read of a regular file is its end)."""
    parts = [data]
    while chunk := os.read(fd, 65536):
        parts.append(chunk)
    return b"".join(parts)


@implementer(IMailStore)
class MaildirStore:
    """Maildir++ delivery and access for users whose ``mailbox`` is a maildir root."""

    def __init__(self, config: object) -> None:
        self.config = config
        self.fsync = bool(getattr(config, "fsync", True))

    def _quota(self, user: object, root: str) -> MaildirSize:
        return MaildirSize(
            os.path.join(root, MAILDIRSIZE),
            limits_for(user, self.config),
            lambda: scan_usage(root),
        )

    def deliver(
        self,
        user: object,
        source: Any,
        folder: str | None = None,
        prefix: bytes = b"",
    ) -> str:
        """Deliver one message (maildir rules); returns the file's base name.

        Durable before return; raises QuotaExceeded, InvalidFolderName or OSError.
        """
        root = user.mailbox  # type: ignore[attr-defined]
        parts = split_folder_name(folder) if folder is not None else ("INBOX",)
        inbox = parts == ("INBOX",)
        path = root if inbox else os.path.join(root, "." + folder_fs_name(parts))
        quota = self._quota(user, root)
        for attempt in range(2):
            try:
                tmp, size, vsize = write_message(
                    path, source, prefix, fsync=self.fsync, quota=quota
                )
                break
            except FileNotFoundError:  # the folder (or the source) is missing
                if attempt:
                    raise
                if not os.path.isdir(os.path.join(path, "tmp")):  # else made meanwhile
                    self._create_folder(path, subfolder=not inbox)
        name = os.path.basename(tmp) + size_suffix(size, vsize)
        new = f"{path}/new"
        try:
            try:
                os.rename(tmp, f"{new}/{name}")
            except FileNotFoundError:
                self._create_folder(path, subfolder=not inbox)
                os.rename(tmp, f"{new}/{name}")
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self.fsync:
            DirSync.of(new).sync()
        quota.add(size, 1)
        return name

    def _create_folder(self, path: str, subfolder: bool) -> None:
        _make_maildir(path, subfolder=subfolder)
        if self.fsync:  # the new folder itself must survive a crash with the message
            fsync_dir(path)
            fsync_dir(os.path.dirname(path))

    def open(self, user: object) -> MaildirAccount:
        return MaildirAccount(self, user)


def scan_usage(root: str) -> tuple[int, int]:
    """True (bytes, messages) of every folder under a maildir root."""
    total = count = 0
    folders = [root] + [
        os.path.join(root, e)
        for e in _listdir(root)
        if e.startswith(".") and not e.startswith("..")
    ]
    for folder in folders:
        for sub in ("new", "cur"):
            d = os.path.join(folder, sub)
            for name in _listdir(d):
                if name.startswith("."):
                    continue
                m = _SIZE.search(base_name(name))
                if m:
                    size = int(m.group(1))
                else:
                    try:
                        size = os.stat(os.path.join(d, name)).st_size
                    except FileNotFoundError:
                        continue
                total += size
                count += 1
    return total, count


@implementer(IMailAccount)
class MaildirAccount(AccountBase):
    """The folders of one maildir user (Maildir++: folder ``A/B`` is ``<root>/.A.B``)."""

    def __init__(self, store: MaildirStore, user: object) -> None:
        super().__init__(store, user)
        self.root = self.inbox_path
        _make_maildir(self.root, subfolder=False)
        self._ensure_special_folders()

    def _fs_path(self, fs_name: str) -> str:
        return os.path.join(self.root, "." + fs_name)

    def _fs_names(self) -> list[str]:
        return [
            e[1:]
            for e in _listdir(self.root)
            if e.startswith(".")
            and not e.startswith("..")
            and os.path.isdir(os.path.join(self.root, e))
        ]

    def _exists(self, path: str) -> bool:
        return os.path.isdir(path)

    def _make_one(self, path: str) -> None:
        os.mkdir(path, 0o700)
        _make_maildir(path, subfolder=True)

    def _remove(self, name: str, path: str) -> None:
        aside = os.path.join(self.root, f"..deleted.{unique_name()}")
        os.rename(path, aside)
        shutil.rmtree(aside, ignore_errors=True)

    def _rename_one(self, old_fs: str, new_fs: str) -> None:
        os.rename(self._fs_path(old_fs), self._fs_path(new_fs))

    def _open(self, name: str, path: str) -> MaildirFolder:
        return MaildirFolder(self, name, path)

    def _quota(self) -> MaildirSize:
        return self.store._quota(self.user, self.root)

    def _subscriptions_path(self) -> str:
        return os.path.join(self.root, "subscriptions")


class StagedMessage:
    """A message written and fsynced to a folder's tmp/ ahead of its APPEND
    (``MaildirFolder.stage``)."""

    def __init__(self, folder: str, path: str, size: int, internal_date: float | None) -> None:
        self.folder = folder
        self.path = path
        self.size = size
        self.internal_date = internal_date

    def discard(self) -> None:
        """Remove the file unless it was appended (then it is no longer there)."""
        with contextlib.suppress(OSError):
            os.unlink(self.path)


@implementer(IMailbox)
class MaildirFolder(FolderBase):
    """One maildir folder, with the UID index of dovecot-uidlist."""

    def __init__(self, account: MaildirAccount, name: str, path: str) -> None:
        self.account = account
        self.name = name
        self.path = path
        self.fsync = account.store.fsync
        self._mutex = threading.RLock()
        self._uidlist: UidList | None = None
        self._by_uid: dict[int, UidRecord] = {}
        self._keywords: list[str | None] = [None] * MAX_KEYWORDS
        self._size_cache: dict[str, tuple[int, int]] = {}
        self._sig: tuple[tuple[int, int, int], ...] | None = None
        self._index_key: IndexKey | None = None
        self._infos: list[MessageInfo] | None = None  # messages(), until the index changes
        self._cur_seen: _Stat | None = None  # cur/ after our last change to it (_quick_add)
        self._dotlock: DotLock | None = None  # held by the mutex's holder, or for a batch
        self._dotlock_since = 0.0
        self._lock_depth = 0  # _locked() sections entered by the mutex's holder
        self._take = 0  # dotlock takes so far
        self._trusted: IndexKey | None = None  # current as long as take _trusted_take lasts
        self._trusted_take = 0
        self._batch = 0  # writers announced (batch())
        self._batch_guard = threading.Lock()
        _make_maildir(path, subfolder=path != account.root)
        self.clean_tmp()
        self.refresh()

    # -- index ------------------------------------------------------------

    def _lock(self) -> DotLock:
        return DotLock(os.path.join(self.path, UIDLIST_NAME + ".lock"), stale_timeout=UIDLIST_STALE)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The folder's write lock: the mutex, and the uidlist's dotlock.

        While writers are queued for the folder (``batch()``), the dotlock
        is kept from one write to the next (at most ``BATCH_HOLD`` seconds),
        instead of an open, a link and two unlinks per write; other
        processes wait for it as usual.
        """
        with self._mutex:
            if self._dotlock is None:
                lock = self._lock()
                lock.acquire()
                self._dotlock, self._dotlock_since = lock, time.monotonic()
                self._take += 1
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0 and (
                    self._batch == 0 or time.monotonic() - self._dotlock_since > BATCH_HOLD
                ):
                    self._release_dotlock()

    def _release_dotlock(self) -> None:
        """Give the dotlock back (mutex held)."""
        lock, self._dotlock = self._dotlock, None
        if lock is not None:
            lock.release()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Announce a writer (any thread) before it queues for the folder: while any
        is announced, the writes share one take of the dotlock (``_locked``)."""
        with self._batch_guard:
            self._batch += 1
        try:
            yield
        finally:
            with self._batch_guard:
                self._batch -= 1
                last = self._batch == 0
            if last:
                with self._mutex:
                    if self._batch == 0 and self._lock_depth == 0:
                        self._release_dotlock()

    def _stat_index(self) -> tuple[_Stat, _Stat]:
        return (
            _stat3(os.path.join(self.path, UIDLIST_NAME)),
            _stat3(os.path.join(self.path, JOURNAL_NAME)),
        )

    def _read_uidlist(self) -> tuple[UidList | None, IndexKey]:
        """The uidlist on disk with the journal laid over it, and what both looked like.

        The uidlist is None if missing or broken (it then gets a new
        UIDVALIDITY).  The files are stat'ed before they are read, so a change
        made while reading makes the key differ at the next look.
        """
        stats = self._stat_index()
        uidlist = None
        data = read_file(os.path.join(self.path, UIDLIST_NAME))
        if data:
            with contextlib.suppress(UidListError):
                uidlist = parse_uidlist(data)
        stale = stats[1] != (0, 0, 0)
        if uidlist is not None:
            journal = parse_journal(
                read_file(os.path.join(self.path, JOURNAL_NAME)), uidlist.uidvalidity
            )
            stale = journal is None
            if journal is not None:
                apply_journal(uidlist, journal)
        return uidlist, IndexKey(*stats, stale)

    def _index_current(self) -> bool:
        """The index in memory is what the uidlist and journal say (lock held).

        Not looked at again while the dotlock has been ours since the index
        was last found (or made) current: nobody else may change the files.
        """
        key = self._index_key
        if key is None or key.stale or self._uidlist is None:
            return False
        if self._trusted is key and self._trusted_take == self._take:
            return True
        if (key.uidlist, key.journal) != self._stat_index():
            return False
        self._trust(key)
        return True

    def _trust(self, key: IndexKey) -> None:
        """``key`` describes the files as of now (lock held): see ``_index_current``."""
        self._trusted, self._trusted_take = key, self._take

    def _current_locked(self) -> UidList:
        """The index, read again only if another process changed it (lock held)."""
        if self._index_current():
            assert self._uidlist is not None
            return self._uidlist
        return self._sync_locked()

    def _write_index(self, uidlist: UidList) -> IndexKey:
        """Rewrite the uidlist, and the journal with only the expunge history (lock held).

        The history is cut to ``EXPUNGE_HISTORY`` UIDs (the floor moves up to
        the newest dropped one); without history the journal goes.  Both
        files are written aside, fsynced and renamed, then the folder fsynced
        once.
        """
        uidlist.dead = 0
        history = uidlist.expunged
        kept = sum(len(uids) for _, uids in history)
        while history and kept > EXPUNGE_HISTORY:
            modseq, uids = history.pop(0)
            kept -= len(uids)
            uidlist.history_floor = max(uidlist.history_floor, modseq)
        files = {UIDLIST_NAME: serialize_uidlist(uidlist)}
        if history:
            files[JOURNAL_NAME] = journal_header(
                uidlist.uidvalidity, uidlist.history_floor
            ) + b"".join(journal_expunge(m, uids) for m, uids in history)
        else:
            uidlist.history_floor = uidlist.highest_modseq
        written = []
        try:
            for name, data in files.items():
                tmp = os.path.join(self.path, f".{name}.tmp.{unique_name()}")
                written.append((tmp, name))
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    write_all(fd, data)
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
            for tmp, name in written:  # the uidlist first: a journal never runs ahead of it
                os.rename(tmp, os.path.join(self.path, name))
        except BaseException:
            for tmp, _ in written:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
        if not history:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.path, JOURNAL_NAME))
        if self.fsync:
            fsync_dir(self.path)
        return IndexKey(*self._stat_index(), False)

    def _fold_due(self, uidlist: UidList, journal_size: int) -> bool:
        """Is it time to rewrite the uidlist (journal too long, too many dead records)?"""
        return journal_size > JOURNAL_FOLD or uidlist.dead > max(len(uidlist.records), 100)

    def _append_journal(self, data: bytes) -> None:
        """Append lines to the journal, fsynced (lock held); fold it when it has grown.

        RFC 7162 §3 lets a mod-sequence only grow: a line lost to a power
        failure would hand out a modseq a CONDSTORE/QRESYNC client has already
        seen, so it would miss the changes made since.
        """
        uidlist = self._uidlist
        assert uidlist is not None
        self._index_key = None  # read again if the journal cannot be written
        fd = os.open(
            os.path.join(self.path, JOURNAL_NAME), os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600
        )
        try:
            size = os.fstat(fd).st_size
            if size == 0:  # expunges from here on are recorded
                data = journal_header(uidlist.uidvalidity, uidlist.history_floor) + data
            elif os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # end a line torn by a crash first
            write_all(fd, data)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        key = IndexKey(*self._stat_index(), False)
        if self._fold_due(uidlist, key.journal[1]):
            key = self._write_index(uidlist)
        self._index_key = key
        self._trust(key)

    def _journal_change(self, rec: UidRecord, new_name: str) -> None:
        """Record a flag change (file already renamed) with the next modseq; lock held.

        The rename itself may be lost in a crash; the next synchronisation then
        sees a file name that differs from the journal and gives it a new,
        higher modseq.
        """
        uidlist = self._uidlist
        assert uidlist is not None
        modseq = uidlist.highest_modseq + 1
        uidlist.highest_modseq = modseq
        rec.filename = new_name
        rec.modseq = modseq
        self._infos = None
        self._append_journal(journal_record(rec.uid, modseq, new_name))

    def _journal_expunge(self, uidlist: UidList, uids: list[int]) -> None:
        """Record that ``uids`` are gone (files already unlinked) with one new modseq.

        One journal line; or, when most of the uidlist's records are now dead
        (POP3 QUIT after reading everything), one rewrite of the uidlist instead.
        """
        uidlist.highest_modseq += 1
        uidlist.expunged.append((uidlist.highest_modseq, sorted(uids)))
        uidlist.dead += len(uids)
        if self._fold_due(uidlist, _stat3(os.path.join(self.path, JOURNAL_NAME))[1]):
            self._index_key = self._write_index(uidlist)  # instead of the journal line
        else:
            self._append_journal(journal_expunge(uidlist.highest_modseq, uids))

    def _append_records(self, records: list[UidRecord]) -> IndexKey:
        """Append new records to the uidlist, fsynced (lock held), as Dovecot does.

        A last line without its newline (a writer killed mid-append, never
        acknowledged) is cut off first.
        """
        fd = os.open(os.path.join(self.path, UIDLIST_NAME), os.O_RDWR | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                tail = os.pread(fd, min(size, 64 * 1024), max(0, size - 64 * 1024))
                cut = tail.rfind(b"\n")
                if cut < 0:
                    raise UidListError("uidlist record longer than 64 KiB")
                os.ftruncate(fd, size - len(tail) + cut + 1)
            write_all(fd, serialize_records(records))
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return IndexKey(*self._stat_index(), False)

    def _list_files(self) -> dict[str, tuple[str, str]]:
        files: dict[str, tuple[str, str]] = {}
        for sub in ("new", "cur"):
            for name in _listdir(os.path.join(self.path, sub)):
                if not name.startswith("."):
                    files[base_name(name)] = (sub, name)
        return files

    def _needs_write(self, uidlist: UidList, files: dict[str, tuple[str, str]]) -> bool:
        if len(files) != len(uidlist.records):
            return True
        for rec in uidlist.records:
            found = files.get(rec.base)
            if found is None or found != ("cur", rec.filename) or not rec.modseq:
                return True
        return False

    def _signature(self) -> tuple[tuple[int, int, int], ...] | None:
        return stat_signature(
            [
                os.path.join(self.path, UIDLIST_NAME),
                os.path.join(self.path, KEYWORDS_NAME),
                os.path.join(self.path, JOURNAL_NAME),
                os.path.join(self.path, "new"),
                os.path.join(self.path, "cur"),
            ]
        )

    def _sync(self) -> None:
        """Bring the uidlist up to date with the files; takes the lock only when needed.

        Nothing is read when the uidlist, the keywords and both directories
        look as they did at the last synchronisation (IMAP polls often).
        """
        with self._mutex:
            sig = self._signature()
            if sig is not None and sig == self._sig:
                return
            key = self._index_key
            uidlist: UidList | None
            if (
                key is not None
                and self._uidlist is not None
                and (key.uidlist, key.journal) == self._stat_index()
            ):
                uidlist = self._uidlist  # index unchanged: only the directories to look at
            else:
                uidlist, key = self._read_uidlist()
            if uidlist is None or key.stale or self._needs_write(uidlist, self._list_files()):
                with self._locked():
                    self._sync_locked()
                return
            self._install(uidlist, key, same=uidlist is self._uidlist)
            self._sig = sig

    def _sync_locked(self, order: list[str] | None = None) -> UidList:
        """Match the index with the files (lock held): new files get UIDs, lost ones go.

        ``order``: base names placed in cur/ by the caller (APPEND, COPY while
        deliveries wait in new/; else ``_add_placed``), in the order their UIDs
        should follow; cur/ is fsynced for them.  New
        UIDs are appended to the uidlist; vanished files are recorded in the
        journal; the uidlist is rewritten only when the header or old records
        must change.
        """
        if self._index_current():  # what the disk says, without parsing it again
            found_list, key = self._uidlist, self._index_key
            assert key is not None
            self._index_key = None  # changed in place below: read again if this fails
        else:
            found_list, key = self._read_uidlist()
        rewrite = found_list is None or key.stale
        uidlist = found_list or UidList(uidvalidity=next_uidvalidity(self.account.root))
        seen = _stat3(f"{self.path}/cur")  # before listing: a later change makes it differ
        files = self._list_files()
        moved = any(sub == "new" for sub, _ in files.values())
        kept: list[UidRecord] = []
        gone: list[int] = []
        for rec in uidlist.records:
            found = files.pop(rec.base, None)
            if found is None:
                gone.append(rec.uid)  # expunged by another program
                continue
            name = self._to_cur(*found)
            if not rec.modseq:
                uidlist.highest_modseq += 1
                rec.modseq = uidlist.highest_modseq
                rewrite = True
            if name != rec.filename:
                if info_letters(name) != info_letters(rec.filename):
                    uidlist.highest_modseq += 1
                    rec.modseq = uidlist.highest_modseq
                rec.filename = name
                rewrite = True
            kept.append(rec)
        rank = {b: i for i, b in enumerate(order or ())}
        added: list[UidRecord] = []
        for base in sorted(files, key=lambda b: (rank.get(b, -1), _sort_key(b))):
            name = self._to_cur(*files[base])
            uidlist.highest_modseq += 1
            added.append(UidRecord(uidlist.nextuid, name, uidlist.highest_modseq))
            uidlist.nextuid += 1
        uidlist.records = kept + added
        if rewrite or gone or added:
            self._index_key = None
            if self.fsync and (order or rewrite):
                fsync_dir(os.path.join(self.path, "cur"))
            if rewrite:
                if gone:
                    uidlist.highest_modseq += 1
                    uidlist.expunged.append((uidlist.highest_modseq, gone))
                key = self._write_index(uidlist)
            else:
                if added:
                    try:
                        key = self._append_records(added)
                    except UidListError:  # a last line we cannot make sense of: start afresh
                        key = self._write_index(uidlist)
                self._uidlist = uidlist
                if gone:
                    self._journal_expunge(uidlist, gone)
                    key = self._index_key or IndexKey(*self._stat_index(), False)
        # After our moves from new/: a change by another program in the moment between
        # the listing and this stat would go unseen until the next refresh (whose
        # signature differs from the one before this synchronisation).
        self._cur_seen = _stat3(f"{self.path}/cur") if moved else seen
        self._install(uidlist, key)
        return uidlist

    def _to_cur(self, sub: str, name: str) -> str:
        if sub == "cur":
            return name
        target = name if ":" in name else name + ":2,"
        try:
            os.rename(os.path.join(self.path, "new", name), os.path.join(self.path, "cur", target))
        except FileNotFoundError:
            pass
        return target

    def _install(self, uidlist: UidList, key: IndexKey, same: bool = False) -> None:
        """Make ``uidlist`` the index in memory (``same``: it already is, unchanged)."""
        with self._mutex:
            if not same:
                self._by_uid = {r.uid: r for r in uidlist.records}
            self._uidlist = uidlist
            self._index_key = key
            keywords = parse_keywords(read_file(os.path.join(self.path, KEYWORDS_NAME)))
            if not same or keywords != self._keywords:
                self._infos = None
            self._keywords = keywords

    # -- IMailbox ---------------------------------------------------------

    @property
    def uidvalidity(self) -> int:
        assert self._uidlist is not None
        return self._uidlist.uidvalidity

    def uidnext(self) -> int:
        assert self._uidlist is not None
        return self._uidlist.nextuid

    def highest_modseq(self) -> int:
        assert self._uidlist is not None
        return self._uidlist.highest_modseq

    def _sizes(self, rec: UidRecord) -> tuple[int, int]:
        """(size on disk, size with CRLF line ends) of a message, cached.

        Taken from the ``,S=`` and ``,W=`` fields of the name when it has both.
        """
        base = rec.base
        cached = self._size_cache.get(base)
        if cached is None:
            size, vsize = _SIZE.search(base), _VSIZE.search(base)
            if size and vsize:
                cached = (int(size.group(1)), int(vsize.group(1)))
            else:
                path = f"{self.path}/cur/{rec.filename}"
                try:
                    phys = os.stat(path).st_size
                    cached = (phys, int(vsize.group(1)) if vsize else crlf_size(path))
                except FileNotFoundError:
                    phys = int(size.group(1)) if size else 0
                    cached = (phys, int(vsize.group(1)) if vsize else phys)
            self._size_cache[base] = cached
        return cached

    def _date_of(self, rec: UidRecord) -> Callable[[], float]:
        """The internal date (RFC 3501 §2.3.3): the file's mtime, read when asked for."""
        first = rec.filename

        def date() -> float:
            # The name may have changed since (flags): try the one we know now too.
            for name in (first, rec.filename):
                with contextlib.suppress(FileNotFoundError):
                    return os.stat(f"{self.path}/cur/{name}").st_mtime
            head = rec.base.split(".", 1)[0]
            return float(head) if head.isdigit() else 0.0

        return date

    def _info(self, rec: UidRecord) -> MessageInfo:
        letters = info_letters(rec.filename)
        flags = frozenset(LETTER_FLAGS[c] for c in letters if c in LETTER_FLAGS)
        keywords = frozenset(
            kw
            for c in letters
            if "a" <= c <= "z" and (kw := self._keywords[ord(c) - ord("a")]) is not None
        )
        vsize = self._sizes(rec)[1]
        return MessageInfo(
            rec.uid, vsize, flags, keywords, rec.modseq, self._date_of(rec), rec.base
        )

    def messages(self) -> list[MessageInfo]:
        """Every message in UID order; the list is kept until the index changes."""
        with self._mutex:
            if self._infos is None:
                records = sorted(self._by_uid.values(), key=lambda r: r.uid)
                self._infos = [self._info(r) for r in records]
            return list(self._infos)

    def message(self, uid: int) -> MessageInfo:
        """The MessageInfo of one UID (KeyError if unknown)."""
        with self._mutex:
            return self._info(self._by_uid[uid])

    def open_message(self, uid: int) -> BinaryIO:
        """The message's text.  The record is read without the folder's mutex (one
        dict lookup), so readers do not wait for a write's fsyncs; a file renamed
        meanwhile is looked up again after the write in progress, then after a
        synchronisation (renamed or removed by another program)."""
        for attempt in range(3):
            if attempt == 0:
                rec = self._by_uid[uid]
            else:
                with self._mutex:
                    if attempt == 2:
                        self._sync()
                    rec = self._by_uid[uid]
            path = f"{self.path}/cur/{rec.filename}"
            try:
                size, vsize = self._sizes(rec)
                if size == vsize:
                    return open(path, "rb")
                return open_crlf(path, 0, size)  # LF file (Dovecot, procmail): CRLF view
            except FileNotFoundError:
                continue
        raise KeyError(uid)

    def read_messages(self, uids: Iterable[int], limit: int = SMALL_READ) -> dict[int, bytes]:
        """uid -> the whole text of each message, for small ones (POP3 read-ahead).

        A message gone (unknown UID, file removed) is left out.  The common case
        (a CRLF file whose name gives its size) is one open, read and close per
        message without a file object; a file renamed meanwhile (flag change),
        an LF file or a big one goes through ``open_message``, which looks it up
        again.
        """
        out: dict[int, bytes] = {}
        by_uid, sizes, cached = self._by_uid, self._sizes, self._size_cache
        cur = f"{self.path}/cur/"
        flags = os.O_RDONLY | os.O_CLOEXEC
        for uid in uids:
            rec = by_uid.get(uid)
            if rec is not None:
                size, vsize = cached.get(rec.base) or sizes(rec)
                if size == vsize and size <= limit:
                    try:
                        fd = os.open(cur + rec.filename, flags)
                    except FileNotFoundError:
                        pass  # renamed or removed: open_message looks again
                    else:
                        try:
                            data = os.read(fd, size + 1)
                            if len(data) > size:  # longer than its name says: read on
                                data = _read_rest(fd, data)
                        finally:
                            os.close(fd)
                        out[uid] = data
                        continue
            try:
                with self.open_message(uid) as f:
                    out[uid] = f.read()
            except (KeyError, FileNotFoundError):
                continue
        return out

    def _letters_for(self, flags: Iterable[str], old_letters: str) -> str:
        """Flag letters for ``flags``, keeping letters we do not manage (P).  Lock held."""
        system, keywords = split_flags(flags)
        letters = {c for c in old_letters if c.isupper() and c not in LETTER_FLAGS}
        letters |= {FLAG_LETTERS[f] for f in system}
        if keywords:
            slots = parse_keywords(read_file(os.path.join(self.path, KEYWORDS_NAME)))
            added = False
            for kw in sorted(keywords):
                if kw in slots:
                    idx = slots.index(kw)
                elif None in slots:
                    idx = slots.index(None)
                    slots[idx] = kw
                    added = True
                else:
                    raise TooManyKeywords(f"no room for keyword {kw!r} in {self.name}")
                letters.add(chr(ord("a") + idx))
            if added:
                write_atomic(
                    os.path.join(self.path, KEYWORDS_NAME),
                    serialize_keywords(slots),
                    fsync=self.fsync,
                )
            self._keywords = slots
            self._infos = None
        return "".join(sorted(letters))

    def set_flags(self, uid: int, flags: Any) -> MessageInfo:
        """Replace the flags and keywords of one message (RFC 3501 §6.4.6 STORE FLAGS)."""
        flags = list(flags)
        with self._locked():
            self._current_locked()
            for attempt in range(2):
                rec = self._by_uid.get(uid)
                if rec is None:
                    raise KeyError(uid)
                old = rec.filename
                letters = self._letters_for(flags, info_letters(old))
                if letters == "".join(sorted(info_letters(old))):
                    return self._info(rec)
                new_name = with_letters(rec.base, letters)
                ours = self._cur_ours()
                try:
                    os.rename(
                        os.path.join(self.path, "cur", old),
                        os.path.join(self.path, "cur", new_name),
                    )
                except FileNotFoundError:
                    if attempt:
                        raise
                    self._sync_locked()  # renamed or removed by another program
                    continue
                self._changed_cur(ours)
                self._journal_change(rec, new_name)
                return self._info(rec)
        raise AssertionError("unreachable")

    def _place(self, tmp: str, flags: Iterable[str]) -> str:
        """Move a complete file into cur/ with its flags (lock held); returns its name."""
        name = with_letters(os.path.basename(tmp), self._letters_for(flags, ""))
        os.rename(tmp, os.path.join(self.path, "cur", name))
        return name

    def _cur_ours(self) -> bool:
        """Is cur/ as our last change left it?  (Lock held.)"""
        return self._cur_seen is not None and _stat3(f"{self.path}/cur") == self._cur_seen

    def _changed_cur(self, ours: bool) -> None:
        """After our own change to cur/ (lock held): remember how it looks if it was
        ``ours`` (``_cur_ours()``) before, else forget (the next add lists it)."""
        self._cur_seen = _stat3(f"{self.path}/cur") if ours else None

    def _quick_add(self) -> bool:
        """Can files about to be placed in cur/ get UIDs without listing it?  (Lock held.)

        Yes when the index is current, nothing waits in new/ (deliveries get
        their UIDs first: UIDs follow arrival) and cur/ is as our last change
        left it (with the kernel's fine-grained directory timestamps, any
        change by another program since gives cur/ another mtime).
        """
        return (
            self._index_current()
            and self._cur_ours()
            and not any(not n.startswith(".") for n in _listdir(os.path.join(self.path, "new")))
        )

    def _add_placed(self, names: list[str], quick: bool) -> list[UidRecord]:
        """Give UIDs to files the caller just put in cur/ (lock held), in this order.

        ``quick`` (``_quick_add()`` before placing them): cur/ is not listed;
        it is fsynced and the new records appended to the uidlist, as
        Dovecot's maildir saving does.  Else one full synchronisation.
        """
        if not quick:
            self._sync_locked(order=[base_name(n) for n in names])
            by_base = {r.base: r for r in self._by_uid.values()}
            return [by_base[base_name(n)] for n in names]
        uidlist = self._uidlist
        assert uidlist is not None
        self._changed_cur(True)  # _quick_add() said it was ours just before
        if self.fsync:
            fsync_dir(os.path.join(self.path, "cur"))
        self._index_key = None  # read again if the uidlist cannot be appended to
        added: list[UidRecord] = []
        for name in names:
            uidlist.highest_modseq += 1
            added.append(UidRecord(uidlist.nextuid, name, uidlist.highest_modseq))
            uidlist.nextuid += 1
        uidlist.records.extend(added)
        try:
            key = self._append_records(added)
        except UidListError:  # a last line we cannot make sense of: start afresh
            key = self._write_index(uidlist)
        for rec in added:
            self._by_uid[rec.uid] = rec
        self._uidlist = uidlist
        self._infos = None
        self._index_key = key
        self._trust(key)
        return added

    def stage(self, source: Any, internal_date: float | None = None) -> StagedMessage:
        """Write a message to be appended to tmp/, fsynced, without the folder's lock.

        ``append(staged, flags, internal_date)`` then only places it in cur/
        and gives it its UID, so the writing and its fsync need not wait for
        (or hold up) other writers of the folder.  The quota is checked here;
        ``discard()`` removes a staged message that is not appended.
        """
        tmp, size, vsize = write_message(
            self.path,
            source,
            b"",
            fsync=self.fsync,
            quota=self.account._quota(),
            internal_date=internal_date,
        )
        final = tmp + size_suffix(size, vsize)
        try:
            os.rename(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return StagedMessage(self.path, final, size, internal_date)

    def append(
        self,
        source: Any,
        flags: Any = (),
        internal_date: float | None = None,
    ) -> int:
        """APPEND (RFC 3501 §6.3.11): store a message with flags and date; returns its UID.

        ``source`` may be a message ``stage()``d for this folder.
        """
        flags = list(flags)
        split_flags(flags)
        quota = self.account._quota()
        if isinstance(source, StagedMessage) and source.folder == self.path:
            staged = source
            if internal_date is not None and internal_date != staged.internal_date:
                os.utime(staged.path, (internal_date, internal_date))
        else:
            if isinstance(source, StagedMessage):  # staged for another folder: copy it
                source = source.path
            staged = self.stage(source, internal_date)
        final, size = staged.path, staged.size
        try:
            with self._locked():
                quick = self._quick_add()
                [rec] = self._add_placed([self._place(final, flags)], quick)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(final)
            raise
        quota.add(size, 1)
        return rec.uid

    def copy_to(self, uids: Any, target: Any) -> dict[int, int]:
        """COPY (RFC 3501 §6.4.7, UIDPLUS RFC 4315): returns {source uid: new uid}."""
        infos = []
        with self._mutex:
            self._sync()  # names change with flags: copy the files as they are now
            for uid in sorted(set(uids)):
                rec = self._by_uid.get(uid)
                if rec is not None:
                    infos.append((uid, rec, self._info(rec), self._sizes(rec)[0]))
        if not isinstance(target, MaildirFolder):
            return self._copy_by_append([uid for uid, *_ in infos], target)
        quota = target.account._quota()
        quota.check(sum(size for _, _, _, size in infos), len(infos))
        placed: list[tuple[int, str, int]] = []
        with target._locked():
            quick = target._quick_add()
            for uid, rec, info, size in infos:
                base = unique_name() + size_suffix(size, info.size)
                letters = target._letters_for(info.all_flags, info_letters(rec.filename))
                name = with_letters(base, letters)
                dest = os.path.join(target.path, "cur", name)
                src = os.path.join(self.path, "cur", rec.filename)
                try:
                    os.link(src, dest)
                except FileNotFoundError:
                    continue  # expunged meanwhile
                except OSError:
                    tmp, _, _ = write_message(target.path, src, b"", fsync=self.fsync)
                    os.utime(tmp, (info.internal_date, info.internal_date))
                    os.rename(tmp, dest)
                placed.append((uid, name, size))
            added = target._add_placed([n for _, n, _ in placed], quick) if placed else []
        quota.add(sum(s for _, _, s in placed), len(placed))
        return {uid: rec.uid for (uid, _, _), rec in zip(placed, added, strict=True)}

    def expunge(self, uids: Any) -> list[int]:
        """Remove messages for good; returns the UIDs actually removed.

        The files are unlinked, cur/ fsynced once, and one journal line
        records them all (no uidlist rewrite).
        """
        wanted = set(uids)
        removed: list[int] = []
        freed = 0
        with self._locked():
            uidlist = self._current_locked()
            cur = os.path.join(self.path, "cur")
            ours = self._cur_ours()
            missing: list[UidRecord] = []
            for rec in uidlist.records:
                if rec.uid in wanted:
                    size = self._sizes(rec)[0]
                    try:
                        os.unlink(f"{cur}/{rec.filename}")
                    except FileNotFoundError:
                        missing.append(rec)
                    else:
                        freed += size
                        removed.append(rec.uid)
            if missing:  # renamed (flags) or removed by another program: look again
                files = self._list_files()
                for rec in missing:
                    found = files.get(rec.base)
                    if found is None:
                        removed.append(rec.uid)  # gone all the same: record it below
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.path, *found))
                        freed += self._sizes(rec)[0]
                    removed.append(rec.uid)
            if removed:
                for uid in removed:
                    self._size_cache.pop(self._by_uid[uid].base, None)
                self._changed_cur(ours and not missing)
                if self.fsync:
                    fsync_dir(cur)
                gone = set(removed)
                uidlist.records = [r for r in uidlist.records if r.uid not in gone]
                self._journal_expunge(uidlist, removed)
                key = self._index_key
                self._install(uidlist, key or IndexKey(*self._stat_index(), False))
        if removed:
            self.account._quota().add(-freed, -len(removed))
        return sorted(removed)

    def _expunge_history(self) -> tuple[list[tuple[int, list[int]]], int, int]:
        uidlist = self._uidlist
        assert uidlist is not None
        return uidlist.expunged, uidlist.history_floor, uidlist.nextuid

    def clean_tmp(self, max_age: float = TMP_MAX_AGE) -> int:
        """Remove tmp/ files older than ``max_age`` (maildir spec: 36 hours)."""
        removed = 0
        now = time.time()
        tmp = os.path.join(self.path, "tmp")
        for name in _listdir(tmp):
            path = os.path.join(tmp, name)
            with contextlib.suppress(FileNotFoundError):
                if now - os.stat(path).st_mtime > max_age:
                    os.unlink(path)
                    removed += 1
        return removed

    def close(self) -> None:
        with self._mutex:
            self._size_cache.clear()
