"""The durable outbound queue on disk: how the SMTP server hands over mail.

On-disk format (version 2), under ``<state_dir>/queue/``, one file per entry::

    <id>.entry   one line of JSON (UTF-8, no newline inside: the envelope, see
                 ``QueueEntry.to_json``), a LF, then the message exactly as it
                 is to be sent: the header lines this server added (Received,
                 ...) then the data received, CRLF lines

The message starts after the first LF (``EntryHead.offset``).  Write order:
the file is written as ``<id>.tmp``, fsynced and renamed to ``<id>.entry``,
then the directory is fsynced.  Concurrent enqueues share directory fsyncs
(group commit, ``mailserv.durable.DirSync``): each waits for an fsync of the
directory that started after its rename, so none returns before its entry is
durable.  An entry exists if and only if its ``.entry`` file exists; a
``.tmp`` is left over from a crash before the client got its 250 and may be
removed.  One file per entry is one inode allocated, fsynced and freed per
queued message (version 1 had two: on a busy queue the file system's inode
allocation was the largest cost of an enqueue, measured).

Version 1 (``<id>.msg`` with the message, ``<id>.env`` with the envelope) is
converted to version 2 by ``upgrade`` when a queue directory is listed.

Envelope fields: ``version``, ``id``, ``arrival`` (Unix time), ``sender``
(RFC 5321 reverse-path text, "" for <>), ``envid``, ``ret`` (RFC 3461),
``smtputf8``, ``body`` ("7BIT"/"8BITMIME"), ``requiretls`` (RFC 8689; absent
means false), and ``recipients``: a list of
``{"address", "orcpt", "notify", "status", "reason"}`` where ``status`` is
``"pending"`` (to deliver; local recipients whose delivery failed
temporarily are queued too, the queue hands them back to the router) or
``"failed"`` (a permanent failure that still needs a DSN, with ``reason``).
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from mailserv.durable import DirSync, write_all

FORMAT_VERSION = 2
SUFFIX = ".entry"
HEAD_READ = 64 * 1024  # read with the envelope line: the header section of most messages
MAX_ENVELOPE = 16 * 1024 * 1024  # an envelope line longer than this is refused as damaged
_ids = itertools.count()


@dataclass
class QueuedRecipient:
    address: str
    orcpt: str | None = None
    notify: list[str] | None = None
    status: str = "pending"  # pending | failed
    reason: str | None = None


@dataclass
class QueueEntry:
    id: str
    sender: str
    recipients: list[QueuedRecipient]
    arrival: float = field(default_factory=time.time)
    envid: str | None = None
    ret: str | None = None
    smtputf8: bool = False
    body: str = "7BIT"
    requiretls: bool = False  # RFC 8689 MAIL FROM ... REQUIRETLS
    version: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> QueueEntry:
        raw: dict[str, Any] = json.loads(data.decode("utf-8"))
        rcpts = [QueuedRecipient(**r) for r in raw.pop("recipients")]
        return cls(recipients=rcpts, **raw)


def new_id() -> str:
    """A queue id: time-ordered and unique across processes.

    Milliseconds, the process id and a per-process counter (no system call: the
    random ids this replaces cost a getrandom() per message on the reactor).
    The files are created exclusively, so even an impossible clash fails the
    enqueue (a temporary error) rather than overwrite an entry.
    """
    return f"{int(time.time() * 1000):013x}{os.getpid() & 0xFFFFFF:06x}{next(_ids) & 0xFFFF:04x}"


def write_file(path: str, chunks: Iterable[bytes], flags: int = os.O_EXCL) -> None:
    """Create ``path`` with ``chunks`` and fsync it (plain descriptors: few system calls)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o600)
    try:
        for chunk in chunks:
            write_all(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)


def entry_path(queue_dir: str, entry_id: str) -> str:
    return os.path.join(queue_dir, entry_id + SUFFIX)


def enqueue(queue_dir: str, entry: QueueEntry, chunks: Iterable[bytes]) -> str:
    """Write a queue entry durably (blocking: a helper process or the "disk" pool); its id.

    Never replaces an entry: an id that exists already fails with FileExistsError.
    """
    if not os.path.isdir(queue_dir):
        os.makedirs(queue_dir, exist_ok=True)
    final = entry_path(queue_dir, entry.id)
    if os.path.lexists(final):
        raise FileExistsError(errno.EEXIST, "queue entry exists", final)
    tmp = os.path.join(queue_dir, f"{entry.id}.tmp")
    try:
        write_file(tmp, _with_envelope(entry, chunks))
        os.rename(tmp, final)
    except FileExistsError:
        raise  # the temporary file of another write of this id: not ours to remove
    except BaseException:
        _unlink(tmp)
        raise
    DirSync.of(queue_dir).sync()
    return entry.id


