"""Dotlocks: ``<file>.lock`` created atomically with link(2), as Dovecot, mutt and Postfix do.

The lock file holds ``<pid>:<host>`` on its first line, so a lock left by a
process that died on this host is broken at once; any other lock is broken
once it is older than the stale timeout (Dovecot's uidlist lock: 120 s;
LIMITS.md mbox dotlock: 500 s).  Extra lines (``note``) may be appended by the
holder; whoever breaks a stale lock gets its content back, which the mbox
store uses to undo a half-written append.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

from mailserv.durable import hostname, pid_alive, unique_name, write_all
from mailserv.errors import TemporaryFailure


class LockTimeout(TemporaryFailure):
    """A lock could not be taken in time; the caller should retry later."""


class _ThreadGate:
    """One threading.Lock per lock path, so the threads of one process queue for a
    dotlock without polling it (only one of them polls the file at a time)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, list[Any]] = {}  # path -> [Lock, users]

    def acquire(self, path: str, timeout: float) -> bool:
        with self._guard:
            entry = self._locks.setdefault(path, [threading.Lock(), 0])
            entry[1] += 1
        if entry[0].acquire(timeout=max(timeout, 0.0)):
            return True
        self._drop(path, entry)
        return False

    def release(self, path: str) -> None:
        with self._guard:
            entry = self._locks[path]
        entry[0].release()
        self._drop(path, entry)

    def _drop(self, path: str, entry: list[Any]) -> None:
        with self._guard:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[path]


_gate = _ThreadGate()


class DotLock:
    """One dotlock at ``path`` (usually ``<file>.lock``)."""

    def __init__(
        self,
        path: str,
        *,
        stale_timeout: float = 120.0,
        timeout: float = 60.0,
        poll: float = 0.005,
        max_poll: float = 0.1,
    ) -> None:
        self.path = path
        self.stale_timeout = stale_timeout
        self.timeout = timeout
        self.poll = poll
        self.max_poll = max_poll
        self.held = False
        self.broken_content: bytes | None = None

    def _ident(self) -> bytes:
        return f"{os.getpid()}:{hostname()}\n".encode()

    def _try_link(self) -> bool:
        """One attempt: link a private temp file to the lock name (NFS-safe)."""
        directory = os.path.dirname(self.path) or "."
        tmp = os.path.join(directory, f".{os.path.basename(self.path)}.{unique_name()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            write_all(fd, self._ident())
        finally:
            os.close(fd)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self.held = True
        return True

    def acquire(self) -> None:
        """Take the lock, breaking stale ones; LockTimeout after ``timeout`` seconds."""
        deadline = time.monotonic() + self.timeout
        if not _gate.acquire(self.path, self.timeout):
            raise LockTimeout(f"could not lock {self.path}")
        try:
            delay = self.poll
            while not self._try_link():
                self._break_if_stale()
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"could not lock {self.path}")
                time.sleep(delay)
                delay = min(delay * 2, self.max_poll)
        except BaseException:
            _gate.release(self.path)
            raise

    def _break_if_stale(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            st = os.fstat(fd)
            content = os.read(fd, 4096)
        finally:
            os.close(fd)
        if not self._is_stale(content, st.st_mtime):
            return
        # Rename it aside and check it is the lock we judged, not a fresh one.
        aside = f"{self.path}.stale.{unique_name()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if os.stat(aside).st_ino == st.st_ino:
            os.unlink(aside)
            self.broken_content = content
            return
        with contextlib.suppress(OSError):
            os.link(aside, self.path)  # put back the live lock we took by mistake
        with contextlib.suppress(OSError):
            os.unlink(aside)

    def _is_stale(self, content: bytes, mtime: float) -> bool:
        first = content.split(b"\n", 1)[0].decode("ascii", "replace")
        pid_text, _, host = first.partition(":")
        if pid_text.isdigit() and (not host or host == hostname()):
            if not pid_alive(int(pid_text)):
                return True
        return time.time() - mtime > self.stale_timeout

    def note(self, text: str) -> None:
        """Append a line to the lock file (read back by whoever breaks it)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            write_all(fd, text.encode() + b"\n")
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            finally:
                _gate.release(self.path)

    def __enter__(self) -> DotLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
