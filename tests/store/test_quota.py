"""Maildir++ maildirsize: usage read incrementally, exactly as a full parse would."""

from __future__ import annotations

import os
from pathlib import Path

from mailserv.durable import write_atomic
from mailserv.store.quota import Limits, MaildirSize


def full_parse(path: Path) -> tuple[int, int]:
    lines = path.read_text().split("\n")[1:]
    parts = [line.split() for line in lines if line.strip()]
    return sum(int(p[0]) for p in parts), sum(int(p[1]) for p in parts)


def test_usage_follows_appends_from_other_writers_and_rewrites(tmp_path: Path) -> None:
    path = tmp_path / "maildirsize"
    limits = Limits(bytes=10**9, messages=None)
    scans = []

    def scan() -> tuple[int, int]:
        scans.append(1)
        return (100, 2)

    quota = MaildirSize(str(path), limits, scan)
    assert quota.usage() == (100, 2)  # missing: recalculated
    quota.add(50, 1)
    assert quota.usage() == (150, 3)
    with open(path, "a") as f:  # another process (Courier, Dovecot, mailserv) appends
        f.write("-20 -1\n7 1\n")
    assert quota.usage() == (137, 3) == full_parse(path)
    other = MaildirSize(str(path), limits, scan)
    other.add(3, 1)
    assert quota.usage() == (140, 4) == full_parse(path)
    # Replaced by a recalculation elsewhere: same length and header, other content.
    write_atomic(str(path), b"1000000000S\n999 9\n", fsync=False)
    assert quota.usage() == (999, 9)
    quota.add(1, 1)
    assert quota.usage() == (1000, 10) == full_parse(path)
    assert len(scans) == 1


def test_usage_recalculates_when_too_long_or_definition_changed(tmp_path: Path) -> None:
    path = tmp_path / "maildirsize"
    quota = MaildirSize(str(path), Limits(bytes=10**9, messages=None), lambda: (5, 1))
    quota.usage()
    for _ in range(1500):  # past 5120 bytes: Maildir++ asks for a recalculation
        quota.add(1, 1)
    assert os.path.getsize(path) >= 5120
    assert quota.usage() == (5, 1)
    changed = MaildirSize(str(path), Limits(bytes=10**9, messages=10), lambda: (7, 2))
    assert changed.usage() == (7, 2)
    assert path.read_text().startswith("1000000000S,10C\n")


def test_add_to_missing_file_recalculates(tmp_path: Path) -> None:
    path = tmp_path / "maildirsize"
    quota = MaildirSize(str(path), Limits(bytes=None, messages=None), lambda: (42, 3))
    quota.add(10, 1)  # the scan already includes the new message
    assert quota.usage() == (42, 3)
