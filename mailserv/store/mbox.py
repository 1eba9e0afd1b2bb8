"""mbox store (mboxrd) with a sidecar UID index.

Layout::

    <mailbox>                               INBOX (e.g. /var/mail/alice)
    <mailbox>.lock                          dotlock while anyone writes it
    <mailbox>.folders/A.B.mbox              folder "A/B" (levels in modified UTF-7)
    <mailbox>.folders/.mailserv/index/<name>.json   UID index of each folder (INBOX.json, A.B.json)
    <mailbox>.folders/.mailserv/subscriptions       Dovecot v2 subscriptions file
    <mailbox>.folders/.mailserv/maildirsize         Maildir++ quota of all the files (raw bytes)

Locking (LIMITS.md "mbox lock"): a ``<file>.lock`` dotlock (link(2) of a
temp file, as mutt, procmail and Postfix local do), then an exclusive fcntl
lock on the file; 20 attempts 1 s apart by default (the wait budget is
attempts * delay, polled more often), a dotlock older than 500 s, or left
by a dead process on this host, is stale.

Writing (RFC 4155, mboxrd): ``From <sender> <asctime UTC>`` line, the message
with CRLF turned into LF and every ``>*From `` line start quoted with one more
``>``, a final newline and one blank line; then fsync.  If the write fails
the file is truncated back to its previous size.  Before appending, the
previous size is noted in the dotlock; whoever breaks the lock of a writer
that died (SIGKILL) truncates the file back to it, so no partial message
survives.

Reading: ``open_message`` undoes the quoting and gives CRLF line ends; the
``size`` of a message is that form's length.  Flags, keywords and modseq live
in the sidecar index (a message written by another program starts with the
flags of its Status:/X-Status:/X-Keywords: headers); the message bytes are
never rewritten for a flag change.  The index is keyed by byte offset and a
SHA-256 of each message: when another program changed the file, messages
found again (same content) keep their UIDs; if their order changed the
folder gets a new UIDVALIDITY.  Expunge writes a new file under the lock,
fsyncs it and renames it over the old one.
"""

from __future__ import annotations

import calendar
import contextlib
import fcntl
import hashlib
import io
import json
import mmap
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, BinaryIO

from zope.interface import implementer

from mailserv.durable import (
    CHUNK,
    fsync_dir,
    line_regions,
    next_uidvalidity,
    open_crlf,
    open_source,
    read_file,
    source_size,
    stat_signature,
    sub_line_starts,
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
    folder_fs_name,
    split_flags,
    split_folder_name,
)
from mailserv.store.account import AccountBase, FolderBase
from mailserv.store.dotlock import DotLock, LockTimeout
from mailserv.store.quota import MAILDIRSIZE, MaildirSize, limits_for
from mailserv.store.uidlist import EXPUNGE_HISTORY, parse_uid_set, uid_set

LOCK_ATTEMPTS = 20
LOCK_DELAY = 1.0
LOCK_STALE = 500.0
INDEX_VERSION = 1
_FROM_QUOTED = re.compile(rb"(?m)^>*From ")
_QUOTED_LINE = re.compile(rb"(?m)^>+From ")
_RETURN_PATH = re.compile(rb"(?im)^Return-Path:[ \t]*<([^>\r\n]*)>")
_STATUS_FLAGS = {"R": "\\Seen"}
_XSTATUS_FLAGS = {"A": "\\Answered", "F": "\\Flagged", "T": "\\Draft", "D": "\\Deleted"}


