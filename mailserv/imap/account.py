"""The logged-in user's folders as IMAP sees them: LIST/LSUB matching, names, quota.

Every store call goes through ``run`` (the ``disk`` thread pool): the store is
synchronous and may block (defect 9: Twisted's IMAP4Server wants synchronous
account calls on the reactor).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred

from mailserv.errors import InvalidFolderName
from mailserv.imap import utf7

DELIMITER = "/"
MAX_PATTERN = 1024

#: RFC 6154 roles by folder name when the store does not say (mailserv.store.SPECIAL_USE).
DEFAULT_SPECIAL_USE = {
    "Drafts": "\\Drafts",
    "Sent": "\\Sent",
    "Trash": "\\Trash",
    "Junk": "\\Junk",
    "Archive": "\\Archive",
}


def flags_of(info: Any) -> frozenset[str]:
    """System flags and keywords of a store MessageInfo."""
    all_flags = getattr(info, "all_flags", None)
    if all_flags is not None:
        return frozenset(all_flags)
    return frozenset(info.flags)


def wire_to_name(wire: bytes, utf8: bool = False) -> str:
    """A mailbox name from the wire (modified UTF-7, or UTF-8 after ENABLE UTF8=ACCEPT), checked."""
    try:
        text = wire.decode("utf-8" if utf8 else "ascii")
    except UnicodeDecodeError as exc:
        raise InvalidFolderName("mailbox name is not valid") from exc
    name = text if utf8 else utf7.decode(text)
    if name.upper() == "INBOX":
        return "INBOX"
    return utf7.check_name(name, DELIMITER)


def name_to_wire(name: str, utf8: bool = False) -> bytes:
    return name.encode("utf-8") if utf8 else utf7.encode(name).encode("ascii")


class Pattern:
    """A LIST pattern (RFC 3501 section 6.3.8) matched by an NFA: linear, never backtracking.

    ``*`` matches anything, ``%`` anything but the delimiter.  Matching keeps a
    set of pattern positions, so the cost is O(len(name) x len(pattern)) however
    many wildcards there are (defect 9: Twisted's regex backtracks for minutes).
    """

    def __init__(self, pattern: str) -> None:
        if len(pattern) > MAX_PATTERN:
            raise InvalidFolderName("pattern too long")
        # collapse runs of wildcards: "**" == "*", "%*" == "*"
        out: list[str] = []
        for ch in pattern:
            if ch in "*%" and out and out[-1] in "*%":
                out[-1] = "*" if "*" in (ch, out[-1]) else "%"
            else:
                out.append(ch)
        self.pat = out

    def _closure(self, states: set[int]) -> set[int]:
        todo = list(states)
        while todo:
            s = todo.pop()
            if s < len(self.pat) and self.pat[s] in "*%" and s + 1 not in states:
                states.add(s + 1)
                todo.append(s + 1)
        return states

    def matches(self, name: str) -> bool:
        return len(self.pat) in self._run(name)

    def could_match_below(self, name: str) -> bool:
        """Does some child of ``name`` match (for the CHILDREN / \\HasChildren of LSUB %)?"""
        return bool(self._run(name + DELIMITER))

    def _run(self, name: str) -> set[int]:
        pat = self.pat
        n = len(pat)
        states = self._closure({0})
        for ch in name:
            nxt: set[int] = set()
            for s in states:
                if s >= n:
                    continue
                p = pat[s]
                if p == "*" or (p == "%" and ch != DELIMITER):
                    nxt.add(s)
                elif p == ch:
                    nxt.add(s + 1)
            if not nxt:
                return set()
            states = self._closure(nxt)
        return states


def canonical_pattern(reference: str, pattern: str) -> str:
    """Join reference and pattern (RFC 3501 section 6.3.8) and upper-case a leading INBOX."""
    if pattern.startswith(DELIMITER) or not reference:
        full = pattern
    elif reference.endswith(DELIMITER):
        full = reference + pattern
    else:
        full = reference + DELIMITER + pattern
    if full[:5].upper() == "INBOX" and (len(full) == 5 or full[5] in (DELIMITER, "*", "%")):
        full = "INBOX" + full[5:]
    return full


def with_parents(names: Iterable[str]) -> tuple[set[str], set[str]]:
    """(existing names, implied parents that do not exist themselves: \\Noselect)."""
    existing = set(names)
    parents: set[str] = set()
    for name in existing:
        parts = name.split(DELIMITER)
        for i in range(1, len(parts)):
            parent = DELIMITER.join(parts[:i])
            if parent not in existing:
                parents.add(parent)
    return existing, parents


def has_children(name: str, all_names: set[str]) -> bool:
    prefix = name + DELIMITER
    return any(n.startswith(prefix) for n in all_names)


def special_use(account: Any, name: str) -> str | None:
    """The RFC 6154 role of a folder, from the store if it says, else by name."""
    roles = getattr(account, "special_use", None)
    if callable(roles):
        try:
            mapping = roles()
        except TypeError:
            mapping = None
        if isinstance(mapping, dict):
            return mapping.get(name)
    try:
        from mailserv.store import SPECIAL_USE
    except ImportError:
        SPECIAL_USE = DEFAULT_SPECIAL_USE
    return SPECIAL_USE.get(name)


class AsyncAccount:
    """IMailAccount calls run off the reactor through ``run(fn, *args) -> Deferred``."""

    def __init__(self, account: Any, run: Callable[..., Deferred[Any]]) -> None:
        self.account = account
        self.run = run

    def call(self, method: str, *args: Any) -> Deferred[Any]:
        return self.run(getattr(self.account, method), *args)

    def subscriptions(self) -> Deferred[Any]:
        return self.run(_subscriptions, self.account)

    def set_subscribed(self, name: str, on: bool) -> Deferred[Any]:
        return self.run(_set_subscribed, self.account, name, on)


def _subscriptions(account: Any) -> list[str]:
    fn = getattr(account, "subscriptions", None) or getattr(account, "list_subscriptions", None)
    if fn is None:
        return list(account.list_folders())
    return list(fn())


def _set_subscribed(account: Any, name: str, on: bool) -> None:
    method = getattr(account, "subscribe" if on else "unsubscribe", None)
    if method is not None:
        method(name)
