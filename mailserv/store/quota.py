"""Maildir++ quota: the ``maildirsize`` file (bytes and messages).

Format (Courier's Maildir++ quota specification, also used by Dovecot)::

    <bytes>S,<messages>C        the quota definition (a part is left out if unlimited)
    <bytes> <messages>          one line per change, appended with O_APPEND
    ...

Usage is the sum of the change lines.  The file is recalculated from the
messages on disk when it is missing, unreadable, 5120 bytes or longer, or
when its definition no longer matches the user's limits.  Over quota a
delivery raises ``QuotaExceeded`` (temporary ``452 4.2.2`` or permanent
``552 5.2.2`` upstream, per ``[store] over_quota``).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from mailserv.durable import write_all, write_atomic
from mailserv.errors import QuotaExceeded

MAILDIRSIZE = "maildirsize"
RECALC_SIZE = 5120
_DEF = re.compile(r"^(?:(\d+)S)?,?(?:(\d+)C)?$")


@dataclass(frozen=True)
class Limits:
    """A user's quota; 0 or None means unlimited."""

    bytes: int | None
    messages: int | None
    permanent: bool = False

    @property
    def definition(self) -> str:
        parts = []
        if self.bytes:
            parts.append(f"{self.bytes}S")
        if self.messages:
            parts.append(f"{self.messages}C")
        return ",".join(parts) or "0S"


def limits_for(user: object, config: object) -> Limits:
    """The user's own limits, else ``[store] quota`` / ``quota_messages``."""
    qb = getattr(user, "quota_bytes", None)
    qm = getattr(user, "quota_messages", None)
    return Limits(
        bytes=qb if qb is not None else getattr(config, "quota", 0),
        messages=qm if qm is not None else getattr(config, "quota_messages", 0),
        permanent=getattr(config, "over_quota", "tempfail") == "reject",
    )


class MaildirSize:
    """The maildirsize file at ``path``; ``scan()`` returns the true (bytes, messages)."""

    def __init__(self, path: str, limits: Limits, scan: Callable[[], tuple[int, int]]) -> None:
        self.path = path
        self.limits = limits
        self.scan = scan

    def _read(self) -> tuple[int, int] | None:
        """(bytes, messages) used, or None when a recalculation is due.

        Delivery reads this file every time; only what was appended since
        this process last parsed it is parsed again (the bytes already parsed
        are compared, so a file rewritten meanwhile is parsed in full).
        """
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            data = os.pread(fd, RECALC_SIZE + 1, 0)
        finally:
            os.close(fd)
        if len(data) >= RECALC_SIZE:
            return None
        with _parsed_lock:
            parsed = _parsed.get(self.path)
        definition = self.limits.definition
        if parsed is not None and parsed[2] == definition and data.startswith(parsed[0]):
            known, used, _ = parsed
            tail = data[len(known) :]
        else:
            head, sep, tail = data.partition(b"\n")
            if head.decode("ascii", "replace").strip() != definition:
                return None
            known, used = head + sep, (0, 0)
        complete = tail.rfind(b"\n") + 1
        added = _sum_lines(tail[:complete])
        if added is None:
            return None
        used = (used[0] + added[0], used[1] + added[1])
        with _parsed_lock:
            _parsed[self.path] = (known + tail[:complete], used, definition)
        rest = _sum_lines(tail[complete:])  # a last line without its newline
        if rest is None:
            return None
        return max(used[0] + rest[0], 0), max(used[1] + rest[1], 0)

    def recalculate(self) -> tuple[int, int]:
        used = self.scan()
        data = f"{self.limits.definition}\n{used[0]} {used[1]}\n".encode()
        write_atomic(self.path, data, fsync=False)
        return used

    def usage(self) -> tuple[int, int]:
        """(bytes used, messages used)."""
        used = self._read()
        return used if used is not None else self.recalculate()

    def check(self, add_bytes: int, add_messages: int = 1) -> None:
        """Raise QuotaExceeded if adding this would go over the limits."""
        if not self.limits.bytes and not self.limits.messages:
            return
        used_bytes, used_messages = self.usage()
        over = (self.limits.bytes and used_bytes + add_bytes > self.limits.bytes) or (
            self.limits.messages and used_messages + add_messages > self.limits.messages
        )
        if over:
            raise QuotaExceeded(permanent=self.limits.permanent)

    def add(self, delta_bytes: int, delta_messages: int) -> None:
        """Record a change (one O_APPEND write, atomic against other writers)."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            self.recalculate()
            return
        try:
            write_all(fd, f"{delta_bytes} {delta_messages}\n".encode())
        finally:
            os.close(fd)


#: path → (bytes of maildirsize already parsed, their sum, the definition line).
_parsed: dict[str, tuple[bytes, tuple[int, int], str]] = {}
_parsed_lock = threading.Lock()


def _sum_lines(data: bytes) -> tuple[int, int] | None:
    """Sum of ``<bytes> [<messages>]`` lines; None if one is malformed."""
    used_bytes = used_messages = 0
    for line in data.split(b"\n"):
        parts = line.split()
        if not parts:
            continue
        try:
            used_bytes += int(parts[0])
            used_messages += int(parts[1]) if len(parts) > 1 else 0
        except ValueError:
            return None
    return used_bytes, used_messages
