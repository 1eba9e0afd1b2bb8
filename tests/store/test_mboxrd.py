"""mboxrd quoting (RFC 4155) and the CRLF view, across chunk boundaries."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest

from mailserv.directory import User
from mailserv.durable import CHUNK, MAX_CARRY, crlf_size, open_crlf
from mailserv.store.mbox import quote_lines, scan
from tests.store.helpers import make_store


def crlf_view(data: bytes) -> bytes:
    """What a reader must get back: every line end CRLF, a final line end."""
    out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return out if out.endswith(b"\r\n") or not out else out + b"\r\n"


def random_message(rng: random.Random, size: int) -> bytes:
    pieces = [b"Subject: r\r\n\r\n"]
    total = 0
    while total < size:
        kind = rng.random()
        if kind < 0.2:
            line = b">" * rng.randint(0, 3) + b"From " + b"x" * rng.randint(0, 30)
        elif kind < 0.25:
            line = b"y" * rng.randint(CHUNK - 5, CHUNK + 5)  # a line end near a chunk edge
        else:
            line = b"z" * rng.randint(0, 120)
        end = rng.choice([b"\r\n", b"\r\n", b"\n", b"\r\n"])
        pieces.append(line + end)
        total += len(line) + len(end)
    return b"".join(pieces)


@pytest.mark.parametrize("seed", range(6))
def test_quote_and_read_back(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    original = random_message(rng, rng.choice([300, 3 * CHUNK]))
    stored = b"".join(quote_lines(io.BytesIO(original)))
    assert b"\r\n" not in stored
    assert all(not line.startswith(b"From ") for line in stored.split(b"\n"))
    path = tmp_path / "mbox"
    path.write_bytes(b"From x Thu Jan  1 00:00:00 2026\n" + stored + b"\n")
    [msg] = scan(path.read_bytes(), 0, path.stat().st_size, 0.0)
    with open_crlf(str(path), msg.body, msg.length, unquote_from=True) as f:
        back = f.read()
    assert back == crlf_view(original)
    assert msg.size == len(back)


def test_cr_at_chunk_edge_and_huge_line_without_newline(tmp_path: Path) -> None:
    data = b"a" * (CHUNK - 1) + b"\r\n" + b"b" * (MAX_CARRY + 10) + b"\r\n>From c\r\nend"
    stored = b"".join(quote_lines(io.BytesIO(data)))
    assert stored == data.replace(b"\r\n", b"\n").replace(b">From", b">>From") + b"\n"
    path = tmp_path / "f"
    path.write_bytes(stored)
    with open_crlf(str(path), 0, len(stored), unquote_from=True) as f:
        assert f.read() == crlf_view(data)
    assert crlf_size(str(path)) == len(crlf_view(stored))


def test_from_inside_a_line_is_not_quoted() -> None:
    data = b"Subject: x\r\n\r\nsay From here\r\nFrom start\r\n"
    assert b"".join(quote_lines(io.BytesIO(data))) == (
        b"Subject: x\n\nsay From here\n>From start\n"
    )


def test_messages_written_by_others_without_blank_line(tmp_path: Path) -> None:
    """A file whose last message lacks the separating blank line still gets a clean append."""
    path = tmp_path / "mbox"
    path.write_bytes(b"From a Thu Jan  1 00:00:00 2026\nSubject: one\n\nbody")
    store = make_store("mbox")
    user = User(name="u", mailbox=str(path), store_format="mbox")
    box = store.open(user).open_folder("INBOX")
    [first] = box.messages()
    store.deliver(user, io.BytesIO(b"Subject: two\r\n\r\nbody2\r\n"))
    box.refresh()
    infos = box.messages()
    assert [i.uid for i in infos] == [first.uid, first.uid + 1]
    with box.open_message(infos[1].uid) as f:
        assert f.read() == b"Subject: two\r\n\r\nbody2\r\n"


def test_uids_survive_another_program_rewriting_the_mbox(tmp_path: Path) -> None:
    """mutt-style: messages deleted, Status:/Content-Length: headers added, file rewritten."""
    import mailbox

    path = tmp_path / "mbox"
    store = make_store("mbox")
    user = User(name="u", mailbox=str(path), store_format="mbox")
    for i in range(4):
        store.deliver(user, io.BytesIO(b"Subject: m%d\r\n\r\nbody %d\r\n" % (i, i)))
    box = store.open(user).open_folder("INBOX")
    uids = [i.uid for i in box.messages()]
    box.set_flags(uids[3], ["\\Flagged", "work"])
    validity = box.uidvalidity

    other = mailbox.mbox(str(path))
    other.lock()
    keys = other.keys()
    other.remove(keys[1])
    msg = other[keys[2]]
    msg.set_flags("RO")
    msg["Content-Length"] = "7"
    other[keys[2]] = msg
    other.flush()
    other.unlock()

    assert box.refresh() == [uids[1]]
    assert box.uidvalidity == validity
    assert [i.uid for i in box.messages()] == [uids[0], uids[2], uids[3]]
    assert box.message(uids[3]).all_flags == {"\\Flagged", "work"}
    with box.open_message(uids[2]) as f:
        assert b"Subject: m2" in f.read()
    store.deliver(user, io.BytesIO(b"Subject: m4\r\n\r\nbody 4\r\n"))
    box.refresh()
    assert [i.uid for i in box.messages()] == [uids[0], uids[2], uids[3], uids[3] + 1]


def test_reordered_mbox_gets_a_new_uidvalidity(tmp_path: Path) -> None:
    path = tmp_path / "mbox"
    store = make_store("mbox")
    user = User(name="u", mailbox=str(path), store_format="mbox")
    for i in range(3):
        store.deliver(user, io.BytesIO(b"Subject: m%d\r\n\r\nbody %d\r\n" % (i, i)))
    box = store.open(user).open_folder("INBOX")
    validity = box.uidvalidity
    raw = path.read_bytes()
    parts = raw.split(b"\nFrom ")
    path.write_bytes(b"\nFrom ".join([parts[0], parts[2], parts[1].rstrip(b"\n") + b"\n"]))
    box.refresh()
    assert box.uidvalidity != validity
    assert [i.uid for i in box.messages()] == [1, 2, 3]
