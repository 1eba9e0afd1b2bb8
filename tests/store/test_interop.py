"""Other mail software reads what we write, and we read what it writes.

Python's ``mailbox`` module (Maildir and mbox) both ways, and mutt (driven in
a pseudo-terminal with ``script``) piping every message of our mbox and our
maildir out.
"""

from __future__ import annotations

import io
import mailbox
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from mailserv.directory import User
from tests.store.helpers import checked_message, make_store, verify_message

PREFIX = b"Return-Path: <sender@example.test>\r\nDelivered-To: alice@example.test\r\n"
FROMS = b"Subject: froms\r\nX-Tag: froms\r\n\r\nFrom here\r\n>From there\r\n"


def fill(fmt: str, mailbox_path: str) -> tuple[Any, User]:
    store = make_store(fmt)
    user = User(name="alice", mailbox=mailbox_path, store_format=fmt)
    for i in range(3):
        store.deliver(user, io.BytesIO(checked_message(f"m{i}", 500 + i)), prefix=PREFIX)
    store.deliver(user, io.BytesIO(FROMS))
    return store, user


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def test_python_maildir_reads_our_maildir(tmp_path: Path) -> None:
    store, user = fill("maildir", str(tmp_path / "Maildir"))
    box = store.open(user).open_folder("INBOX")
    uids = [i.uid for i in box.messages()]
    box.set_flags(uids[0], ["\\Seen", "\\Flagged"])
    box.set_flags(uids[1], ["\\Answered", "\\Deleted", "\\Draft"])
    theirs = mailbox.Maildir(user.mailbox, factory=None, create=False)
    by_tag = {theirs.get_message(k)["X-Tag"]: k for k in theirs.keys()}
    assert len(by_tag) == 4
    assert theirs.get_message(by_tag["m0"]).get_flags() == "FS"
    assert theirs.get_message(by_tag["m1"]).get_flags() == "DRT"
    assert theirs.get_message(by_tag["m0"]).get_subdir() == "cur"
    for uid in uids:
        with box.open_message(uid) as f:
            data = f.read()
        tag = data.split(b"X-Tag: ", 1)[1].split(b"\r\n", 1)[0].decode()
        assert lf(theirs.get_bytes(by_tag[tag])) == lf(data)
    assert set(theirs.list_folders()) >= {"Sent", "Drafts", "Trash", "Junk", "Archive"}


def test_python_mbox_reads_our_mbox(tmp_path: Path) -> None:
    _store, user = fill("mbox", str(tmp_path / "mbox"))
    theirs = mailbox.mbox(user.mailbox, create=False)
    got = list(theirs)
    assert [m["X-Tag"] for m in got] == ["m0", "m1", "m2", "froms"]
    assert got[0].get_from().startswith("sender@example.test ")
    for m in got[:3]:
        verify_message(m.as_bytes())
    # Python does not undo mboxrd quoting: the quoted lines are there, one more '>' each.
    assert got[3].get_payload() == ">From here\n>>From there\n"


def test_we_read_what_python_writes(tmp_path: Path) -> None:
    md = mailbox.Maildir(str(tmp_path / "Maildir"), create=True)
    msg = mailbox.MaildirMessage(checked_message("py-maildir").replace(b"\r\n", b"\n"))
    msg.set_flags("RS")
    msg.set_subdir("cur")
    md.add(msg)
    md.add(checked_message("py-new").replace(b"\r\n", b"\n"))
    store = make_store("maildir")
    box = store.open(User(name="a", mailbox=str(tmp_path / "Maildir"))).open_folder("INBOX")
    infos = box.messages()
    assert len(infos) == 2
    tags = {}
    for info in infos:
        with box.open_message(info.uid) as f:
            data = f.read()
        assert len(data) == info.size  # CRLF view of an LF file, with its CRLF size
        tags[verify_message(data)] = info
    assert tags["py-maildir"].flags == {"\\Answered", "\\Seen"}
    assert tags["py-new"].flags == frozenset()

    mb = mailbox.mbox(str(tmp_path / "mbox"), create=True)
    mb.lock()
    mb.add(checked_message("py-mbox").replace(b"\r\n", b"\n"))
    m2 = mailbox.mboxMessage(FROMS.replace(b"\r\n", b"\n"))
    m2.set_flags("RF")
    mb.add(m2)
    mb.flush()
    mb.unlock()
    mbox_store = make_store("mbox")
    mbox_user = User(name="a", mailbox=str(tmp_path / "mbox"), store_format="mbox")
    inbox = mbox_store.open(mbox_user).open_folder("INBOX")
    first, second = inbox.messages()
    with inbox.open_message(first.uid) as f:
        assert verify_message(f.read()) == "py-mbox"
    assert second.flags == {"\\Seen", "\\Flagged"}  # from Status: / X-Status:
    # A delivery after Python's still gets the next UID.
    mbox_store.deliver(mbox_user, io.BytesIO(checked_message("ours")))
    inbox.refresh()
    assert [i.uid for i in inbox.messages()] == [first.uid, second.uid, second.uid + 1]


MUTTRC = """\
set mbox_type=mbox
set quit=yes
set move=no
set mark_old=no
set confirmcreate=no
set confirmappend=no
set sort=mailbox-order
set pipe_split=yes
set pipe_decode=no
set wait_key=no
set pipe_sep="\\n=====MUTT-SEPARATOR=====\\n"
"""


def mutt_messages(require_program: Any, folder: str) -> list[bytes]:
    """Every message of ``folder`` as mutt pipes it out (run in a pty by script(1))."""
    mutt = require_program("mutt")
    script = require_program("script")
    # A plain path: mutt's command line and push strings do not like pytest's "[param]" names.
    workdir = Path(tempfile.mkdtemp(prefix="mailserv-mutt-"))
    (workdir / "Mail").mkdir()  # else mutt first asks whether to create ~/Mail
    rc = workdir / "muttrc"
    rc.write_text(MUTTRC)
    out = workdir / "piped"
    if out.exists():
        out.unlink()
    push = f"<tag-pattern>~A<enter><tag-prefix><pipe-message>cat >> {out}<enter><quit>"
    command = f"{mutt} -n -F {rc} -f {folder} -e 'push \"{push}\"'"
    subprocess.run(
        [script, "-qec", command, "/dev/null"],
        env={**os.environ, "TERM": "xterm", "HOME": str(workdir)},
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        timeout=30,
        check=True,
    )
    try:
        parts = out.read_bytes().split(b"\n=====MUTT-SEPARATOR=====\n")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return [p for p in parts if p.strip()]


@pytest.mark.integration
@pytest.mark.parametrize("fmt", ["mbox", "maildir"])
def test_mutt_sees_the_same_messages(fmt: str, tmp_path: Path, require_program: Any) -> None:
    path = str(tmp_path / ("mbox" if fmt == "mbox" else "Maildir"))
    store, user = fill(fmt, path)
    box = store.open(user).open_folder("INBOX")
    ours = {}
    for info in box.messages():
        with box.open_message(info.uid) as f:
            data = f.read()
        if b"X-Check" in data:
            ours[verify_message(data)] = lf(data)
    piped = mutt_messages(require_program, path)
    assert len(piped) == len(box.messages()) == 4
    seen = {}
    for data in piped:
        if data.startswith(b"From "):  # mbox: mutt pipes the raw stored form
            data = data.split(b"\n", 1)[1]
        if b"X-Check" in data:
            seen[verify_message(data)] = lf(data).rstrip(b"\n") + b"\n"
    assert seen.keys() == ours.keys() == {"m0", "m1", "m2"}
    for tag, data in ours.items():
        assert seen[tag] == data