class MboxLock:
    """dotlock + fcntl lock of one mbox file; repairs a half-written append it finds."""

    def __init__(
        self,
        path: str,
        *,
        attempts: int = LOCK_ATTEMPTS,
        delay: float = LOCK_DELAY,
        stale: float = LOCK_STALE,
        fsync: bool = True,
    ) -> None:
        self.path = path
        self.timeout = attempts * delay
        self.dotlock = DotLock(
            path + ".lock", stale_timeout=stale, timeout=self.timeout, max_poll=min(delay, 0.05)
        )
        self.fsync = fsync
        self.fd = -1

    def acquire(self) -> int:
        """Lock; returns a read/write fd of the mbox (created if missing)."""
        deadline = time.monotonic() + self.timeout
        self.dotlock.acquire()
        try:
            self._keep_repair_note()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                delay = 0.005
                while True:
                    try:
                        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except OSError:
                        if time.monotonic() >= deadline:
                            raise LockTimeout(f"could not lock {self.path}") from None
                        time.sleep(delay)
                        delay = min(delay * 2, 0.05)
                self._repair(fd)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            self.dotlock.release()
            raise
        self.fd = fd
        return fd

    @property
    def _repair_path(self) -> str:
        return self.path + ".lock.repair"

    def _keep_repair_note(self) -> None:
        """Write down, before anything can fail, what the dead writer's lock said.

        ``<mbox>.lock.repair`` holds ``<size before its append> <size when it died>``
        until the file is repaired, so the note outlives us if the fcntl lock
        cannot be had now.
        """
        content = self.dotlock.broken_content
        self.dotlock.broken_content = None
        if not content:
            return
        for line in content.decode("ascii", "replace").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == "append" and parts[1].isdigit():
                try:
                    current = os.stat(self.path).st_size
                except FileNotFoundError:
                    return
                write_atomic(self._repair_path, f"{parts[1]} {current}\n".encode(), fsync=False)

    def _repair(self, fd: int) -> None:
        """Undo the partial append of a writer that died holding the lock (fcntl held)."""
        note = read_file(self._repair_path)
        if note is None:
            return
        try:
            before, at_death = (int(x) for x in note.split())
        except ValueError:
            before, at_death = -1, -1
        size = os.fstat(fd).st_size
        if 0 <= before < size and size == at_death:  # nobody wrote after it died
            os.ftruncate(fd, before)
            if self.fsync:
                os.fsync(fd)
        os.unlink(self._repair_path)

    def note_append(self, size: int) -> None:
        self.dotlock.note(f"append {size}")

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.lockf(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1
        self.dotlock.release()

    def __enter__(self) -> int:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------------
# Writing


def _sender_from(prefix: bytes) -> str:
    m = _RETURN_PATH.search(prefix)
    sender = m.group(1).decode("ascii", "replace") if m else ""
    sender = re.sub(r"\s", "", sender)
    return sender or "MAILER-DAEMON"


def from_line(sender: str, when: float) -> bytes:
    """``From sender Wed Nov 25 10:00:00 2026`` (RFC 4155, date in UTC)."""
    return f"From {sender} {time.asctime(time.gmtime(when))}\n".encode()


def quote_lines(source: BinaryIO) -> Iterator[bytes]:
    """The message in mboxrd form: LF line ends, ``>*From `` quoted (RFC 4155)."""
    last = b"\n"
    for region, at_start in line_regions(source.read):
        out = sub_line_starts(_FROM_QUOTED, rb">\g<0>", region.replace(b"\r\n", b"\n"), at_start)
        if out:
            last = out[-1:]
            yield out
    if last != b"\n":
        yield b"\n"


def _append(
    lock: MboxLock,
    fd: int,
    source: str | os.PathLike[str] | IO[bytes],
    prefix: bytes,
    when: float,
    fsync: bool,
    check: Callable[[int], None] | None = None,
) -> int:
    """Append one message at the end of the locked mbox; returns the bytes written.

    ``check(written)`` may raise (over quota) before the data is made durable:
    the file is then truncated back.
    """
    start = os.lseek(fd, 0, os.SEEK_END)
    lock.note_append(start)
    written = 0
    try:
        sep = b""
        if start:
            tail = os.pread(fd, 2, start - 2) if start >= 2 else os.pread(fd, 1, 0)
            sep = b"" if tail.endswith(b"\n\n") else (b"\n" if tail.endswith(b"\n") else b"\n\n")
        buf = bytearray(sep + from_line(_sender_from(prefix), when))
        with open_source(source) as src:
            streams: list[BinaryIO] = [io.BytesIO(prefix), src] if prefix else [src]
            for stream in _chain(streams):
                for line in quote_lines(stream):
                    buf += line
                    if len(buf) >= CHUNK:
                        write_all(fd, buf)
                        written += len(buf)
                        buf.clear()
        buf += b"\n"
        write_all(fd, buf)
        written += len(buf)
        if check is not None:
            check(written)
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.ftruncate(fd, start)
        if fsync:
            with contextlib.suppress(OSError):
                os.fsync(fd)
        raise
    return written


def _chain(streams: list[BinaryIO]) -> Iterator[BinaryIO]:
    """Present prefix + source as one stream (prefix always ends with a line end)."""
    if len(streams) == 1:
        yield streams[0]
        return

    class _Joined(io.RawIOBase):
        def __init__(self) -> None:
            self.parts = list(streams)

        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            while self.parts:
                data = self.parts[0].read(len(b))
                if data:
                    b[: len(data)] = data
                    return len(data)
                self.parts.pop(0)
            return 0

    yield io.BufferedReader(_Joined(), CHUNK)


# ---------------------------------------------------------------------------
# Reading


@dataclass
class Entry:
    """One message of the index."""

    uid: int
    offset: int  # of its From line
    body: int  # offset of the first message byte
    length: int  # stored bytes of the message (quoted, LF)
    size: int  # bytes open_message yields (unquoted, CRLF)
    digest: str
    modseq: int
    flags: list[str] = field(default_factory=list)
    internal_date: float = 0.0

    def to_json(self) -> list[Any]:
        return [
            self.uid,
            self.offset,
            self.body,
            self.length,
            self.size,
            self.digest,
            self.modseq,
            self.flags,
            self.internal_date,
        ]

    @classmethod
    def from_json(cls, row: list[Any]) -> Entry:
        return cls(*row)


@dataclass
class Scanned:
    offset: int
    body: int
    length: int
    size: int
    digest: str
    flags: list[str]
    internal_date: float


def _parse_date(line: bytes, fallback: float) -> float:
    m = re.search(rb"(\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4})", line)
    if m:
        with contextlib.suppress(ValueError):
            return float(
                calendar.timegm(time.strptime(m.group(1).decode(), "%a %b %d %H:%M:%S %Y"))
            )
    return fallback


def _header_flags(data: bytes) -> list[str]:
    """Flags of a message written by mutt/Dovecot: Status:, X-Status:, X-Keywords:."""
    end = data.find(b"\n\n")
    head = data[: end if end >= 0 else len(data)]
    flags: set[str] = set()
    for m in re.finditer(rb"(?im)^(Status|X-Status|X-Keywords):[ \t]*([^\n]*)", head):
        name, value = m.group(1).lower(), m.group(2).decode("ascii", "replace").strip()
        if name == b"status":
            flags |= {_STATUS_FLAGS[c] for c in value if c in _STATUS_FLAGS}
        elif name == b"x-status":
            flags |= {_XSTATUS_FLAGS[c] for c in value if c in _XSTATUS_FLAGS}
        else:
            for kw in re.split(r"[\s,]+", value):
                with contextlib.suppress(ValueError):
                    flags |= split_flags([kw])[1]
    return sorted(flags)


#: Headers mail readers rewrite in place (mutt: Status, X-Status, Content-Length, Lines;
#: Dovecot and others: X-Keywords, X-UID, X-IMAP*); left out of a message's identity.
_VOLATILE = re.compile(
    rb"(?im)^(?:status|x-status|x-keywords|x-uid|x-imap|x-imapbase|content-length|lines):"
    rb"[^\n]*\n(?:[ \t][^\n]*\n)*"
)


def message_digest(data: bytes) -> str:
    """What identifies a stored message across rewrites by other programs.

    The volatile headers above and trailing line ends (a writer may add one
    to separate the next message) are left out.
    """
    end = data.find(b"\n\n")
    head, body = (data, b"") if end < 0 else (data[: end + 1], data[end + 1 :])
    return hashlib.sha256(_VOLATILE.sub(b"", head) + body.rstrip(b"\r\n")).hexdigest()[:32]


def scan(mm: bytes | mmap.mmap, start: int, end: int, mtime: float) -> list[Scanned]:
    """Split ``mm[start:end]`` (which begins at a From line) into messages."""
    out: list[Scanned] = []
    pos = start
    while pos < end:
        nxt = mm.find(b"\nFrom ", pos, end)
        stop = end if nxt < 0 else nxt + 1
        line_end = mm.find(b"\n", pos, stop)
        body = stop if line_end < 0 else line_end + 1
        data = bytes(mm[body:stop])
        if data.endswith(b"\n\n") or data == b"\n":
            data = data[:-1]  # the separating blank line
        size = len(data) + data.count(b"\n") - data.count(b"\r\n") - len(_QUOTED_LINE.findall(data))
        out.append(
            Scanned(
                offset=pos,
                body=body,
                length=len(data),
                size=size,
                digest=message_digest(data),
                flags=_header_flags(data[:65536]),
                internal_date=_parse_date(bytes(mm[pos:body]), mtime),
            )
        )
        pos = stop
    return out


# ---------------------------------------------------------------------------
# Store, account, folder


def folders_dir(mailbox: str) -> str:
    """Where the non-INBOX folders of an mbox user live."""
    return mailbox.rstrip("/") + ".folders"


@implementer(IMailStore)
class MboxStore:
    """mbox delivery and access for users whose ``mailbox`` is an mbox file."""

    def __init__(
        self,
        config: object,
        *,
        lock_attempts: int = LOCK_ATTEMPTS,
        lock_delay: float = LOCK_DELAY,
        lock_stale: float = LOCK_STALE,
    ) -> None:
        self.config = config
        self.fsync = bool(getattr(config, "fsync", True))
        self.lock_attempts = lock_attempts
        self.lock_delay = lock_delay
        self.lock_stale = lock_stale

    def lock(self, path: str) -> MboxLock:
        return MboxLock(
            path,
            attempts=self.lock_attempts,
            delay=self.lock_delay,
            stale=self.lock_stale,
            fsync=self.fsync,
        )

    def quota_for(self, user: object) -> MaildirSize:
        mailbox: str = user.mailbox  # type: ignore[attr-defined]
        meta = os.path.join(folders_dir(mailbox), ".mailserv")
        os.makedirs(meta, mode=0o700, exist_ok=True)
        return MaildirSize(
            os.path.join(meta, MAILDIRSIZE), limits_for(user, self.config), lambda: _usage(mailbox)
        )

    def folder_path(self, user: object, folder: str | None) -> str:
        mailbox: str = user.mailbox  # type: ignore[attr-defined]
        parts = split_folder_name(folder) if folder is not None else ("INBOX",)
        if parts == ("INBOX",):
            return mailbox
        return os.path.join(folders_dir(mailbox), folder_fs_name(parts) + ".mbox")

    def deliver(
        self,
        user: object,
        source: Any,
        folder: str | None = None,
        prefix: bytes = b"",
        internal_date: float | None = None,
    ) -> str:
        """Append one message under the mbox lock; returns ``"<offset>"``; durable on return."""
        path = self.folder_path(user, folder)
        directory = os.path.dirname(path)
        created = not os.path.exists(path)
        if created:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        quota = self.quota_for(user)
        hint = source_size(source)
        if hint is not None:
            quota.check(len(prefix) + hint)
        else:
            quota.usage()  # settle maildirsize before the file grows
        lock = self.lock(path)
        fd = lock.acquire()
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            check = None if hint is not None else quota.check
            when = internal_date or time.time()
            written = _append(lock, fd, source, prefix, when, self.fsync, check)
        finally:
            lock.release()
        if created and self.fsync:
            fsync_dir(directory)
        quota.add(written, 1)
        return str(start)

    def open(self, user: object) -> MboxAccount:
        return MboxAccount(self, user)


def _usage(mailbox: str) -> tuple[int, int]:
    """(raw bytes, messages) of every mbox file of a user."""
    paths = [mailbox] + [
        os.path.join(folders_dir(mailbox), e)
        for e in _listdir(folders_dir(mailbox))
        if e.endswith(".mbox")
    ]
    total = count = 0
    for path in paths:
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size:
                    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                        count += (1 if mm[:5] == b"From " else 0) + _count(mm, b"\nFrom ")
        except FileNotFoundError:
            continue
        total += size
    return total, count


def _count(mm: mmap.mmap, needle: bytes) -> int:
    n, pos = 0, mm.find(needle)
    while pos >= 0:
        n += 1
        pos = mm.find(needle, pos + 1)
    return n


@implementer(IMailAccount)
class MboxAccount(AccountBase):
    """The folders of one mbox user (folder ``A/B`` is ``<mailbox>.folders/A.B.mbox``)."""

    def __init__(self, store: MboxStore, user: object) -> None:
        super().__init__(store, user)
        self.mailbox = self.inbox_path
        self.dir = folders_dir(self.mailbox)
        self.meta = os.path.join(self.dir, ".mailserv")
        os.makedirs(os.path.join(self.meta, "index"), mode=0o700, exist_ok=True)
        if not os.path.exists(self.mailbox):
            os.close(os.open(self.mailbox, os.O_WRONLY | os.O_CREAT, 0o600))
        self._ensure_special_folders()

    def _fs_path(self, fs_name: str) -> str:
        return os.path.join(self.dir, fs_name + ".mbox")

    def _fs_names(self) -> list[str]:
        return [
            e[: -len(".mbox")]
            for e in _listdir(self.dir)
            if e.endswith(".mbox") and not e.startswith(".")
        ]

    def _index_path(self, name: str) -> str:
        parts = split_folder_name(name)
        key = "INBOX" if parts == ("INBOX",) else folder_fs_name(parts)
        return os.path.join(self.meta, "index", key + ".json")

    def _exists(self, path: str) -> bool:
        return os.path.isfile(path)

    def _make_one(self, path: str) -> None:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))

    def _remove(self, name: str, path: str) -> None:
        with self.store.lock(path):
            os.unlink(path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._index_path(name))

    def _rename_one(self, old_fs: str, new_fs: str) -> None:
        os.rename(self._fs_path(old_fs), self._fs_path(new_fs))
        index = os.path.join(self.meta, "index")
        with contextlib.suppress(FileNotFoundError):
            os.rename(os.path.join(index, old_fs + ".json"), os.path.join(index, new_fs + ".json"))

    def _open(self, name: str, path: str) -> MboxFolder:
        return MboxFolder(self, name, path, self._index_path(name))

    def _quota(self) -> MaildirSize:
        return self.store.quota_for(self.user)

    def _subscriptions_path(self) -> str:
        return os.path.join(self.meta, "subscriptions")


