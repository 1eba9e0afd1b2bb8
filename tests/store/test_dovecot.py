"""Dovecot compatibility: dovecot-uidlist v3 / v1, dovecot-keywords, subscriptions.

The fixture tests/store/fixtures/dovecot-maildir was written by Dovecot 2.3.19
(three APPENDs, flags, a keyword per message, SUBSCRIBE Sent); note its header
says N3 although UID 3 is listed, as Dovecot writes it.  The integration test
hands a maildir we wrote to Dovecot's own imap binary (PREAUTH on stdin).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailserv.directory import User
from mailserv.store.maildir import MaildirStore
from mailserv.store.uidlist import (
    UidList,
    UidListError,
    UidRecord,
    parse_keywords,
    parse_uidlist,
    serialize_keywords,
    serialize_uidlist,
)
from tests.conftest import REQUIRE_INTEGRATION
from tests.store.helpers import config

FIXTURE = Path(__file__).parent / "fixtures" / "dovecot-maildir"
DOVECOT_IMAP = "/usr/lib/dovecot/imap"


def test_parse_dovecot_v3_header_and_records() -> None:
    data = (
        b"3 V1795601556 N3 Gf02df41093b4066bc501000083ecc375\n"
        b"1 :1795601555.M284438P453.vm,S=15,W=18\n"
        b"2 W18 S15 P1a2b :1795601555.M311249P453.vm,S=15,W=18:2,R\n"
        b"3 :1795601555.M317269P453.vm,S=15,W=18\n"
    )
    ul = parse_uidlist(data)
    assert ul.uidvalidity == 1795601556
    assert ul.nextuid == 4  # N3 is behind the records, as Dovecot leaves it
    assert ul.guid == "f02df41093b4066bc501000083ecc375"
    assert [r.uid for r in ul.records] == [1, 2, 3]
    assert ul.records[1].ext == {"W": "18", "S": "15", "P": "1a2b"}
    assert ul.records[1].base == "1795601555.M311249P453.vm,S=15,W=18"
    again = parse_uidlist(serialize_uidlist(ul))
    assert again.records[1].ext == {"W": "18", "S": "15", "P": "1a2b"}
    assert again.guid == ul.guid and again.uidvalidity == ul.uidvalidity


def test_parse_version_1_courier_form() -> None:
    ul = parse_uidlist(b"1 1234 7\n3 1.M1P1.host\n5 2.M1P1.host:2,S\n")
    assert (ul.uidvalidity, ul.nextuid) == (1234, 7)
    assert [(r.uid, r.filename) for r in ul.records] == [(3, "1.M1P1.host"), (5, "2.M1P1.host:2,S")]


@pytest.mark.parametrize(
    "bad",
    [b"", b"9 V1 N1\n", b"3 N5\n", b"3 V1 N5\n2 :a\n1 :b\n", b"3 V1 N5\nx :a\n", b"3 V1 N2\n1 a\n"],
)
def test_broken_uidlists_are_refused(bad: bytes) -> None:
    with pytest.raises(UidListError):
        parse_uidlist(bad)


def test_serialize_round_trip_with_modseq() -> None:
    ul = UidList(uidvalidity=42, nextuid=10, guid="ab" * 16, highest_modseq=9)
    ul.records = [UidRecord(3, "x:2,S", 4), UidRecord(9, "y", 9, {"W": "10"})]
    text = serialize_uidlist(ul)
    assert text == (b"3 V42 N10 G" + b"ab" * 16 + b" M9\n3 M4 :x:2,S\n9 W10 M9 :y\n")
    assert parse_uidlist(text) == ul


def test_keywords_file() -> None:
    slots = parse_keywords(b"0 $Label1\n1 work\n25 last\nbogus\n30 ignored\n")
    assert slots[0] == "$Label1" and slots[1] == "work" and slots[25] == "last"
    assert slots.count(None) == 23
    assert serialize_keywords(slots) == b"0 $Label1\n1 work\n25 last\n"


@pytest.fixture
def dovecot_maildir(tmp_path: Path) -> User:
    root = tmp_path / "Maildir"
    shutil.copytree(FIXTURE, root)
    return User(name="tester", mailbox=str(root))


def test_maildir_written_by_dovecot_keeps_its_uids(dovecot_maildir: User) -> None:
    store = MaildirStore(config())
    account = store.open(dovecot_maildir)
    box = account.open_folder("INBOX")
    assert box.uidvalidity == 1795601556
    infos = {i.uid: i for i in box.messages()}
    assert sorted(infos) == [1, 2, 3]
    assert infos[1].all_flags == {"\\Seen", "$Label1"}
    assert infos[2].all_flags == {"\\Answered"}
    assert infos[3].all_flags == {"\\Flagged", "work"}
    assert box.uidnext() == 4
    with box.open_message(2) as f:
        assert f.read() == b"Subject: b\r\n\r\nho\r\n"
    assert account.subscriptions() == ["Sent"]
    assert account.open_folder("Sent").uidvalidity == 1795601555
    # What we wrote back still parses and keeps Dovecot's mailbox GUID.
    text = (Path(dovecot_maildir.mailbox) / "dovecot-uidlist").read_bytes()
    assert text.startswith(b"3 V1795601556 N4 Gf02df41093b4066bc501000083ecc375 ")
    # A new message continues after Dovecot's UIDs; keywords reuse Dovecot's letters.
    store.deliver(dovecot_maildir, io.BytesIO(b"Subject: d\r\n\r\nnew\r\n"))
    box.refresh()
    assert [i.uid for i in box.messages()] == [1, 2, 3, 4]
    box.set_flags(4, ["work"])
    assert any(n.endswith(":2,b") for n in os.listdir(Path(dovecot_maildir.mailbox) / "cur"))


def _run_dovecot(home: Path, script: bytes) -> str:
    """Run Dovecot's imap binary in PREAUTH mode on ``home``/Maildir; returns its output."""
    if not os.path.exists(DOVECOT_IMAP):
        message = "Dovecot is not installed (Debian package dovecot-imapd)"
        if REQUIRE_INTEGRATION:
            pytest.fail(message)
        pytest.skip(message)
    conf = home / "dovecot.conf"
    run_as: list[str] = []
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:  # Dovecot refuses to give root mail access: run as nobody
        uid = gid = 65534
        run_as = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    user = "nobody" if run_as else os.environ.get("USER", "mailserv")
    conf.write_text(
        f"base_dir = {home}/run\nstate_dir = {home}/state\nlog_path = {home}/log\nssl = no\n"
        f"mail_location = maildir:{home}/Maildir\ndefault_internal_user = {user}\n"
        f"default_login_user = {user}\nfirst_valid_uid = 0\nfirst_valid_gid = 0\n"
        f"userdb {{\n driver = static\n args = uid={uid} gid={gid} home={home}\n}}\n"
        "passdb {\n driver = static\n args = nopassword=y\n}\n"
    )
    for sub in ("run", "state"):
        (home / sub).mkdir(exist_ok=True)
    if run_as:
        subprocess.run(["chown", "-R", f"{uid}:{gid}", str(home)], check=True)
        os.chmod(home, 0o755)
    env = {"USER": "tester", "HOME": str(home), "PATH": os.environ.get("PATH", "")}
    out = subprocess.run(
        [*run_as, DOVECOT_IMAP, "-c", str(conf)],
        input=script,
        capture_output=True,
        env=env,
        timeout=30,
        check=False,
    )
    return out.stdout.decode("utf-8", "replace") + out.stderr.decode("utf-8", "replace")


