"""The selected mailbox as one session sees it, and the change hub between sessions.

Each session keeps its own view: the UIDs in sequence order and the last
flags/modseq it reported.  ``diff`` turns a fresh listing from the store into
the untagged EXPUNGE / EXISTS / FETCH responses of RFC 3501 section 7.4.1 and
7.3, so sessions on one mailbox stay consistent: expunges are reported in
descending order so every sequence number is valid when it is sent, UIDs are
never reused (the store guarantees it, the view refuses to go back).
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock, succeed

from mailserv.imap.fetch import format_flags
from mailserv.imap.parser import format_set, resolve_seqset


class ChangeHub:
    """Who has which mailbox open, so a change by one session reaches the others at once.

    Keys are (user name, folder name).  Listeners are callables run on the
    reactor thread; they must not raise.
    """

    def __init__(self) -> None:
        self._listeners: dict[tuple[str, str], set[Callable[[], None]]] = {}
        self._recent: dict[tuple[str, str], int] = {}
        self.connections: dict[tuple[str, str], int] = {}
        self._folders: dict[tuple[str, str], SharedFolder] = {}
        self._guard = threading.Lock()
        self._queues: dict[tuple[str, str], DeferredLock] = {}

    def writing(self, key: tuple[str, str]) -> bool:
        """Is a session writing to ``key`` now?  Its write will notice outside changes."""
        queue = self._queues.get(key)
        return queue is not None and bool(queue.locked)

    def serial(self, keys: list[tuple[str, str]], fn: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        """Run ``fn()`` (which starts thread-pool work) once no other session works on the
        folders ``keys``: writers queue here, on the reactor, instead of holding pool threads
        blocked on a folder lock while readers wait for a free thread.  Reactor thread only."""
        ordered = sorted(set(keys))
        locks = [self._queues.setdefault(k, DeferredLock()) for k in ordered]
        d: Deferred[Any] = succeed(None)
        for lock in locks:
            d.addCallback(_acquire, lock)
        d.addCallback(lambda _: fn())

        def release(result: Any) -> Any:
            for key, lock in zip(ordered, locks, strict=True):
                lock.release()
                if not lock.locked and not lock.waiting and self._queues.get(key) is lock:
                    del self._queues[key]
            return result

        return d.addBoth(release)

    def acquire(self, key: tuple[str, str], opener: Callable[[], Any]) -> SharedFolder:
        """The SharedFolder of ``key``, opened by ``opener`` if no session has it (threads)."""
        with self._guard:
            shared = self._folders.get(key)
            if shared is None:
                shared = SharedFolder(key, opener())
                self._folders[key] = shared
            shared.users += 1
            return shared

    def release(self, shared: SharedFolder) -> None:
        """Drop one user of ``shared``; the last one closes the store folder (thread pool)."""
        with self._guard:
            shared.users -= 1
            if shared.users > 0:
                return
            if self._folders.get(shared.key) is shared:
                del self._folders[shared.key]
        shared.box.close()

    def hold(self, key: tuple[str, str]) -> SharedFolder | None:
        """One more user of ``key``'s SharedFolder if some session has it open (else None);
        ``release`` it afterwards."""
        with self._guard:
            shared = self._folders.get(key)
            if shared is not None:
                shared.users += 1
            return shared

    def subscribe(self, key: tuple[str, str], listener: Callable[[], None]) -> None:
        self._listeners.setdefault(key, set()).add(listener)

    def unsubscribe(self, key: tuple[str, str], listener: Callable[[], None]) -> None:
        listeners = self._listeners.get(key)
        if listeners is not None:
            listeners.discard(listener)
            if not listeners:
                del self._listeners[key]

    def changed(self, key: tuple[str, str], origin: Callable[[], None] | None = None) -> None:
        """Wake the sessions on ``key``.  Without ``origin`` the change came from outside our
        sessions (a delivery): the shared listing is dropped so they see it at once."""
        if origin is None:
            with self._guard:
                shared = self._folders.get(key)
            if shared is not None:
                shared.invalidate()
        for listener in list(self._listeners.get(key, ())):
            if listener != origin:  # bound methods: equal, never identical
                listener()

    def claim_recent(self, key: tuple[str, str], uids: list[int], claim: bool = True) -> set[int]:
        """\\Recent for the first session to see a UID (RFC 3501 section 2.3.2), in-process.

        ``claim=False`` (EXAMINE, RFC 3501 section 6.3.2) reports without taking them.
        """
        seen = self._recent.get(key, 0)
        fresh = {u for u in uids if u > seen}
        if uids and claim:
            self._recent[key] = max(seen, uids[-1])
        return fresh

    def add_connection(self, key: tuple[str, str], limit: int) -> bool:
        count = self.connections.get(key, 0)
        if count >= limit:
            return False
        self.connections[key] = count + 1
        return True

    def remove_connection(self, key: tuple[str, str]) -> None:
        count = self.connections.get(key, 0) - 1
        if count <= 0:
            self.connections.pop(key, None)
        else:
            self.connections[key] = count


def _acquire(_: Any, lock: DeferredLock) -> Deferred[DeferredLock]:
    return lock.acquire()


class SharedFolder:
    """One store folder object shared by every session of the process that has it selected.

    The store's folder is thread-safe; ``lock`` orders our own writes and
    listings so that sessions queue here instead of on the store's dotlock.
    ``listing`` caches ``messages()`` until a write (``invalidate``) or a
    refresh that finds a change: N sessions on one mailbox cost one listing per
    change, not N (each session still diffs against its own view).
    """

    MAX_AGE = 0.25  # a forced refresh reuses a listing younger than this (seconds)

    def __init__(self, key: tuple[str, str], box: Any) -> None:
        self.key = key
        self.box = box
        self.users = 0
        self.lock = threading.Lock()
        self.listing: list[Any] | None = None
        # (listing, state, refreshed_at), replaced whole: read without the lock
        self.snapshot: tuple[list[Any], tuple[int, int], float] | None = None
        self.state: tuple[int, int] = (0, 0)
        self.refreshed_at = 0.0
        self.listed_at = 0.0

    def current(self, force: bool, now: float) -> tuple[list[Any], tuple[int, int]]:
        """The folder's messages and (uidnext, highest modseq); call with ``lock`` held.

        ``force`` looks at the store for changes made outside this process
        (NOOP, IDLE polls), unless a listing was taken in the last MAX_AGE seconds
        (``now`` is the reactor's clock).
        """
        if self.listing is not None and (not force or now - self.refreshed_at < self.MAX_AGE):
            return self.listing, self.state
        gone = self.box.refresh()
        state = (int(self.box.uidnext()), int(self.box.highest_modseq()))
        if self.listing is None or gone or state != self.state or now - self.listed_at > 30:
            self.listing = list(self.box.messages())
            self.listed_at = now
        self.state = state
        self.refreshed_at = now
        self.snapshot = (self.listing, self.state, now)
        return self.listing, self.state

    def cached(self, force: bool, now: float) -> tuple[list[Any], tuple[int, int]] | None:
        """The cached listing if ``current`` would return it (no lock needed: one read of
        a tuple the writers replace whole)."""
        snapshot = self.snapshot
        if snapshot is None:
            return None
        listing, state, refreshed_at = snapshot
        if force and now - refreshed_at >= self.MAX_AGE:
            return None
        return listing, state

    def invalidate(self) -> None:
        """The folder changed in a way we cannot patch: the next listing goes to the store."""
        self.snapshot = None
        self.listing = None

    def box_state(self) -> tuple[int, int]:
        return (int(self.box.uidnext()), int(self.box.highest_modseq()))

    def apply(
        self,
        before: tuple[int, int],
        changed: list[Any] = (),  # type: ignore[assignment]
        removed: list[int] = (),  # type: ignore[assignment]
        added: list[Any] = (),  # type: ignore[assignment]
    ) -> None:
        """Patch the cached listing after our own write (lock held) instead of listing again.

        ``before`` is the box's (uidnext, highest modseq) just before the write.  The
        patch is used only if the cache was current then and the store moved exactly
        as our write explains; anything else (a delivery or change from another
        process seen during the write) invalidates the cache.
        """
        after = self.box_state()
        if self.listing is None or self.state != before:
            self.invalidate()
            return
        expected_uidnext = max([before[0], *(m.uid + 1 for m in added)])
        modseqs = [int(m.modseq) for m in (*changed, *added)]
        allowed = max([before[1] + (1 if removed else 0), *modseqs])
        if after[0] != expected_uidnext or after[1] > allowed:
            self.invalidate()
            return
        by_uid = {m.uid: m for m in self.listing}
        for m in changed:
            if m.uid in by_uid:
                by_uid[m.uid] = m
        for uid in removed:
            by_uid.pop(uid, None)
        for m in added:
            by_uid[m.uid] = m
        self.listing = [by_uid[u] for u in sorted(by_uid)]
        self.state = after
        self.snapshot = (self.listing, self.state, self.refreshed_at)


def locked(
    folders: list[SharedFolder | None], write: bool, fn: Callable[..., Any], *args: Any
) -> Any:
    """Run ``fn(*args)`` holding the locks of ``folders`` (in key order: no deadlock);
    ``write`` invalidates their listings afterwards."""
    ordered = sorted({id(f): f for f in folders if f is not None}.values(), key=lambda f: f.key)
    for f in ordered:
        f.lock.acquire()
    try:
        return fn(*args)
    finally:
        for f in reversed(ordered):
            if write:
                f.invalidate()
            f.lock.release()


@dataclass
class Snapshot:
    """What the session last told the client about one message."""

    flags: frozenset[str]
    modseq: int


class SelectedMailbox:
    """The session's view of the selected mailbox (RFC 3501 section 3.3)."""

    def __init__(self, name: str, box: Any, readonly: bool, messages: list[Any]) -> None:
        self.name = name
        self.box = box
        self.readonly = readonly
        self.uids: list[int] = []
        self.info: dict[int, Any] = {}
        self.snap: dict[int, Snapshot] = {}
        self.recent: set[int] = set()
        self.uidvalidity = int(box.uidvalidity)
        self.highest_uid = 0
        self.shared: SharedFolder | None = None
        # the shared listing the view was last brought up to date with
        self.seen_listing: list[Any] | None = None
        self.apply_listing(messages)

    def apply_listing(self, messages: list[Any]) -> None:
        self.uids = [m.uid for m in messages]
        self.info = {m.uid: m for m in messages}
        self.snap = {m.uid: Snapshot(frozenset(m.flags), int(m.modseq)) for m in messages}
        if self.uids:
            self.highest_uid = max(self.highest_uid, self.uids[-1])

    def __len__(self) -> int:
        return len(self.uids)

    def seq_of(self, uid: int) -> int:
        i = bisect_left(self.uids, uid)
        if i < len(self.uids) and self.uids[i] == uid:
            return i + 1
        return 0

    def uids_for_seqs(self, ranges: list[tuple[int, int]]) -> list[int]:
        """UIDs of the messages in a sequence set (``*`` = last); out-of-range ones are ignored."""
        n = len(self.uids)
        out: set[int] = set()
        for lo, hi in resolve_seqset(ranges, n):
            for seq in range(max(lo, 1), min(hi, n) + 1):
                out.add(self.uids[seq - 1])
        return sorted(out)

    def uids_for_uidset(self, ranges: list[tuple[int, int]]) -> list[int]:
        """UIDs in a UID set; ``*`` is the highest UID in use (RFC 3501 section 6.4.8)."""
        out: set[int] = set()
        for lo, hi in resolve_seqset(ranges, self.uids[-1] if self.uids else 0):
            i = bisect_left(self.uids, lo)
            while i < len(self.uids) and self.uids[i] <= hi:
                out.add(self.uids[i])
                i += 1
        return sorted(out)

    def diff(
        self,
        messages: list[Any],
        condstore: bool,
        qresync: bool,
        recent: set[int],
        allow_expunge: bool = True,
    ) -> list[bytes]:
        """Untagged responses that bring the client from the old view to ``messages``."""
        out: list[bytes] = []
        fresh = {m.uid: m for m in messages}
        gone = [u for u in self.uids if u not in fresh]
        if gone and allow_expunge:
            if qresync:
                out.append(b"* VANISHED " + format_set(gone).encode())
            else:
                seqs = sorted((self.seq_of(u) for u in gone), reverse=True)
                out.extend(b"* %d EXPUNGE" % s for s in seqs)
            for u in gone:
                self.snap.pop(u, None)
                self.info.pop(u, None)
                self.recent.discard(u)
            gone_set = set(gone)
            self.uids = [u for u in self.uids if u not in gone_set]
        # flag changes on messages the client knows
        for uid in self.uids:
            m = fresh.get(uid)
            if m is None:
                continue
            self.info[uid] = m
            snap = self.snap[uid]
            flags = frozenset(m.flags)
            if flags != snap.flags or (condstore and int(m.modseq) != snap.modseq):
                self.snap[uid] = Snapshot(flags, int(m.modseq))
                out.append(self.flags_response(uid, condstore, with_uid=qresync))
        # new messages: UIDs only grow; never re-announce an expunged or lower UID
        new = [m for m in messages if m.uid > self.highest_uid]
        if new:
            for m in new:
                self.uids.append(m.uid)
                self.info[m.uid] = m
                self.snap[m.uid] = Snapshot(frozenset(m.flags), int(m.modseq))
            self.highest_uid = self.uids[-1]
            self.recent |= recent
            out.append(b"* %d EXISTS" % len(self.uids))
            out.append(b"* %d RECENT" % len(self.recent))
        return out

    def flags_response(self, uid: int, condstore: bool, with_uid: bool = False) -> bytes:
        flags = set(self.snap[uid].flags)
        if uid in self.recent:
            flags.add("\\Recent")
        items = [b"FLAGS " + format_flags(flags)]
        if with_uid:
            items.insert(0, b"UID %d" % uid)
        if condstore:
            items.append(b"MODSEQ (%d)" % self.snap[uid].modseq)
        return b"* %d FETCH (" % self.seq_of(uid) + b" ".join(items) + b")"

    def record(self, info: Any) -> None:
        """Our own change to a message (STORE): the client is told in the command's response."""
        if info.uid in self.info:
            self.info[info.uid] = info
            self.snap[info.uid] = Snapshot(frozenset(info.flags), int(info.modseq))
