"""The selected mailbox as one session sees it, and the change hub between sessions.

Each session keeps its own view: the UIDs in sequence order and the last
flags/modseq it reported.  ``diff`` turns a fresh listing from the store into
the untagged EXPUNGE / EXISTS / FETCH responses of RFC 3501 section 7.4.1 and
7.3, so sessions on one mailbox stay consistent: expunges are reported in
descending order so every sequence number is valid when it is sent, UIDs are
never reused (the store guarantees it, the view refuses to go back).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mailserv.imap.fetch import format_flags
from mailserv.imap.parser import format_set


class ChangeHub:
    """Who has which mailbox open, so a change by one session reaches the others at once.

    Keys are (user name, folder name).  Listeners are callables run on the
    reactor thread; they must not raise.
    """

    def __init__(self) -> None:
        self._listeners: dict[tuple[str, str], set[Callable[[], None]]] = {}
        self._recent: dict[tuple[str, str], int] = {}
        self.connections: dict[tuple[str, str], int] = {}

    def subscribe(self, key: tuple[str, str], listener: Callable[[], None]) -> None:
        self._listeners.setdefault(key, set()).add(listener)

    def unsubscribe(self, key: tuple[str, str], listener: Callable[[], None]) -> None:
        listeners = self._listeners.get(key)
        if listeners is not None:
            listeners.discard(listener)
            if not listeners:
                del self._listeners[key]

    def changed(self, key: tuple[str, str], origin: Callable[[], None] | None = None) -> None:
        for listener in list(self._listeners.get(key, ())):
            if listener is not origin:
                listener()

    def claim_recent(self, key: tuple[str, str], uids: list[int]) -> set[int]:
        """\\Recent for the first session to see a UID (RFC 3501 section 2.3.2), in-process."""
        seen = self._recent.get(key, 0)
        fresh = {u for u in uids if u > seen}
        if uids:
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
        for lo, hi in ranges:
            lo = n if lo == 0 else lo
            hi = n if hi == 0 else hi
            if lo > hi:
                lo, hi = hi, lo
            for seq in range(max(lo, 1), min(hi, n) + 1):
                out.add(self.uids[seq - 1])
        return sorted(out)

    def uids_for_uidset(self, ranges: list[tuple[int, int]]) -> list[int]:
        """UIDs in a UID set; ``*`` is the highest UID in use (RFC 3501 section 6.4.8)."""
        star = self.uids[-1] if self.uids else 0
        out: set[int] = set()
        for lo, hi in ranges:
            lo = star if lo == 0 else lo
            hi = star if hi == 0 else hi
            if lo > hi:
                lo, hi = hi, lo
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