@dataclass
class _Index:
    uidvalidity: int
    uidnext: int = 1
    highest_modseq: int = 1
    ino: int = 0
    size: int = 0
    mtime_ns: int = 0
    entries: list[Entry] = field(default_factory=list)
    #: (modseq, UIDs) of each expunge, oldest first (QRESYNC VANISHED (EARLIER))
    expunged: list[tuple[int, list[int]]] = field(default_factory=list)
    #: expunges with a modseq above this are all in ``expunged``
    history_floor: int = 0

    def record_expunge(self, uids: list[int]) -> None:
        """Note ``uids`` as expunged with the current highest modseq; bound the history."""
        self.expunged.append((self.highest_modseq, sorted(uids)))
        kept = sum(len(u) for _, u in self.expunged)
        while kept > EXPUNGE_HISTORY:
            modseq, dropped = self.expunged.pop(0)
            kept -= len(dropped)
            self.history_floor = max(self.history_floor, modseq)


@implementer(IMailbox)
class MboxFolder(FolderBase):
    """One mbox file and its sidecar UID index."""

    def __init__(self, account: MboxAccount, name: str, path: str, index_path: str) -> None:
        self.account = account
        self.store = account.store
        self.name = name
        self.path = path
        self.index_path = index_path
        self.fsync = self.store.fsync
        self._mutex = threading.RLock()
        self._index = _Index(uidvalidity=0)
        self._by_uid: dict[int, Entry] = {}
        self._sig: tuple[tuple[int, int, int], ...] | None = None
        self.refresh()

    # -- index ------------------------------------------------------------

    def _load(self) -> _Index | None:
        data = read_file(self.index_path)
        if not data:
            return None
        try:
            raw = json.loads(data)
            if raw.get("version") != INDEX_VERSION:
                return None
            expunged = []
            for modseq, text in raw.get("expunged", []):
                uids = parse_uid_set(text)
                if uids is None:
                    raise ValueError(f"bad expunged UIDs {text!r}")
                expunged.append((int(modseq), uids))
            return _Index(
                uidvalidity=int(raw["uidvalidity"]),
                uidnext=int(raw["uidnext"]),
                highest_modseq=int(raw["highest_modseq"]),
                ino=int(raw["ino"]),
                size=int(raw["size"]),
                mtime_ns=int(raw["mtime_ns"]),
                entries=[Entry.from_json(r) for r in raw["entries"]],
                expunged=expunged,
                # An index written before expunges were recorded: none known up to now.
                history_floor=int(raw.get("history_floor", raw["highest_modseq"])),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def _save(self, index: _Index) -> None:
        data = {
            "version": INDEX_VERSION,
            "uidvalidity": index.uidvalidity,
            "uidnext": index.uidnext,
            "highest_modseq": index.highest_modseq,
            "ino": index.ino,
            "size": index.size,
            "mtime_ns": index.mtime_ns,
            "entries": [e.to_json() for e in index.entries],
            "expunged": [[m, uid_set(uids)] for m, uids in index.expunged],
            "history_floor": index.history_floor,
        }
        write_atomic(
            self.index_path, json.dumps(data, separators=(",", ":")).encode(), fsync=self.fsync
        )

    def _install(self, index: _Index) -> None:
        self._index = index
        self._by_uid = {e.uid: e for e in index.entries}

    def _unchanged(self, index: _Index | None) -> bool:
        if index is None:
            return False
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_ino, st.st_size, st.st_mtime_ns) == (index.ino, index.size, index.mtime_ns)

    def _sync_locked(self, fd: int) -> _Index:
        """Bring the index up to date with the (locked) file."""
        old = self._load()
        st = os.fstat(fd)
        index = old or _Index(uidvalidity=next_uidvalidity(self.account.meta))
        changed = old is None
        if old is not None and (st.st_ino, st.st_size, st.st_mtime_ns) == (
            old.ino,
            old.size,
            old.mtime_ns,
        ):
            self._install(old)
            return old
        with contextlib.ExitStack() as stack:
            mm: bytes | mmap.mmap = b""
            if st.st_size:
                mm = stack.enter_context(mmap.mmap(fd, 0, access=mmap.ACCESS_READ))
            fresh = None
            if old is not None and old.ino == st.st_ino and st.st_size > old.size:
                fresh = self._appended(mm, old, st)
            if fresh is not None:
                for s in fresh:
                    index.highest_modseq += 1
                    index.entries.append(self._entry(index.uidnext, s, index.highest_modseq))
                    index.uidnext += 1
                changed = True
            else:
                scanned = scan(mm, 0, st.st_size, st.st_mtime)
                changed = self._rebuild(index, scanned) or changed
        index.ino, index.size, index.mtime_ns = st.st_ino, st.st_size, st.st_mtime_ns
        self._save(index)
        self._install(index)
        return index

    @staticmethod
    def _entry(uid: int, s: Scanned, modseq: int) -> Entry:
        return Entry(
            uid, s.offset, s.body, s.length, s.size, s.digest, modseq, s.flags, s.internal_date
        )

    @staticmethod
    def _appended(mm: bytes | mmap.mmap, old: _Index, st: os.stat_result) -> list[Scanned] | None:
        """The messages appended after ``old.size``, or None if anything before changed."""
        start = old.size
        while start < st.st_size and mm[start : start + 1] == b"\n":
            start += 1  # the separator a writer put before its From line
        if mm[start : start + 5] != b"From ":
            return None
        if old.entries:
            last = old.entries[-1]
            again = scan(mm, last.offset, start, st.st_mtime)
            if len(again) != 1 or again[0].digest != last.digest:
                return None
            last.length, last.size = again[0].length, again[0].size
        elif old.size and mm[:5] == b"From ":
            return None
        return scan(mm, start, st.st_size, st.st_mtime)

    def _rebuild(self, index: _Index, scanned: list[Scanned]) -> bool:
        """Match rescanned messages to known ones by (offset, digest), then digest."""
        by_key = {(ent.offset, ent.digest): ent for ent in index.entries}
        by_digest: dict[str, list[Entry]] = {}
        for ent in index.entries:
            by_digest.setdefault(ent.digest, []).append(ent)
        used: set[int] = set()
        matched: list[tuple[Scanned, Entry | None]] = []
        for s in scanned:
            e: Entry | None = by_key.get((s.offset, s.digest))
            if e is None or e.uid in used:
                e = next((c for c in by_digest.get(s.digest, []) if c.uid not in used), None)
            if e is not None:
                used.add(e.uid)
            matched.append((s, e))
        uids = [e.uid for _, e in matched if e is not None]
        if uids != sorted(uids):
            # Another program reordered the messages: UIDs cannot stay ascending.
            index.uidvalidity = next_uidvalidity(self.account.meta)
            index.uidnext = 1
            matched = [(s, None) for s, _ in matched]
            index.expunged, index.history_floor = [], index.highest_modseq
            used = set()
        entries: list[Entry] = []
        changed = len(used) != len(index.entries)
        if changed:
            index.highest_modseq += 1
            if index.uidnext > 1:  # removed by another program
                index.record_expunge([e.uid for e in index.entries if e.uid not in used])
        for s, e in matched:
            if e is None:
                index.highest_modseq += 1
                entries.append(self._entry(index.uidnext, s, index.highest_modseq))
                index.uidnext += 1
                changed = True
            else:
                if (e.offset, e.body) != (s.offset, s.body):
                    changed = True
                e.offset, e.body, e.length, e.size = s.offset, s.body, s.length, s.size
                entries.append(e)
        index.entries = entries
        return changed

    def _sync(self) -> None:
        """Bring the index up to date; reads nothing when neither file changed."""
        sig = stat_signature([self.path, self.index_path])
        if sig is not None and sig == self._sig:
            return
        if self._unchanged(self._load_cached()):
            self._sig = sig
            return
        with self.store.lock(self.path) as fd:
            self._sync_locked(fd)

    def _load_cached(self) -> _Index | None:
        index = self._load()
        if index is not None and self._unchanged(index):
            self._install(index)
            return index
        return None

    # -- IMailbox ---------------------------------------------------------

    @property
    def uidvalidity(self) -> int:
        return self._index.uidvalidity

    def uidnext(self) -> int:
        return self._index.uidnext

    def highest_modseq(self) -> int:
        return self._index.highest_modseq

    @staticmethod
    def _info(e: Entry) -> MessageInfo:
        system, keywords = split_flags(e.flags)
        return MessageInfo(
            e.uid, e.size, system, keywords, e.modseq, e.internal_date, str(e.offset)
        )

    def messages(self) -> list[MessageInfo]:
        with self._mutex:
            return [self._info(e) for e in self._index.entries]

    def message(self, uid: int) -> MessageInfo:
        with self._mutex:
            return self._info(self._by_uid[uid])

    def open_message(self, uid: int) -> BinaryIO:
        with self._mutex:
            if not self._unchanged(self._index):
                self._sync()
            e = self._by_uid[uid]
            return open_crlf(self.path, e.body, e.length, unquote_from=True)

    def set_flags(self, uid: int, flags: Any) -> MessageInfo:
        system, keywords = split_flags(list(flags))
        new = sorted(system | keywords)
        with self._mutex, self.store.lock(self.path) as fd:
            index = self._sync_locked(fd)
            e = self._by_uid.get(uid)
            if e is None:
                raise KeyError(uid)
            if sorted(e.flags) != new:
                index.highest_modseq += 1
                e.flags, e.modseq = new, index.highest_modseq
                self._save(index)
            return self._info(e)

    def append(
        self,
        source: Any,
        flags: Any = (),
        internal_date: float | None = None,
    ) -> int:
        system, keywords = split_flags(list(flags))
        quota = self.store.quota_for(self.account.user)
        with open_source(source) as src:
            data_hint = None
            with contextlib.suppress(OSError, AttributeError, ValueError):
                data_hint = os.fstat(src.fileno()).st_size
            if data_hint is not None:
                quota.check(data_hint)
            else:
                quota.usage()  # settle maildirsize before the file grows
            with self._mutex:
                lock = self.store.lock(self.path)
                fd = lock.acquire()
                try:
                    index = self._sync_locked(fd)
                    check = None if data_hint is not None else quota.check
                    when = internal_date or time.time()
                    written = _append(lock, fd, src, b"", when, self.fsync, check)
                    index = self._sync_locked(fd)
                    e = index.entries[-1]
                    e.flags = sorted(system | keywords)
                    self._save(index)
                finally:
                    lock.release()
        quota.add(written, 1)
        return e.uid

    def copy_to(self, uids: Any, target: Any) -> dict[int, int]:
        """COPY (RFC 3501 §6.4.7): appended to the target, flags and date kept."""
        return self._copy_by_append(uids, target)

    def expunge(self, uids: Any) -> list[int]:
        """Write the kept messages to a new file and rename it over the old one, under the lock."""
        wanted = set(uids)
        with self._mutex, self.store.lock(self.path) as fd:
            index = self._sync_locked(fd)
            gone = [e for e in index.entries if e.uid in wanted]
            if not gone:
                return []
            kept = [e for e in index.entries if e.uid not in wanted]
            st = os.fstat(fd)
            tmp = os.path.join(
                os.path.dirname(self.path), f".{os.path.basename(self.path)}.{unique_name()}"
            )
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, st.st_mode & 0o7777)
            try:
                pos = 0
                for e in kept:
                    head = e.body - e.offset
                    _copy_range(fd, out, e.offset, head + e.length)
                    write_all(out, b"\n")
                    e.offset, e.body = pos, pos + head
                    pos += head + e.length + 1
                if self.fsync:
                    os.fsync(out)
                os.close(out)
                out = -1
                os.rename(tmp, self.path)
            except BaseException:
                if out >= 0:
                    os.close(out)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            if self.fsync:
                fsync_dir(os.path.dirname(self.path) or ".")
            new_st = os.stat(self.path)
            index.entries = kept
            index.highest_modseq += 1
            index.record_expunge([e.uid for e in gone])
            index.ino, index.size, index.mtime_ns = (
                new_st.st_ino,
                new_st.st_size,
                new_st.st_mtime_ns,
            )
            self._save(index)
            self._install(index)
            freed = st.st_size - new_st.st_size
        self.store.quota_for(self.account.user).add(-freed, -len(gone))
        return [e.uid for e in gone]

    def _expunge_history(self) -> tuple[list[tuple[int, list[int]]], int, int]:
        index = self._index
        return index.expunged, index.history_floor, index.uidnext

    def close(self) -> None:
        pass


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    """Copy ``length`` bytes at ``offset`` of ``src`` to the end of ``dst``, in chunks."""
    while length > 0:
        sent = os.sendfile(dst, src, offset, min(length, 1 << 20))
        if sent == 0:
            raise OSError(f"mbox shrank while copying at offset {offset}")
        offset += sent
        length -= sent
