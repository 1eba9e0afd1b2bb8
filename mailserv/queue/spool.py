"""The durable outbound queue on disk: how the SMTP server hands over mail.

On-disk format (version 1), under ``<state_dir>/queue/``::

    <id>.msg   the message exactly as it is to be sent: the header lines this
               server added (Received, ...) then the data received, CRLF lines
    <id>.env   the envelope, JSON (UTF-8), see ``QueueEntry.to_json``

Write order: ``<id>.msg`` is written and fsynced, then ``<id>.env`` is
written to ``<id>.env.tmp``, fsynced and renamed into place, then the
directory is fsynced.  Concurrent enqueues share directory fsyncs (group
commit, ``mailserv.durable.DirSync``): each waits for an fsync of the directory that started
after its rename, so none returns before its entry is durable.  An entry
exists if and only if its ``.env`` exists; a ``.msg`` (or ``.env.tmp``)
without ``.env`` is left over from a crash before the client got its 250 and
may be removed.

Envelope fields: ``version`` (1), ``id``, ``arrival`` (Unix time), ``sender``
(RFC 5321 reverse-path text, "" for <>), ``envid``, ``ret`` (RFC 3461),
``smtputf8``, ``body`` ("7BIT"/"8BITMIME"), ``requiretls`` (RFC 8689; absent
means false), and ``recipients``: a list of
``{"address", "orcpt", "notify", "status", "reason"}`` where ``status`` is
``"pending"`` (to deliver; local recipients whose delivery failed
temporarily are queued too, the queue hands them back to the router) or
``"failed"`` (a permanent failure that still needs a DSN, with ``reason``).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from mailserv.durable import DirSync, write_all

FORMAT_VERSION = 1
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


def enqueue(queue_dir: str, entry: QueueEntry, chunks: Iterable[bytes]) -> str:
    """Write a queue entry durably (blocking: run it in the "disk" pool); returns its id."""
    if not os.path.isdir(queue_dir):
        os.makedirs(queue_dir, exist_ok=True)
    msg_path = os.path.join(queue_dir, f"{entry.id}.msg")
    env_path = os.path.join(queue_dir, f"{entry.id}.env")
    tmp_path = env_path + ".tmp"
    write_file(msg_path, chunks)
    write_file(tmp_path, [entry.to_json()], 0)
    os.rename(tmp_path, env_path)
    DirSync.of(queue_dir).sync()
    return entry.id


def list_entries(queue_dir: str) -> list[str]:
    """The ids of the complete entries, oldest first."""
    try:
        names = os.listdir(queue_dir)
    except FileNotFoundError:
        return []
    return sorted(n[:-4] for n in names if n.endswith(".env"))


def load_entry(queue_dir: str, entry_id: str) -> QueueEntry:
    with open(os.path.join(queue_dir, f"{entry_id}.env"), "rb") as f:
        return QueueEntry.from_json(f.read())


def message_path(queue_dir: str, entry_id: str) -> str:
    return os.path.join(queue_dir, f"{entry_id}.msg")


def recipients_of(
    rows: Sequence[tuple[str, str | None, Any, str, str | None]],
) -> list[QueuedRecipient]:
    """Build QueuedRecipients from (address, orcpt, notify, status, reason) rows."""
    return [QueuedRecipient(a, o, list(n) if n else None, s, r) for a, o, n, s, r in rows]