@pytest.fixture
def dovecot_home() -> Iterator[Path]:
    """A directory Dovecot's unprivileged user can reach (pytest's tmp_path is 0700)."""
    home = Path(tempfile.mkdtemp(prefix="mailserv-dovecot-"))
    os.chmod(home, 0o755)
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.mark.integration
def _our_maildir(home: Path, count: int) -> tuple[User, MaildirStore, Any]:
    """``count`` messages delivered by mailserv into ``home``/Maildir, and its INBOX."""
    user = User(name="tester", mailbox=str(home / "Maildir"))
    store = MaildirStore(config())
    for i in range(count):
        store.deliver(user, io.BytesIO(b"Subject: m%d\r\n\r\nbody\r\n" % i))
    return user, store, store.open(user).open_folder("INBOX")


def test_dovecot_reads_the_uids_we_wrote(dovecot_home: Path) -> None:
    home = dovecot_home
    user, store, box = _our_maildir(home, 4)
    box.set_flags(2, ["\\Seen", "$Label1"])
    box.set_flags(3, ["\\Flagged", "work"])
    box.expunge([1])
    store.deliver(user, io.BytesIO(b"Subject: late\r\n\r\nbody\r\n"))  # no UID yet
    store.open(user).subscribe("Sent")
    validity = box.uidvalidity
    out = _run_dovecot(
        home,
        b"a SELECT INBOX\r\nb UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n"
        b'c LSUB "" *\r\nd LOGOUT\r\n',
    )
    assert f"[UIDVALIDITY {validity}]" in out, out
    fetch_line = r"UID (\d+) FLAGS \(([^)]*)\) BODY\[[^\]]*\] \{\d+\}\r\nSubject: (\S+)"
    fetched = re.findall(fetch_line, out)
    assert [(int(u), set(f.split()) - {"\\Recent"}, s) for u, f, s in fetched] == [
        (2, {"\\Seen", "$Label1"}, "m1"),
        (3, {"\\Flagged", "work"}, "m2"),
        (4, set(), "m3"),
        (5, set(), "late"),
    ]
    assert "* LSUB () " in out and out.rstrip().count("Sent") >= 1
    # And back: Dovecot's additions are read with the same UIDs.
    again = MaildirStore(config()).open(user).open_folder("INBOX")
    assert [i.uid for i in again.messages()] == [2, 3, 4, 5]


