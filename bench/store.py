"""Delivery rate of the maildir and mbox stores next to the disk's own rate.

Not a test: run it by hand on the machine you care about::

    .venv/bin/python bench/store.py [--dir /var/tmp] [--seconds 5]

For 4 KiB and 1 MiB messages it measures, in one run on the same filesystem:

- ``disk``: create + write + fsync + rename of a file (what a maildir
  delivery cannot do without), and ``disk+dirsync`` which also fsyncs the
  target directory, as a durable delivery must (LIMITS.md "fsync");
- ``maildir``: ``MaildirStore.deliver`` from a spool file with a
  Delivered-To prefix, maildirsize quota on (tmp → fsync → new/ → fsync dir);
- ``mbox``: ``MboxStore.deliver`` (dotlock + fcntl, mboxrd quoting, fsync).

and prints deliveries per second and the ratio to ``disk``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mailserv.config.sections import StoreSection
from mailserv.directory import User
from mailserv.store.maildir import MaildirStore
from mailserv.store.mbox import MboxStore

WHAT = ("disk", "disk+dirsync", "maildir", "mbox")


def message(size: int) -> bytes:
    """A CRLF message of ``size`` bytes with 76-character lines."""
    head = b"From: bench@example.test\r\nTo: alice@example.test\r\nSubject: bench\r\n\r\n"
    line = b"x" * 74 + b"\r\n"
    body = line * ((size - len(head)) // len(line) + 1)
    return (head + body)[:size]


def rate(fn: Callable[[int], None], seconds: float, threads: int) -> float:
    """Calls per second of ``fn(i)`` from ``threads`` threads over about ``seconds``."""
    fn(-1)  # warm up
    counter = itertools.count()
    done = [0] * threads
    stop = time.perf_counter() + seconds

    def worker(k: int) -> None:
        while time.perf_counter() < stop:
            fn(next(counter))
            done[k] += 1

    start = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(done) / (time.perf_counter() - start)


def disk(root: Path, data: bytes, dirsync: bool) -> Callable[[int], None]:
    tmp, new = root / "tmp", root / "new"
    tmp.mkdir(parents=True)
    new.mkdir()

    def once(i: int) -> None:
        name = f"m{i}.{time.time_ns()}"
        fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp / name, new / name)
        if dirsync:
            dfd = os.open(new, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(dfd)
            os.close(dfd)

    return once


def store(kind: str, root: Path, spool: Path) -> Callable[[int], None]:
    config = StoreSection(path="/unused/{user}", format=kind, quota=10 * 2**40)
    impl = MaildirStore(config) if kind == "maildir" else MboxStore(config)
    user = User(
        name="alice",
        mailbox=str(root / ("Maildir" if kind == "maildir" else "mbox")),
        store_format=kind,
    )
    prefix = b"Return-Path: <bench@example.test>\r\nDelivered-To: alice@example.test\r\n"

    def once(_i: int) -> None:
        impl.deliver(user, str(spool), prefix=prefix)

    return once


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=None, help="where to write (default: system temp dir)")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per figure (median)")
    parser.add_argument(
        "--threads", default="1,8", help="concurrent deliveries to try (the disk pool has 10)"
    )
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="mailserv-bench-", dir=args.dir))
    print(f"filesystem of {base}; {os.cpu_count()} CPUs; Python {sys.version.split()[0]}")
    print(
        f"{'size':>6} {'threads':>7} {'what':<13} {'deliveries/s':>13} {'MB/s':>8} {'vs disk':>8}"
    )
    try:
        for size, label in ((4096, "4 KiB"), (1 << 20, "1 MiB")):
            data = message(size)
            spool = base / f"spool-{size}"
            spool.write_bytes(data)
            for threads in (int(t) for t in args.threads.split(",")):
                samples: dict[str, list[float]] = {w: [] for w in WHAT}
                for _ in range(args.rounds):  # interleaved rounds: the disk rate drifts
                    for what in WHAT:
                        root = base / f"{what}-{size}"
                        root.mkdir()
                        if what.startswith("disk"):
                            fn = disk(root, data, dirsync=what == "disk+dirsync")
                        else:
                            fn = store(what, root, spool)
                        samples[what].append(rate(fn, args.seconds, threads))
                        shutil.rmtree(root)
                results = {w: statistics.median(v) for w, v in samples.items()}
                for what in WHAT:
                    ratio = results[what] / results["disk"]
                    mbs = results[what] * size / 1e6
                    print(
                        f"{label:>6} {threads:>7} {what:<13} {results[what]:>13.1f}"
                        f" {mbs:>8.1f} {ratio:>7.0%}"
                    )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