def _with_envelope(entry: QueueEntry, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The envelope line, sent in one write with the first chunk when that is small."""
    line = entry.to_json() + b"\n"
    it = iter(chunks)
    for chunk in it:
        if len(chunk) < HEAD_READ:
            yield line + chunk
        else:
            yield line
            yield chunk
        break
    else:
        yield line
    yield from it


@dataclass
class EntryHead:
    """The start of an entry file: its envelope and where its message lies."""

    entry: QueueEntry
    offset: int  # the message's first byte in the file
    size: int  # the message's size
    data: bytes  # the message's first bytes (all of it when ``len(data) == size``)


def read_fd(fd: int, size: int) -> bytes:
    """Up to ``size`` bytes from the current offset (fewer only at the end of the file)."""
    parts = []
    while size > 0:
        chunk = os.read(fd, size)
        if not chunk:
            break
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


def read_head(fd: int, want: int = HEAD_READ) -> EntryHead:
    """The envelope of the entry open on ``fd`` (at its start) and the message's first
    bytes: all of it when it is at most ``want`` bytes, else at least HEAD_READ of them
    (for a look at the header section).

    ValueError for a file that is not an entry (no envelope line, bad JSON).
    """
    total = os.fstat(fd).st_size
    # The whole file when it is about ``want`` or less (one read), else its head.
    buf = read_fd(fd, total if total <= want + HEAD_READ else HEAD_READ)
    end = buf.find(b"\n")
    while end < 0:
        if len(buf) >= total or len(buf) > MAX_ENVELOPE:
            raise ValueError("queue entry without a complete envelope line")
        searched = len(buf)
        buf += read_fd(fd, min(total - len(buf), max(len(buf), HEAD_READ)))
        end = buf.find(b"\n", searched)
    entry = QueueEntry.from_json(buf[:end])
    offset = end + 1
    data = buf[offset:]
    size = total - offset
    need = size if size <= want else min(size, HEAD_READ)
    if len(data) < need:
        data += read_fd(fd, need - len(data))
    return EntryHead(entry, offset, size, data)


def open_head(queue_dir: str, entry_id: str, want: int = HEAD_READ) -> EntryHead:
    """``read_head`` of an entry by id; FileNotFoundError if there is no such entry."""
    fd = os.open(entry_path(queue_dir, entry_id), os.O_RDONLY)
    try:
        return read_head(fd, want)
    finally:
        os.close(fd)


def list_entries(queue_dir: str) -> list[str]:
    """The ids of the complete entries, oldest first (version-1 entries are converted)."""
    try:
        names = os.listdir(queue_dir)
    except FileNotFoundError:
        return []
    if any(n.endswith(".env") for n in names):
        upgrade(queue_dir, names)
        names = os.listdir(queue_dir)
    cut = len(SUFFIX)
    return sorted(n[:-cut] for n in names if n.endswith(SUFFIX))


def load_entry(queue_dir: str, entry_id: str) -> QueueEntry:
    return open_head(queue_dir, entry_id, 0).entry


def read_message(queue_dir: str, entry_id: str) -> bytes:
    """The whole message of an entry (tests, ``mailserv queue show``)."""
    with open(entry_path(queue_dir, entry_id), "rb") as f:
        f.readline(MAX_ENVELOPE)
        return f.read()


def upgrade(queue_dir: str, names: Iterable[str]) -> list[str]:
    """Convert the version-1 entries among ``names`` (``<id>.env`` + ``<id>.msg``).

    Each becomes ``<id>.entry`` (written, fsynced, renamed; then one directory
    fsync) before its old files are removed, so a crash at any point leaves the
    entry in one format or both; both is finished here the next time.  An
    envelope that cannot be read is left as it is (for the operator).  Returns
    the converted ids.
    """
    present = set(names)
    converted = []
    for name in sorted(present):
        if not name.endswith(".env"):
            continue
        entry_id = name[:-4]
        if entry_id + SUFFIX not in present:
            try:
                with open(os.path.join(queue_dir, name), "rb") as f:
                    entry = QueueEntry.from_json(f.read())
                with open(os.path.join(queue_dir, f"{entry_id}.msg"), "rb") as src:
                    entry.version = FORMAT_VERSION
                    tmp = os.path.join(queue_dir, f"{entry_id}.tmp")
                    write_file(tmp, _with_envelope(entry, iter(lambda: src.read(1 << 20), b"")), 0)
                os.rename(tmp, entry_path(queue_dir, entry_id))
            except FileNotFoundError:
                continue  # removed meanwhile, or no message: nothing to deliver
            except (ValueError, TypeError, KeyError):
                continue
        converted.append(entry_id)
    if converted:
        DirSync.of(queue_dir).sync()
    for entry_id in converted:
        _unlink(os.path.join(queue_dir, f"{entry_id}.env"))
        _unlink(os.path.join(queue_dir, f"{entry_id}.msg"))
    return converted


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def recipients_of(
    rows: Sequence[tuple[str, str | None, Any, str, str | None]],
) -> list[QueuedRecipient]:
    """Build QueuedRecipients from (address, orcpt, notify, status, reason) rows."""
    return [QueuedRecipient(a, o, list(n) if n else None, s, r) for a, o, n, s, r in rows]
