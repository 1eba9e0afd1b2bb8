"""The POP3 maildrop: a snapshot of an IMailbox for one session, and its lock.

RFC 1939 §3: once a client has authenticated, the server acquires an
exclusive-access lock on the maildrop so that messages are not modified or
removed before the session enters the UPDATE state.  Message numbers are fixed
for the session (§5: "message numbers ... do not change during the session"),
DELE only marks (§5, DELE) and the marked messages are removed at QUIT (§6),
all at once through ``IMailbox.expunge``.

Every method here that touches the disk is synchronous and is meant to run in
the ``disk`` thread pool; the in-memory bookkeeping (marks, counts) is done on
the reactor thread.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from mailserv.pop3.content import stuff_parts

# Messages up to this size are read in one go; bigger ones are streamed.
SMALL_MESSAGE = 256 * 1024
# RETR reads the next small messages along in the same disk job (clients fetch in order):
# at most this many messages and octets are held per session.
READ_AHEAD_MESSAGES = 64
READ_AHEAD_BYTES = 1024 * 1024
# Once fewer messages than this are left in the cache, the next ones are read in the background,
# PREFETCH_MESSAGES per job, one job after the other while fewer than PREFETCH_UPTO are cached
# (and within READ_AHEAD_BYTES): reading runs beside the client instead of in turn with it.
PREFETCH_BELOW = READ_AHEAD_MESSAGES * 3 // 4
PREFETCH_MESSAGES = 32
PREFETCH_UPTO = 3 * PREFETCH_MESSAGES
# At most this many messages are looked at to pick the next ones to read (big ones are skipped).
READ_AHEAD_SCAN = 4 * READ_AHEAD_MESSAGES


# A message read ahead: (content as stored, RETR's stuffed content, termination octets).
# The stuffing is done in the disk job, off the reactor; the stuffed content is the stored
# bytes themselves (not a copy) when nothing needed stuffing.
Content = tuple[bytes, bytes, bytes]


def prepare(data: bytes) -> Content:
    """A message's Content (mailserv.pop3.content.stuff_parts)."""
    body, end = stuff_parts(data)
    return data, body, end


def content_size(content: Content) -> int:
    """Octets held in memory for a Content."""
    data, body, _ = content
    return len(data) if body is data else len(data) + len(body)


class MaildropInUse(Exception):
    """Another session (in this process or another one) holds the maildrop: ``-ERR [IN-USE]``."""