def test_dovecot_reads_flags_changed_after_the_last_uidlist_write(dovecot_home: Path) -> None:
    """Flag changes only in our modseq journal: Dovecot finds the renamed files by base name."""
    home = dovecot_home
    user, _, box = _our_maildir(home, 3)
    box.set_flags(1, ["\\Seen"])
    box.set_flags(3, ["\\Flagged", "work"])
    assert (home / "Maildir" / "mailserv-modseq").exists()
    out = _run_dovecot(home, b"a SELECT INBOX\r\nb UID FETCH 1:* (FLAGS)\r\nd LOGOUT\r\n")
    assert f"[UIDVALIDITY {box.uidvalidity}]" in out, out
    fetched = re.findall(r"UID (\d+) FLAGS \(([^)]*)\)", out)
    assert [(int(u), set(f.split()) - {"\\Recent"}) for u, f in fetched] == [
        (1, {"\\Seen"}),
        (2, set()),
        (3, {"\\Flagged", "work"}),
    ]
    again = MaildirStore(config()).open(user).open_folder("INBOX")
    assert [(i.uid, i.all_flags) for i in again.messages()] == [
        (1, {"\\Seen"}),
        (2, set()),
        (3, {"\\Flagged", "work"}),
    ]


def test_dovecot_reads_appended_records_and_drops_expunged_ones(dovecot_home: Path) -> None:
    """Our uidlist as APPEND and EXPUNGE leave it: records appended, expunged ones still listed."""
    home = dovecot_home
    user, store, box = _our_maildir(home, 3)
    uidlist = home / "Maildir" / "dovecot-uidlist"
    first = uidlist.read_bytes()
    box.expunge([2])
    store.deliver(user, io.BytesIO(b"Subject: m3\r\n\r\nbody\r\n"))
    box.refresh()
    assert box.append(io.BytesIO(b"Subject: m4\r\n\r\nbody\r\n"), ["\\Seen"]) == 5
    data = uidlist.read_bytes()
    assert data.startswith(first) and b"\n2 " in data  # appended to; record 2 still there
    out = _run_dovecot(
        home,
        b"a SELECT INBOX\r\nb UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n"
        b"c LOGOUT\r\n",
    )
    assert f"[UIDVALIDITY {box.uidvalidity}]" in out and "[UIDNEXT 6]" in out, out
    fetch_line = r"UID (\d+) FLAGS \(([^)]*)\) BODY\[[^\]]*\] \{\d+\}\r\nSubject: (\S+)"
    fetched = re.findall(fetch_line, out)
    assert [(int(u), set(f.split()) - {"\\Recent"}, s) for u, f, s in fetched] == [
        (1, set(), "m0"),
        (3, set(), "m2"),
        (4, set(), "m3"),
        (5, {"\\Seen"}, "m4"),
    ]
    again = MaildirStore(config()).open(user).open_folder("INBOX")
    assert [i.uid for i in again.messages()] == [1, 3, 4, 5]
    assert again.expunged_since(0) == [2]
