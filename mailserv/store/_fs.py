"""Small durable-filesystem helpers shared by the maildir and mbox stores.

Every write that must survive a crash goes through here: write a temporary
file, fsync it, rename it into place, fsync the directory (LIMITS.md "fsync").
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
import time
from collections.abc import Iterator
from typing import IO, BinaryIO

_counter = itertools.count(1)
CHUNK = 64 * 1024


def hostname() -> str:
    """The host name as it may appear in a maildir file name (no '/' or ':')."""
    name = socket.gethostname() or "localhost"
    return name.replace("/", r"\057").replace(":", r"\072")


def unique_name() -> str:
    """A maildir unique name: time, microseconds, pid, counter, host.

    The Dovecot form ``<sec>.M<usec>P<pid>Q<n>.<host>`` (cr.yp.to/proto/maildir.html).
    """
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    return f"{sec}.M{usec}P{os.getpid()}Q{next(_counter)}.{hostname()}"


def fsync_dir(path: str) -> None:
    """fsync a directory so that a rename or create in it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, *, fsync: bool = True, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically (temp file, fsync, rename, fsync dir)."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{unique_name()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            write_all(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(directory)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until every byte is written."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def read_file(path: str) -> bytes | None:
    """The content of ``path``, or None if it does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def source_size(source: str | os.PathLike[str] | IO[bytes]) -> int | None:
    """The number of bytes left to read in ``source`` if it can be known cheaply."""
    try:
        if isinstance(source, str | os.PathLike):
            return os.stat(source).st_size
        st = os.fstat(source.fileno())
        return st.st_size - source.tell()
    except (OSError, AttributeError, ValueError):
        return None


@contextlib.contextmanager
def open_source(source: str | os.PathLike[str] | IO[bytes]) -> Iterator[BinaryIO]:
    """Open a path, or rewind a file object, to read a message from its start."""
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            yield f
        return
    if source.seekable():
        source.seek(0)
    yield source  # type: ignore[misc]


def copy_into(fd: int, source: BinaryIO) -> int:
    """Copy the rest of ``source`` to ``fd``; returns the byte count.

    Uses ``os.sendfile`` when the source is a real file (no copy through Python).
    """
    total = 0
    try:
        in_fd = source.fileno()
        offset = source.tell()
        os.fstat(in_fd)
    except (OSError, AttributeError, ValueError):
        in_fd = -1
    if in_fd >= 0:
        try:
            while True:
                sent = os.sendfile(fd, in_fd, offset, 1 << 20)
                if sent == 0:
                    break
                offset += sent
                total += sent
            source.seek(offset)
            return total
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS) or total:
                raise
    while True:
        chunk = source.read(CHUNK)
        if not chunk:
            return total
        write_all(fd, chunk)
        total += len(chunk)


def pid_alive(pid: int) -> bool:
    """Is process ``pid`` running on this host (zombies count as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def next_uidvalidity(directory: str) -> int:
    """A UIDVALIDITY never handed out before in ``directory`` (RFC 3501 §2.3.1.1).

    Time based, like Dovecot's; an exclusive ``dovecot-uidvalidity.<hex>``
    marker makes two folders created in the same second differ.
    """
    prefix = "dovecot-uidvalidity."
    seen = []
    for name in os.listdir(directory):
        if name.startswith(prefix):
            with contextlib.suppress(ValueError):
                seen.append((int(name[len(prefix) :], 16), name))
    value = max([int(time.time())] + [v + 1 for v, _ in seen]) & 0xFFFFFFFF or 1
    while True:
        try:
            os.close(
                os.open(
                    os.path.join(directory, f"{prefix}{value:08x}"), os.O_CREAT | os.O_EXCL, 0o600
                )
            )
            break
        except FileExistsError:
            value += 1
    for _, name in seen:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
    return value


def listdir(path: str) -> list[str]:
    """os.listdir, or [] when the directory is missing."""
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
