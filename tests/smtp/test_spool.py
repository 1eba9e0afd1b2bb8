"""DataSink and the line-length scan, against simple reference implementations."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mailserv.errors import SMTPReply
from mailserv.smtp.spool import (
    BARE_LINE_END,
    LINE_TOO_LONG,
    DataSink,
    has_bare_line_end,
    has_long_line,
)


def _reference(data: bytes, limit: int) -> bool:
    return max(map(len, data.split(b"\n"))) > limit


def test_has_long_line_matches_reference() -> None:
    rng = random.Random(5321)
    for _ in range(3000):
        lengths = [rng.choice([0, 1, 5, 80, 997, 998, 999, 1000, 1001, 3000]) for _ in range(6)]
        data = b"\n".join(b"x" * n for n in lengths) + rng.choice([b"", b"\n"])
        for limit in (999, 10, 1):
            assert has_long_line(data, limit) == _reference(data, limit), (lengths, limit)


def test_has_bare_line_end_matches_reference() -> None:
    """RFC 5321 §2.3.8: CR and LF only as CRLF; anything else is a bare line end."""

    def reference(data: bytes) -> bool:
        return any(
            (ch == 13 and data[i + 1 : i + 2] != b"\n") or (ch == 10 and data[i - 1 : i] != b"\r")
            for i, ch in enumerate(data)
        )

    rng = random.Random(3030)
    for _ in range(20000):
        data = bytes(rng.choice(b"a\r\n.") for _ in range(rng.randint(0, 10)))
        assert has_bare_line_end(data) == reference(data), data
    assert has_bare_line_end(b"\rx\n")  # as many CRs as LFs, none paired
    assert not has_bare_line_end(b"a\r\n" * 1000 + b"\xff\x00")


def _feed_all(sink: DataSink, data: bytes, sizes: list[int]) -> int | None:
    pos = 0
    for size in sizes:
        piece = data[pos : pos + size]
        pos += size
        consumed = sink.feed(piece)
        if consumed is not None:
            return pos - size + consumed
    return None


@pytest.mark.parametrize("seed", range(20))
def test_any_split_gives_the_same_message(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    body = b"Subject: s\r\n\r\n" + b"".join(
        rng.choice([b".", b"..", b"", b"a"]) + b"y" * rng.randint(0, 120) + b"\r\n"
        for _ in range(200)
    )
    wire = body.replace(b"\r\n.", b"\r\n..") + b".\r\nNEXT"
    sizes = []
    while sum(sizes) < len(wire):
        sizes.append(rng.randint(1, 700))
    sink = DataSink(str(tmp_path), 10**7, memory_limit=rng.choice([100, 10**6]))
    end = _feed_all(sink, wire, sizes)
    assert end == len(wire) - 4
    message = sink.finish()
    with message.open() as f:
        assert f.read() == body
    message.discard()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "body",
    [
        b"Subject: s\r\n\r\nplain\r\nlines\r\n",
        b"Subject: s\r\n\r\n.dot first\r\nmid\r\n.\r\n..\r\nlast.\r\n",
        b"Subject: s\r\n\r\n.\r\n",
    ],
)
def test_end_of_data_found_at_every_split(tmp_path: Path, body: bytes) -> None:
    """Whether a TCP segment boundary falls inside the end marker or a dot-stuffed line,
    the end of data is the first CRLF.CRLF and the dots are removed (RFC 5321 §4.5.2)."""
    wire = body.replace(b"\r\n.", b"\r\n..") + b".\r\nQUIT\r\n"
    for split in range(1, len(wire)):
        sink = DataSink(str(tmp_path), 10**6)
        assert _feed_all(sink, wire, [split, len(wire)]) == len(wire) - 6, split
        with sink.finish().open() as f:
            assert f.read() == body, split


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"a\nb\r\n.\r\n", BARE_LINE_END),
        (b"a\rb\r\n.\r\n", BARE_LINE_END),
        (b"x" * 999 + b"\r\n.\r\n", LINE_TOO_LONG),
        (b"x" * 5000 + b"\r\n.\r\n", LINE_TOO_LONG),
    ],
)
def test_refusals(tmp_path: Path, data: bytes, error: SMTPReply) -> None:
    sink = DataSink(str(tmp_path), 10**6)
    assert _feed_all(sink, data, [7] * (len(data) // 7 + 1)) == len(data)
    with pytest.raises(SMTPReply) as exc:
        sink.finish()
    assert exc.value == error


def test_large_message_streams_with_bounded_memory(tmp_path: Path) -> None:
    import tracemalloc

    line = b"y" * 78 + b"\r\n"
    chunk = line * 800  # 64 000 bytes
    sink = DataSink(str(tmp_path), 10**9)
    tracemalloc.start()
    try:
        sink.feed(b"Subject: big\r\n\r\n")
        for _ in range(320):  # 20 MB
            assert sink.feed(chunk) is None
        assert sink.feed(b".\r\n") == 3
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = sink.finish()
    assert message.path is not None and message.size == 16 + 320 * len(chunk)
    assert peak < 1_000_000, peak
    message.discard()


def test_clean_spool_removes_only_old_files(tmp_path: Path) -> None:
    import os
    import time

    from mailserv.smtp import clean_spool

    old = tmp_path / "old.eml"
    new = tmp_path / "new.eml"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    past = time.time() - 2 * 86_400
    os.utime(old, (past, past))
    assert clean_spool(str(tmp_path)) == 1
    assert not old.exists() and new.exists()
    assert clean_spool(str(tmp_path / "missing")) == 0