class MaildropLock:
    """An exclusive, non-blocking lock on a user's maildrop, shared across processes.

    ``flock`` locks belong to the open file description, so two sessions of
    the same process conflict just like two processes do.  The lock file is
    named after a hash of the user's canonical name, never the name itself.
    """

    def __init__(self, directory: str, user_name: str) -> None:
        digest = hashlib.sha256(user_name.encode("utf-8")).hexdigest()
        self.path = os.path.join(directory, digest + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise MaildropInUse; blocks on nothing (runs in a disk thread)."""
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise MaildropInUse() from None
            raise
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the flock)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


@dataclass
class _Entry:
    uid: int
    size: int
    deleted: bool = False


def message_size(info: Any) -> int:
    """The size of a message as POP3 sends it (CRLF line ends), RFC 1939 §5 LIST.

    Stores give ``size`` in octets with CRLF line ends (the RFC 822 size IMAP
    also reports).
    """
    return int(info.size)


def uidl_for(uidvalidity: int, uid: int) -> bytes:
    """The unique-id of a message, RFC 1939 §7 UIDL: stable across sessions, unique per mailbox.

    UIDs are never reused within a UIDVALIDITY, so the pair identifies a
    message for good (the format is Dovecot's default ``%08Xu%08Xv``).
    """
    return b"%08X%08X" % (uid, uidvalidity)


class Maildrop:
    """The messages of one POP3 session, numbered 1..N as they were at login.

    ``mailbox`` is an ``IMailbox`` (mailserv.interfaces); ``lock`` the held
    MaildropLock, released by ``close``.
    """

    def __init__(
        self,
        mailbox: Any,
        infos: Iterable[Any],
        lock: MaildropLock | None,
        release: Callable[[Any], None] | None = None,
    ) -> None:
        self.mailbox = mailbox
        self.lock = lock
        self._release = release
        self.uidvalidity = int(mailbox.uidvalidity)
        self._entries = [_Entry(int(i.uid), message_size(i)) for i in infos]
        self._cache: dict[int, Content] = {}
        self._cached_bytes = 0
        self._live = len(self._entries)
        self._live_octets = sum(e.size for e in self._entries)
        # The highest message number read ahead (or looked at for it) so far.
        self._read_to = 0

    # -- bookkeeping (reactor thread) ---------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def valid(self, number: int) -> bool:
        """Does message ``number`` (1-based) exist and is it not marked deleted?"""
        return 1 <= number <= len(self._entries) and not self._entries[number - 1].deleted

    def exists(self, number: int) -> bool:
        return 1 <= number <= len(self._entries)

    def stat(self) -> tuple[int, int]:
        """(messages, octets) not counting the messages marked deleted (RFC 1939 §5 STAT)."""
        return self._live, self._live_octets

    def listing(self) -> list[tuple[int, int, bytes]]:
        """(number, size, unique-id) of every message not marked deleted."""
        return [
            (n, e.size, uidl_for(self.uidvalidity, e.uid))
            for n, e in enumerate(self._entries, 1)
            if not e.deleted
        ]

    def size(self, number: int) -> int:
        return self._entries[number - 1].size

    def uid(self, number: int) -> int:
        return self._entries[number - 1].uid

    def uidl(self, number: int) -> bytes:
        return uidl_for(self.uidvalidity, self._entries[number - 1].uid)

    def mark_deleted(self, number: int) -> None:
        entry = self._entries[number - 1]
        if not entry.deleted:
            entry.deleted = True
            self._live -= 1
            self._live_octets -= entry.size
        self.take_cached(number)

    # -- read-ahead cache (reactor thread) ----------------------------------

    def read_ahead(self, number: int) -> list[int]:
        """Message ``number`` and the live small messages after it, to read in one disk job."""
        size = self._entries[number - 1].size
        return [number, *self._following(number, size, READ_AHEAD_MESSAGES - 1)]

    def prefetch(self, number: int) -> list[int]:
        """The messages to read in the background after message ``number`` was served.

        Empty while the cache still holds at least PREFETCH_BELOW messages; else
        the live small messages after everything read so far, within the bounds.
        """
        if len(self._cache) >= PREFETCH_BELOW:
            return []
        return self._following(max(number, self._read_to), 0, PREFETCH_MESSAGES)

    def prefetch_more(self) -> list[int]:
        """After a background read: the next messages, while fewer than PREFETCH_UPTO are cached."""
        if len(self._cache) >= PREFETCH_UPTO:
            return []
        return self._following(self._read_to, 0, PREFETCH_MESSAGES)

    def _following(self, after: int, extra: int, room: int) -> list[int]:
        """Live, small, uncached messages after ``after``, within the read-ahead bounds."""
        out: list[int] = []
        total = extra + self._cached_bytes
        entries = self._entries
        last = min(len(entries), after + READ_AHEAD_SCAN)
        n = after
        while n < last and len(out) < room:
            n += 1
            e = entries[n - 1]
            if e.deleted or e.size > SMALL_MESSAGE or n in self._cache:
                continue
            if total + e.size > READ_AHEAD_BYTES:
                n -= 1
                break
            out.append(n)
            total += e.size
        self._read_to = max(self._read_to, n)
        return out

    def remember(self, number: int, content: Content) -> None:
        """Keep read-ahead content (not for a message marked deleted meanwhile)."""
        if number not in self._cache and not self._entries[number - 1].deleted:
            self._cache[number] = content
            self._cached_bytes += content_size(content)

    def take_cached(self, number: int, keep: bool = False) -> Content | None:
        """The read-ahead content of ``number``; forgotten unless ``keep`` (TOP before RETR)."""
        content = self._cache.get(number) if keep else self._cache.pop(number, None)
        if content is not None and not keep:
            self._cached_bytes -= content_size(content)
        return content

    def reset(self) -> None:
        """RFC 1939 §5 RSET: unmark every message."""
        for e in self._entries:
            e.deleted = False
        self._live = len(self._entries)
        self._live_octets = sum(e.size for e in self._entries)

    def deleted_uids(self) -> list[int]:
        return [e.uid for e in self._entries if e.deleted]

    # -- disk work (disk thread pool) ---------------------------------------

    def read_message(self, uid: int) -> bytes:
        """The whole message (for small ones)."""
        with self.mailbox.open_message(uid) as f:
            data: bytes = f.read()
            return data

    def read_messages(self, uids: Sequence[int], required: bool = True) -> dict[int, Content]:
        """uid -> content; messages gone meanwhile are skipped (not the first if ``required``)."""
        bulk = getattr(self.mailbox, "read_messages", None)
        if bulk is not None:  # the store reads small files in bulk (maildir)
            found: dict[int, bytes] = bulk(uids)
            if required and uids[0] not in found:
                raise KeyError(uids[0])
            return {uid: prepare(data) for uid, data in found.items()}
        out: dict[int, Content] = {}
        if required:
            out[uids[0]] = prepare(self.read_message(uids[0]))
            uids = uids[1:]
        for uid in uids:
            try:
                out[uid] = prepare(self.read_message(uid))
            except (KeyError, FileNotFoundError):
                continue
        return out

    def open_message(self, uid: int) -> IO[bytes]:
        """A binary file of the message, to stream big ones."""
        f: IO[bytes] = self.mailbox.open_message(uid)
        return f

    def commit(self) -> Sequence[int]:
        """The UPDATE state (RFC 1939 §6): remove every marked message at once."""
        uids = self.deleted_uids()
        if not uids:
            return []
        return list(self.mailbox.expunge(uids))

    def update(self) -> Sequence[int]:
        """QUIT in one disk job: ``commit``, then ``close`` whatever the outcome."""
        try:
            return self.commit()
        finally:
            self.close()

    def close(self) -> None:
        """Release the mailbox (back to the MailboxCache, if any), then the lock."""
        try:
            if self._release is not None:
                self._release(self.mailbox)
            else:
                self.mailbox.close()
        finally:
            if self.lock is not None:
                self.lock.release()


class MailboxCache:
    """The INBOX objects of recent sessions, so that the next login only refreshes.

    Most POP3 logins are polls that find little or nothing new: reopening the
    folder costs a full scan (uidlist parse, a stat per message), a
    ``refresh()`` of the folder the last session used costs a stat of the
    index when nothing changed.  A mailbox is taken out while a session uses
    it (the maildrop lock makes that session the only user), handed back at
    the end; at most ``size`` are kept (least recently used closed first).
    """

    def __init__(self, size: int = 128) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str, str], Any] = OrderedDict()
        self._mutex = threading.Lock()

    @staticmethod
    def key(user: Any) -> tuple[str, str, str]:
        return (user.name, user.mailbox, getattr(user, "store_format", ""))

    def take(self, user: Any) -> Any:
        with self._mutex:
            return self._items.pop(self.key(user), None)

    def give(self, user: Any, mailbox: Any) -> None:
        with self._mutex:
            self._items[self.key(user)] = mailbox
            evicted = []
            while len(self._items) > self.size:
                evicted.append(self._items.popitem(last=False)[1])
        for old in evicted:
            old.close()

    def __len__(self) -> int:
        return len(self._items)


def open_maildrop(
    store: Any, user: Any, lock_dir: str, cache: MailboxCache | None = None
) -> Maildrop:
    """Lock and open the INBOX of ``user`` in ``store`` (an IMailStore); runs in a disk thread.

    Raises MaildropInUse when another session holds it (RFC 2449 §8.1.1 IN-USE).
    """
    lock = MaildropLock(lock_dir, user.name)
    lock.acquire()
    try:
        mailbox = cache.take(user) if cache is not None else None
        if mailbox is not None:
            try:
                mailbox.refresh()  # IMailbox: pick up what others changed meanwhile
            except Exception:
                mailbox.close()
                mailbox = None
        if mailbox is None:
            mailbox = store.open(user).open_folder("INBOX")
        try:
            infos = mailbox.messages()
        except BaseException:
            mailbox.close()
            raise
        release = None if cache is None else (lambda box: cache.give(user, box))
        return Maildrop(mailbox, infos, lock, release)
    except BaseException:
        lock.release()
        raise
