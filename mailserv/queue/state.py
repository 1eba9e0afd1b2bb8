"""Per-recipient delivery state of queue entries, kept next to the spool's files.

spool.py (the SMTP server's writer) creates ``<id>.entry`` (envelope and
message); the delivery engine never rewrites it.  Everything that changes while the
message waits lives in ``<id>.state`` (JSON), replaced atomically (write to a
temporary file, fsync, rename, fsync the directory), so a crash at any moment
leaves either the old or the new state:

    {"version": 1, "attempts": 3, "next_attempt": 1700000000.0, "hold": false,
     "warned": false, "last_attempt": 1699999000.0,
     "recipients": [{"status": "pending", "reason": null, "mta": null}, ...]}

``recipients`` is aligned with the envelope's recipient list.  Statuses:
``pending`` (to try), ``sent`` (accepted by the next hop), ``failed``
(permanent failure, DSN still to be sent), ``done`` (failure reported or
nothing to report).  An entry with nothing pending or failed is removed
(``.entry`` first: without it the entry does not exist).

Control requests from ``mailserv queue`` while the server runs are files
``control/<name>.json`` that the scheduler applies and removes; the running
scheduler holds ``.lock`` (fcntl) so the CLI knows whether to apply changes
itself.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from mailserv.durable import DirSync
from mailserv.queue import spool
from mailserv.queue.spool import QueueEntry, read_fd

STATE_VERSION = 1
PENDING, SENT, FAILED, DONE = "pending", "sent", "failed", "done"
ORPHAN_AGE = 3600.0  # a file without its .entry older than this is left over from a crash
_tmp_names = itertools.count()
HEADER_SCAN = spool.HEAD_READ  # header bytes searched for TLS-Required (read with the envelope)
PRELOAD = 256 * 1024  # a message up to this size is read with its envelope (load_many)


@dataclass
class RecipientState:
    """What happened to one recipient so far."""

    status: str = PENDING
    reason: str | None = None  # "code enhanced text" of the deciding reply
    mta: str | None = None  # the host that gave it (RFC 3464 Remote-MTA)
    relayed: bool = False  # accepted by a peer without DSN support (RFC 3461 §5.2.2)


@dataclass
class QueueItem:
    """An entry of the queue: the envelope (spool.py) and its delivery state."""

    entry: QueueEntry
    recipients: list[RecipientState]
    attempts: int = 0
    next_attempt: float = 0.0
    last_attempt: float | None = None
    hold: bool = False
    warned: bool = False
    size: int = 0
    # The message itself when it is small (read with the envelope: one disk hop).
    data: bytes | None = None
    # RFC 8689 "TLS-Required: No" in the header: the sender lifts DANE/MTA-STS.
    tls_optional: bool = False
    # Where the message starts in the entry's file (after the envelope line).
    offset: int = 0

    @property
    def id(self) -> str:
        return self.entry.id

    def pending(self) -> list[int]:
        return [i for i, r in enumerate(self.recipients) if r.status == PENDING]

    def failed(self) -> list[int]:
        return [i for i, r in enumerate(self.recipients) if r.status == FAILED]

    @property
    def finished(self) -> bool:
        return not any(r.status in (PENDING, FAILED) for r in self.recipients)

    def state_json(self) -> bytes:
        data: dict[str, Any] = {
            "version": STATE_VERSION,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "last_attempt": self.last_attempt,
            "hold": self.hold,
            "warned": self.warned,
            "recipients": [vars(r) for r in self.recipients],
        }
        return json.dumps(data, sort_keys=True).encode()


@dataclass
class IndexRow:
    """What the scheduler keeps in memory per entry: small, whatever the message size."""

    id: str
    next_attempt: float
    hold: bool = False
    arrival: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class QueueStore:
    """Blocking file operations on one queue directory; call them in the "disk" pool."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.control_dir = os.path.join(directory, "control")
        self._lock_fd: int | None = None

    def path(self, entry_id: str, suffix: str) -> str:
        return os.path.join(self.directory, f"{entry_id}.{suffix}")

    def ensure(self) -> None:
        os.makedirs(self.control_dir, mode=0o750, exist_ok=True)

    # -- the running scheduler's lock ---------------------------------------

    def try_lock(self) -> bool:
        """Take the queue's lock (non-blocking); False if another process holds it."""
        self.ensure()
        fd = os.open(os.path.join(self.directory, ".lock"), os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- entries --------------------------------------------------------------

    def ids(self) -> list[str]:
        return spool.list_entries(self.directory)

    def exists(self, entry_id: str) -> bool:
        return os.path.exists(self.entry_path(entry_id))

    def entry_path(self, entry_id: str) -> str:
        return spool.entry_path(self.directory, entry_id)

    def load(self, entry_id: str, preload: int = 0) -> QueueItem:
        """The entry with its state; FileNotFoundError if it was removed meanwhile.

        With ``preload``, a message of at most that many bytes is read too (``data``).
        """
        # Plain descriptors: a few system calls per file (each one hands the GIL back and
        # forth with the reactor), where open().read() makes seven.
        try:
            fd = os.open(self.entry_path(entry_id), os.O_RDONLY)
        except FileNotFoundError:
            if not spool.upgrade(self.directory, [f"{entry_id}.env"]):  # a version-1 entry?
                raise
            fd = os.open(self.entry_path(entry_id), os.O_RDONLY)
        try:
            head = spool.read_head(fd, max(preload, spool.HEAD_READ))
        finally:
            os.close(fd)
        entry, size = head.entry, head.size
        data = head.data if size <= preload else None
        saved_state = read_small(self.path(entry_id, "state"), 1 << 24)
        raw: dict[str, Any] = json.loads(saved_state) if saved_state is not None else {}
        saved = raw.get("recipients") or []
        recipients = []
        for i, rcpt in enumerate(entry.recipients):
            if i < len(saved):
                recipients.append(RecipientState(**saved[i]))
            elif rcpt.status == "failed":
                recipients.append(RecipientState(FAILED, rcpt.reason))
            else:
                recipients.append(RecipientState())
        return QueueItem(
            entry,
            recipients,
            attempts=int(raw.get("attempts", 0)),
            next_attempt=float(raw.get("next_attempt", 0.0)),
            last_attempt=raw.get("last_attempt"),
            hold=bool(raw.get("hold", False)),
            warned=bool(raw.get("warned", False)),
            size=size,
            data=data,
            tls_optional=tls_required_no(head.data),
            offset=head.offset,
        )

    def save(self, item: QueueItem) -> None:
        """Replace ``<id>.state`` atomically (write, fsync, rename, fsync directory)."""
        final = self.path(item.id, "state")
        tmp = f"{final}.tmp{os.getpid():x}.{next(_tmp_names)}"
        spool.write_file(tmp, [item.state_json()], 0)
        if not self.exists(item.id):  # deleted meanwhile (mailserv queue delete)
            os.unlink(tmp)
            raise FileNotFoundError(item.id)
        os.rename(tmp, final)
        DirSync.of(self.directory).sync()

    def load_many(self, entry_ids: list[str], preload: int = PRELOAD) -> list[Any]:
        """``load`` for a batch (one thread hop): each entry's QueueItem or its exception."""
        out: list[Any] = []
        for entry_id in entry_ids:
            try:
                out.append(self.load(entry_id, preload))
            except (OSError, ValueError, TypeError, KeyError) as exc:
                out.append(exc)
        return out

    def remove_many(self, entry_ids: list[str]) -> list[Any]:
        """``remove`` for a batch (one thread hop): None or the exception, per entry."""
        out: list[Any] = []
        for entry_id in entry_ids:
            try:
                self.remove(entry_id)
                out.append(None)
            except OSError as exc:
                out.append(exc)
        return out

    def remove(self, entry_id: str) -> None:
        """Delete an entry: ``.entry`` first (the entry is gone), then its state.

        The directory is not fsynced (as Postfix does not): if a crash undoes the
        unlink, the entry is delivered once more, which at-least-once allows.
        """
        try:
            os.unlink(self.entry_path(entry_id))
        except FileNotFoundError:
            return
        try:
            os.unlink(self.path(entry_id, "state"))
        except FileNotFoundError:
            pass

    def index_row(self, entry_id: str) -> IndexRow | None:
        """Read only what scheduling needs (the small .state file and the id's time)."""
        try:
            with open(self.path(entry_id, "state"), "rb") as f:
                raw = json.loads(f.read())
        except FileNotFoundError:
            raw = {}
        except (ValueError, OSError):
            raw = {}
        return IndexRow(
            entry_id,
            float(raw.get("next_attempt", 0.0)),
            bool(raw.get("hold", False)),
            arrival_of(entry_id),
        )

    def scan(self, known: frozenset[str] = frozenset()) -> tuple[list[str], list[IndexRow]]:
        """Every entry's id, and the scheduling rows of those not ``known`` yet.

        Also removes leftovers of crashed writes.  Reading only the new entries'
        state keeps a periodic rescan of a large queue cheap.
        """
        self.ensure()
        self.cleanup()
        ids = self.ids()
        rows = []
        for entry_id in ids:
            if entry_id in known:
                continue
            row = self.index_row(entry_id)
            if row is not None:
                rows.append(row)
        return ids, rows

    def cleanup(self, now: float | None = None) -> int:
        """Remove files of entries that never got their ``.entry`` (crash before the 250)."""
        now = time.time() if now is None else now
        removed = 0
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return 0
        # (a version-1 envelope that could not be converted is left to the operator)
        present = {n.split(".", 1)[0] for n in names if n.endswith((spool.SUFFIX, ".env"))}
        for name in names:
            base = name.split(".", 1)[0]
            if base in present or name.startswith(".") or name == "control":
                continue
            path = os.path.join(self.directory, name)
            try:
                if now - os.stat(path).st_mtime > ORPHAN_AGE:
                    os.unlink(path)
                    removed += 1
            except (FileNotFoundError, IsADirectoryError):
                pass
        return removed

    # -- control requests -------------------------------------------------------

    def post_control(self, op: str, entry_id: str | None = None) -> str:
        """Ask the running scheduler to do ``op`` (flush, retry, hold, release, delete)."""
        self.ensure()
        name = f"{time.time():.6f}-{secrets.token_hex(4)}.json"
        tmp = os.path.join(self.control_dir, f".{name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"op": op, "id": entry_id}, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(self.control_dir, name))
        return name

    def take_controls(self) -> list[dict[str, Any]]:
        """The pending control requests, oldest first, removing them."""
        try:
            names = sorted(n for n in os.listdir(self.control_dir) if n.endswith(".json"))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            path = os.path.join(self.control_dir, name)
            try:
                with open(path, encoding="utf-8") as f:
                    out.append(json.load(f))
            except (OSError, ValueError):
                pass
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return out


def read_small(path: str, limit: int) -> bytes | None:
    """A whole small file (at most ``limit`` bytes), or None if it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return read_fd(fd, min(os.fstat(fd).st_size, limit))
    finally:
        os.close(fd)


def tls_required_no(message: bytes) -> bool:
    """Does the header section say "TLS-Required: No" (RFC 8689 §5)?"""
    end = message.find(b"\r\n\r\n")
    header = message[: end + 2] if end >= 0 else message[:HEADER_SCAN]
    if b"tls-required" not in header.lower():
        return False
    unfolded = header.replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ")
    for line in unfolded.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"tls-required":
            return value.strip().lower() == b"no"
    return False


def arrival_of(entry_id: str) -> float:
    """The arrival time encoded in a spool id (milliseconds, hex, first 13 digits)."""
    try:
        return int(entry_id[:13], 16) / 1000.0
    except ValueError:
        return 0.0
