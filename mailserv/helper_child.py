"""The child side of the delivery helpers (mailserv/helpers.py has the design).

``python -m mailserv.helper_child``: single-threaded, imports only the store
and the queue's spool code (no Twisted, ~20 MB).  It reads requests from its
stdin and writes replies to its stdout, one frame each: a 4-byte big-endian
length and a pickle (safe here: both ends are this program, over a private
pipe).

- ``("config", StoreSection)`` first, and again after a reload;
- ``(id, "deliver", (user, folder, detail_to_folder, prefix, message))`` ->
  ``(id, True, chosen folder)``;
- ``(id, "enqueue", (queue_dir, entry, message))`` -> ``(id, True, entry id)``;
- a failure is ``(id, False, exception)``.

It exits at EOF on stdin, after the requests it has read.
"""

from __future__ import annotations

import os
import pickle
import select
import struct
import sys
from collections.abc import Callable
from typing import Any

HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024  # a request holds at most one in-memory message (128 KiB)
MAX_BATCH = 64  # requests written before their directories are fsynced


def frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


def loads(data: bytes) -> Any:
    """A frame's object.  Both ends of the pipe are this program (a child and the process
    that started it, over a private pipe), so unpickling is not of untrusted data."""
    return pickle.loads(data)  # noqa: S301


def light_message(message: Any) -> Any:
    """The message without its parsed headers (the child needs bytes or path, and prefix)."""
    import dataclasses

    return dataclasses.replace(message, headers=[])


def plain_user(user: Any) -> Any:
    """``user`` with a plain dict ``extra`` (a mapping proxy does not pickle)."""
    import dataclasses

    return dataclasses.replace(user, extra=dict(user.extra))


# ----------------------------------------------------------------------
# The child


class _Child:
    def __init__(self) -> None:
        self.store_config: Any = None
        self._stores: dict[str, Any] = {}

    def configure(self, store_config: Any) -> None:
        self.store_config = store_config
        self._stores.clear()

    def deliver(
        self, user: Any, folder: str | None, detail_to_folder: bool, prefix: bytes, message: Any
    ) -> str | None:
        from mailserv.store import deliver_message, store_for

        fmt = (user.store_format or self.store_config.format).lower()
        store = self._stores.get(fmt)
        if store is None:
            store = self._stores[fmt] = store_for(user, self.store_config)
        return deliver_message(store, user, message, folder, prefix, detail_to_folder)

    def enqueue(self, queue_dir: str, entry: Any, message: Any) -> str:
        from mailserv.queue.spool import enqueue

        return enqueue(queue_dir, entry, message.iter_chunks())


def _picklable_error(exc: BaseException) -> BaseException:
    try:
        loads(pickle.dumps(exc))
        return exc
    except Exception:
        return OSError(f"{type(exc).__name__}: {exc}")


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def split_frames(buf: bytearray) -> tuple[list[Any], Exception | None]:
    """Take the complete frames off the front of ``buf``: their objects, in order, and the
    error that stopped the parse (an oversized frame, an unreadable pickle), if any."""
    out = []
    offset = 0
    error: Exception | None = None
    while len(buf) - offset >= HEADER.size:
        (length,) = HEADER.unpack_from(buf, offset)
        if length > MAX_FRAME:
            error = ValueError(f"frame of {length} bytes refused")
            break
        end = offset + HEADER.size + length
        if len(buf) < end:
            break
        try:
            out.append(loads(bytes(buf[offset + HEADER.size : end])))
        except Exception as exc:
            error = exc
            break
        offset = end
    del buf[:offset]
    return out, error


class _Frames:
    """Frames read from a file descriptor, parsed from one growing buffer."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()
        self.eof = False

    def parse(self) -> list[Any]:
        out, error = split_frames(self.buf)
        if error is not None:
            raise ValueError(f"bad request: {error}")
        return out

    def fill(self) -> None:
        data = os.read(self.fd, 256 * 1024)
        if data:
            self.buf += data
        else:
            self.eof = True


def serve(read_fd: int, out: int) -> int:
    """The child's loop (see the module docstring) until EOF on ``read_fd``.

    Group commit: the requests that have arrived by the time one is read form a
    batch (at most ``MAX_BATCH``); each is written and renamed with its directory
    fsync put off (``DirSync.collect``), then each directory the batch touched is
    fsynced once, then every reply goes out in one write.  A request's reply is
    therefore sent only after its own fsyncs and its directory's, as before; K
    deliveries into one mailbox cost K + 1 fsyncs instead of 2K.
    """
    from mailserv.durable import DirSync, fsync_dir, write_all

    child = _Child()
    ops: dict[str, Callable[..., Any]] = {"deliver": child.deliver, "enqueue": child.enqueue}
    frames = _Frames(read_fd)
    while True:
        batch: list[Any] = []
        try:
            while True:
                batch.extend(frames.parse())
                if frames.eof or len(batch) >= MAX_BATCH or (batch and not _readable(read_fd)):
                    break
                frames.fill()
        except ValueError as exc:
            print(f"mailserv helper: {exc}", file=sys.stderr)
            return 2
        done: list[tuple[int, bool, Any, list[str]]] = []
        for request in batch:
            if request[0] == "config":
                child.configure(request[1])
                continue
            rid, op, args = request
            dirs: list[str] = []
            try:
                with DirSync.collect(dirs):
                    done.append((rid, True, ops[op](*args), dirs))
            except Exception as exc:
                done.append((rid, False, _picklable_error(exc), []))
        failed: dict[str, OSError] = {}
        for directory in dict.fromkeys(d for _, _, _, dirs in done for d in dirs):
            try:
                fsync_dir(directory)
            except OSError as exc:
                failed[directory] = exc
        replies = []
        for rid, ok, value, dirs in done:
            error = next((failed[d] for d in dirs if d in failed), None)
            replies.append(frame((rid, False, error) if error else (rid, ok, value)))
        if replies:
            write_all(out, b"".join(replies))
        if frames.eof:
            return 0


def main() -> int:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    # Replies go to a private copy of stdout; fd 1 then points at stderr, so a stray
    # print() (a library's warning) lands in the parent's log, not in a reply frame.
    out = os.dup(1)
    os.dup2(2, 1)
    return serve(0, out)


if __name__ == "__main__":
    sys.exit(main())
