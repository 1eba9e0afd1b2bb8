"""The selected mailbox as one session sees it, and the change hub between sessions.

Each session keeps its own view: the UIDs in sequence order and the last
flags/modseq it reported.  The sessions of one mailbox share a SharedFolder
whose event log says what changed; ``SelectedMailbox.replay`` turns the events
since the session's version into the untagged EXPUNGE / EXISTS / FETCH
responses of RFC 3501 section 7.4.1 and 7.3, so sessions on one mailbox stay
consistent: expunges are reported in descending order so every sequence number
is valid when it is sent, UIDs are never reused (the store guarantees it, the
view refuses to go back).
"""

from __future__ import annotations

import contextlib
import threading
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredSemaphore, succeed

from mailserv.imap.fetch import format_flags
from mailserv.imap.parser import format_set, resolve_seqset

RECENT = frozenset({"\\Recent"})
WRITERS = 3  # jobs per folder handed to the thread pool at once (ChangeHub.serial)


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
        self._queues: dict[tuple[str, str], DeferredSemaphore] = {}

    def writing(self, key: tuple[str, str]) -> bool:
        """Is a session writing to ``key`` now?  Its write will notice outside changes."""
        queue = self._queues.get(key)
        return queue is not None and queue.tokens < queue.limit

    def serial(self, keys: list[tuple[str, str]], fn: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        """Run ``fn()`` (which starts thread-pool work) once fewer than WRITERS jobs of other
        sessions work on the folders ``keys``.  The jobs take the folders' locks in their
        thread (``locked``), so one writes at a time; the next ones wait there, ready to
        go at once, and the rest queue here, on the reactor, instead of holding pool
        threads that readers need.  Reactor thread only."""
        ordered = sorted(set(keys))
        sems = [self._queues.setdefault(k, DeferredSemaphore(WRITERS)) for k in ordered]
        d: Deferred[Any] = succeed(None)
        for sem in sems:
            d.addCallback(_acquire, sem)
        d.addCallback(lambda _: fn())

        def release(result: Any) -> Any:
            for key, sem in zip(ordered, sems, strict=True):
                sem.release()
                if sem.tokens == sem.limit and not sem.waiting and self._queues.get(key) is sem:
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


def _acquire(_: Any, sem: DeferredSemaphore) -> Deferred[DeferredSemaphore]:
    return sem.acquire()


EXPUNGED, CHANGED, ADDED = 0, 1, 2
MAX_EVENTS = 4096  # events kept per folder; a session further behind re-diffs once


class SharedFolder:
    """One store folder object shared by every session of the process that has it selected.

    The store's folder is thread-safe; ``lock`` orders our own writes and
    listings so that sessions queue here instead of on the store's dotlock.

    The folder keeps the mailbox as our sessions know it (``by_uid``, ``uids``)
    and an event log of what changed: each write patches the view with exactly
    what it did (``apply``) and appends EXPUNGED / CHANGED / ADDED events; a
    change seen from outside (another process, a delivery) is found by listing
    the store once and diffing against the view, once for all sessions.  Each
    session replays the events since the version it last reported
    (``since``), so a STORE by one of N sessions costs O(1) per session, not a
    diff of the whole mailbox per session.
    """

    MAX_AGE = 0.25  # a forced refresh reuses a listing younger than this (seconds)

    def __init__(self, key: tuple[str, str], box: Any) -> None:
        self.key = key
        self.box = box
        self.users = 0
        self.lock = threading.Lock()
        # guards the view and the event log below; held briefly, also on the reactor
        self.view_lock = threading.Lock()
        self.by_uid: dict[int, Any] = {}
        self.uids: list[int] = []
        self.deleted: set[int] = set()  # UIDs with \Deleted (EXPUNGE needs no scan)
        self.listed = False  # the view follows the store (else: list it)
        self.stale = False  # something changed that we could not follow: list and diff
        self.state: tuple[int, int] = (0, 0)
        self.version = 0
        self.base = 0  # the log holds every event after this version
        self.events: list[tuple[int, int, Any]] = []  # (version, kind, payload)
        self._listing: list[Any] | None = None
        self.refreshed_at = 0.0
        self.listed_at = 0.0

    # -- reading (reactor or thread) -----------------------------------

    def fresh(self, force: bool, now: float) -> bool:
        """Is the view good enough without looking at the store?  (``current`` would not.)"""
        if not self.listed or self.stale:
            return False
        return not force or now - self.refreshed_at < self.MAX_AGE

    def listing(self) -> list[Any]:
        """The messages in UID order (built once per change, not per caller)."""
        with self.view_lock:
            return self._listing_locked()

    def _listing_locked(self) -> list[Any]:
        if self._listing is None:
            by_uid = self.by_uid
            self._listing = [by_uid[u] for u in self.uids]
        return self._listing

    def view(self) -> tuple[list[Any], tuple[int, int], int]:
        """(messages, (uidnext, highest modseq), version), consistent with each other."""
        with self.view_lock:
            return self._listing_locked(), self.state, self.version

    def since(self, version: int) -> tuple[int, list[tuple[int, Any]] | None, list[Any] | None]:
        """What changed after ``version``: (version now, events, None), or (version now,
        None, messages) when the log no longer reaches back that far (diff them), or
        (version, None, None) when the view is being listed again (try later)."""
        with self.view_lock:
            if not self.listed:
                return version, None, None
            if version >= self.version:
                return self.version, [], None
            if version < self.base:
                return self.version, None, self._listing_locked()
            events = self.events
            lo, hi = 0, len(events)
            while lo < hi:  # first event after ``version``
                mid = (lo + hi) // 2
                if events[mid][0] <= version:
                    lo = mid + 1
                else:
                    hi = mid
            return self.version, [(kind, payload) for _, kind, payload in events[lo:]], None

    # -- changing (thread pool, ``lock`` held) -------------------------

    def current(
        self, force: bool, now: float, listing: bool = True
    ) -> tuple[list[Any], tuple[int, int]]:
        """The folder's messages and (uidnext, highest modseq); call with ``lock`` held.

        ``force`` looks at the store for changes made outside this process
        (NOOP, IDLE polls), unless a listing was taken in the last MAX_AGE seconds
        (``now`` is the reactor's clock).  ``listing=False`` only brings the view up
        to date (the messages returned are then empty).
        """
        if not self.fresh(force, now):
            gone = self.box.refresh()
            state = self.box_state()
            if (
                not self.listed
                or self.stale
                or gone
                or state != self.state
                or now - self.listed_at > 30
            ):
                self._relist(list(self.box.messages()), state)
                self.listed_at = now
            self.refreshed_at = now
        with self.view_lock:
            return (self._listing_locked() if listing else []), self.state

    def _relist(self, messages: list[Any], state: tuple[int, int]) -> None:
        """Make ``messages`` the view; the difference to the old view becomes events."""
        with self.view_lock:
            if not self.listed:
                self.by_uid = {m.uid: m for m in messages}
                self.uids = [m.uid for m in messages]
                self.deleted = {m.uid for m in messages if "\\Deleted" in m.flags}
                self.version += 1
                self.base = self.version
                self.events = []
            else:
                fresh = {m.uid: m for m in messages}
                old = self.by_uid
                gone = [u for u in self.uids if u not in fresh]
                changed = []
                added = []
                for m in messages:
                    before = old.get(m.uid)
                    if before is None:
                        added.append(m)
                    elif before.modseq != m.modseq or _flags(before) != _flags(m):
                        changed.append(m)
                self._patch(changed, gone, added)
                self.by_uid = fresh
                self.uids = [m.uid for m in messages]
                self.deleted = {m.uid for m in messages if "\\Deleted" in m.flags}
                self._listing = None
            self.listed = True
            self.stale = False
            self.state = state

    def invalidate(self) -> None:
        """The folder changed in a way we cannot patch: the next ``current`` lists the store
        and turns the difference into events."""
        self.stale = True

    def box_state(self) -> tuple[int, int]:
        return (int(self.box.uidnext()), int(self.box.highest_modseq()))

    def apply(
        self,
        before: tuple[int, int],
        changed: list[Any] = (),  # type: ignore[assignment]
        removed: list[int] = (),  # type: ignore[assignment]
        added: list[Any] = (),  # type: ignore[assignment]
    ) -> None:
        """Patch the view after our own write (``lock`` held) and log what it did.

        ``before`` is the box's (uidnext, highest modseq) just before the write.  The
        patch is trusted only if the view was current then and the store moved exactly
        as our write explains; anything else (a delivery or change from another
        process seen during the write) also marks the view stale, so the next
        listing diffs it against the store.
        """
        after = self.box_state()
        if not self.listed or self.state != before:
            self.invalidate()
        else:
            expected_uidnext = max([before[0], *(m.uid + 1 for m in added)])
            modseqs = [int(m.modseq) for m in (*changed, *added)]
            allowed = max([before[1] + (1 if removed else 0), *modseqs])
            if after[0] != expected_uidnext or after[1] > allowed:
                self.invalidate()
        if not self.listed:
            return
        with self.view_lock:
            self._patch(changed, removed, added)
            by_uid = self.by_uid
            for m in changed:
                if m.uid in by_uid:
                    by_uid[m.uid] = m
                    if "\\Deleted" in m.flags:
                        self.deleted.add(m.uid)
                    else:
                        self.deleted.discard(m.uid)
            if removed:
                gone = {u for u in removed if u in by_uid}
                for u in gone:
                    del by_uid[u]
                    self.deleted.discard(u)
                if len(gone) <= 8:
                    for u in gone:
                        del self.uids[bisect_left(self.uids, u)]
                elif gone:
                    self.uids = [u for u in self.uids if u not in gone]
            for m in added:
                if m.uid in by_uid:
                    continue
                by_uid[m.uid] = m
                if "\\Deleted" in m.flags:
                    self.deleted.add(m.uid)
                if not self.uids or m.uid > self.uids[-1]:
                    self.uids.append(m.uid)
                else:
                    insort(self.uids, m.uid)
            self._listing = None
            if not self.stale:
                self.state = after

    def _patch(self, changed: list[Any], removed: list[int], added: list[Any]) -> None:
        """Log one change (view_lock held)."""
        if not (changed or removed or added):
            return
        self.version += 1
        v = self.version
        events = self.events
        if removed:
            events.append((v, EXPUNGED, list(removed)))
        events.extend((v, CHANGED, m) for m in changed)
        events.extend((v, ADDED, m) for m in added)
        self._listing = None
        if len(events) > MAX_EVENTS:
            cut = len(events) - MAX_EVENTS // 2
            self.base = events[cut - 1][0]
            while cut < len(events) and events[cut][0] == self.base:
                cut += 1  # never split one version
            self.events = events[cut:]


def _flags(info: Any) -> frozenset[str]:
    all_flags = getattr(info, "all_flags", None)
    return frozenset(all_flags if all_flags is not None else info.flags)


_EMPTY: frozenset[str] = frozenset()
_FLAG_TEXT: dict[tuple[Any, Any, bool], bytes] = {}


def flags_item(info: Any, recent: bool) -> bytes:
    """``FLAGS (...)`` of a message, \\Recent added if ``recent`` (reactor thread).

    A mailbox has few distinct flag sets: each is formatted once, keyed by the
    store's (flags, keywords) frozensets, whose hashes Python keeps.
    """
    try:
        key = (info.flags, info.keywords, recent)
        text = _FLAG_TEXT.get(key)
    except (AttributeError, TypeError):  # no keywords, or not hashable: format every time
        flags = _flags(info)
        return b"FLAGS " + format_flags(flags | RECENT if recent else flags)
    if text is None:
        flags = _flags(info)
        text = b"FLAGS " + format_flags(flags | RECENT if recent else flags)
        if len(_FLAG_TEXT) >= 4096:
            _FLAG_TEXT.clear()
        _FLAG_TEXT[key] = text
    return text


def locked(
    folders: list[SharedFolder | None], write: bool, fn: Callable[..., Any], *args: Any
) -> Any:
    """Run ``fn(*args)`` holding the locks of ``folders`` (in key order: no deadlock);
    ``write`` invalidates their listings afterwards."""
    ordered = sorted({id(f): f for f in folders if f is not None}.values(), key=lambda f: f.key)
    with contextlib.ExitStack() as batches:
        for f in ordered:  # announced before waiting: the store keeps its dotlock for us
            batch = getattr(f.box, "batch", None)
            if batch is not None:
                batches.enter_context(batch())
        for f in ordered:
            f.lock.acquire()
        try:
            return fn(*args)
        finally:
            for f in reversed(ordered):
                if write:
                    f.invalidate()
                f.lock.release()


class SelectedMailbox:
    """The session's view of the selected mailbox (RFC 3501 section 3.3).

    ``info`` holds, per UID, the message as the client last heard of it (flags and
    modseq included); ``version`` is the SharedFolder version it was brought up to.
    """

    def __init__(self, name: str, box: Any, readonly: bool, messages: list[Any]) -> None:
        self.name = name
        self.box = box
        self.readonly = readonly
        self.uids: list[int] = [m.uid for m in messages]
        self.info: dict[int, Any] = {m.uid: m for m in messages}
        self.recent: set[int] = set()
        self.uidvalidity = int(box.uidvalidity)
        self.highest_uid = self.uids[-1] if self.uids else 0
        self.shared: SharedFolder | None = None
        self.version = 0
        # expunged in the store but not yet reported (held back during FETCH, STORE, SEARCH)
        self.pending_gone: list[int] = []

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
        uids = self.uids
        resolved = resolve_seqset(ranges, n)
        if len(resolved) == 1:
            lo, hi = resolved[0]
            return uids[max(lo, 1) - 1 : min(hi, n)]
        out: set[int] = set()
        for lo, hi in resolved:
            out.update(uids[max(lo, 1) - 1 : min(hi, n)])
        return sorted(out)

    def uids_for_uidset(self, ranges: list[tuple[int, int]]) -> list[int]:
        """UIDs in a UID set; ``*`` is the highest UID in use (RFC 3501 section 6.4.8)."""
        out: set[int] = set()
        uids = self.uids
        for lo, hi in resolve_seqset(ranges, uids[-1] if uids else 0):
            out.update(uids[bisect_left(uids, lo) : bisect_right(uids, hi)])
        return sorted(out)

    def replay(
        self,
        events: list[tuple[int, Any]],
        condstore: bool,
        qresync: bool,
        claim: Callable[[list[int]], set[int]],
        allow_expunge: bool = True,
    ) -> list[bytes]:
        """Untagged responses for the SharedFolder events since the view's version.

        Same order as ``diff``: expunges (descending, or VANISHED), flag changes of
        messages the client knows, then EXISTS/RECENT for new UIDs.  ``claim`` takes
        \\Recent for new UIDs (ChangeHub.claim_recent).
        """
        info = self.info
        gone: list[int] = []
        changed: dict[int, Any] = {}
        new: dict[int, Any] = {}
        for kind, payload in events:
            if kind == CHANGED:
                uid = payload.uid
                if uid in new:
                    new[uid] = payload
                elif uid in info:
                    changed[uid] = payload
            elif kind == ADDED:
                if payload.uid > self.highest_uid:
                    new[payload.uid] = payload
            else:
                for uid in payload:
                    if uid in info:
                        gone.append(uid)
                        changed.pop(uid, None)
                    else:
                        new.pop(uid, None)
        out: list[bytes] = []
        if gone:
            self.pending_gone.extend(gone)
        if self.pending_gone and allow_expunge:
            out.extend(self._report_gone(qresync))
        lines = []
        for uid, m in changed.items():
            old = info[uid]
            info[uid] = m
            if _flags(m) != _flags(old) or (condstore and int(m.modseq) != int(old.modseq)):
                lines.append((uid, m))
        if lines:
            pending = set(self.pending_gone)
            lines.sort()
            out.extend(
                self.flags_response(uid, condstore, with_uid=qresync)
                for uid, _ in lines
                if uid not in pending
            )
        if new:
            ordered = sorted(new)
            for uid in ordered:
                self.uids.append(uid)
                info[uid] = new[uid]
            self.highest_uid = ordered[-1]
            self.recent |= claim(ordered)
            out.append(b"* %d EXISTS" % len(self.uids))
            out.append(b"* %d RECENT" % len(self.recent))
        return out

    def _report_gone(self, qresync: bool) -> list[bytes]:
        gone = sorted(set(self.pending_gone))
        self.pending_gone = []
        if qresync:
            out = [b"* VANISHED " + format_set(gone).encode()]
        else:
            out = [b"* %d EXPUNGE" % s for s in sorted(map(self.seq_of, gone), reverse=True)]
        for u in gone:
            self.info.pop(u, None)
            self.recent.discard(u)
        if len(gone) <= 8:
            for u in gone:
                i = bisect_left(self.uids, u)
                if i < len(self.uids) and self.uids[i] == u:
                    del self.uids[i]
        else:
            gone_set = set(gone)
            self.uids = [u for u in self.uids if u not in gone_set]
        return out

    def diff(
        self,
        messages: list[Any],
        condstore: bool,
        qresync: bool,
        claim: Callable[[list[int]], set[int]],
        allow_expunge: bool = True,
    ) -> list[bytes]:
        """Untagged responses that bring the client from its view to ``messages`` (a full
        listing: used when the event log no longer reaches back to the view's version)."""
        fresh = {m.uid: m for m in messages}
        events: list[tuple[int, Any]] = [(EXPUNGED, [u for u in self.uids if u not in fresh])]
        events.extend((CHANGED, fresh[u]) for u in self.uids if u in fresh)
        events.extend((ADDED, m) for m in messages if m.uid > self.highest_uid)
        self.pending_gone = []
        return self.replay(events, condstore, qresync, claim, allow_expunge)

    def flags_response(self, uid: int, condstore: bool, with_uid: bool = False) -> bytes:
        info = self.info[uid]
        items = [flags_item(info, uid in self.recent)]
        if with_uid:
            items.insert(0, b"UID %d" % uid)
        if condstore:
            items.append(b"MODSEQ (%d)" % int(info.modseq))
        return b"* %d FETCH (" % self.seq_of(uid) + b" ".join(items) + b")"

    def record(self, info: Any) -> None:
        """Our own change to a message (STORE): the client is told in the command's response."""
        if info.uid in self.info:
            self.info[info.uid] = info
