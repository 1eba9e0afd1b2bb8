"""Dovecot's ``dovecot-uidlist`` (version 3) and ``dovecot-keywords`` files.

Format of dovecot-uidlist v3 (Dovecot src/lib-storage/index/maildir/maildir-uidlist.c)::

    3 V<uidvalidity> N<nextuid> G<mailbox guid> [<key><value> ...]
    <uid> [<key><value> ...] :<filename>

Dovecot's record keys are S (physical size), W (virtual size), G (GUID),
P (POP3 UIDL) and O (POP3 order); unknown keys are carried along.  mailserv
adds ``M<modseq>`` to each record and ``M<highest modseq>`` to the header
(RFC 7162 CONDSTORE); Dovecot keeps both untouched.  A record without ``M``
(added by Dovecot) is read with modseq 0 and gets the next modseq at the
next synchronisation.  Version 1 files
(``1 <uidvalidity> <nextuid>`` / ``<uid> <filename>``, Courier's
courierimapuiddb) are read too and rewritten as version 3.

The file is only written under the ``dovecot-uidlist.lock`` dotlock.  As
Dovecot does, new UIDs are *appended* to it (records at the end, fsynced; the
header's N and M then lag behind: readers take the next UID and the highest
modseq from the records too, and a last line without its newline, torn by a
crash, is ignored by readers and cut off by the next writer).  It is
rewritten whole (temporary file, fsync, rename) only when the header must
change or records must go: a new UIDVALIDITY, records Dovecot added without
a modseq, files renamed by other programs, and folding the journal.

Flag changes and expunges do not rewrite the uidlist: each one appends a
line to the folder's ``mailserv-modseq`` journal (first line
``V<uidvalidity>``), fsynced, under the same dotlock:

- ``<uid> <modseq> <file name>``: a flag change (the file was renamed);
- ``X<modseq> <uid-set>``: these UIDs were expunged with this modseq
  (``<uid-set>`` as in IMAP: ``3,5:9``); their uidlist records stay until the
  next rewrite, and Dovecot, which ignores the journal, drops them itself
  when it does not find their files;
- ``F<modseq>``: expunges with a modseq above this one are all recorded
  (older history was dropped to bound the file).

Readers lay the journal over the uidlist (a flag entry counts when its
modseq is above the record's; expunged UIDs are removed).  When the journal
grows past ``JOURNAL_FOLD`` the uidlist is rewritten with the entries folded
in and the journal rewritten with only the expunge history (at most
``EXPUNGE_HISTORY`` UIDs; QRESYNC's VANISHED (EARLIER), RFC 7162 §3.2.10).
Dovecot finds renamed files by base name.

dovecot-keywords maps keyword indexes 0..25 to the letters a..z of the
maildir info suffix: one ``<index> <keyword>`` line each.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

UIDLIST_NAME = "dovecot-uidlist"
KEYWORDS_NAME = "dovecot-keywords"
JOURNAL_NAME = "mailserv-modseq"
JOURNAL_FOLD = 64 * 1024  # bytes of journal before it is folded into the uidlist
EXPUNGE_HISTORY = 10_000  # expunged UIDs kept for QRESYNC after a fold
MAX_KEYWORDS = 26  # letters a..z of the maildir info suffix


class UidListError(ValueError):
    """A dovecot-uidlist that cannot be parsed."""


@dataclass
class UidRecord:
    """One message: its UID, the file name last seen, extension fields, modseq."""

    uid: int
    filename: str
    modseq: int = 0  # 0 until mailserv gives it one (records written by Dovecot)
    ext: dict[str, str] = field(default_factory=dict)
    #: the file name without its info suffix; a record only ever changes its flags
    base: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.base = self.filename.split(":", 1)[0]


@dataclass
class UidList:
    """The whole uidlist of one folder, records in ascending UID order."""

    uidvalidity: int
    nextuid: int = 1
    guid: str = field(default_factory=lambda: uuid.uuid4().hex)
    highest_modseq: int = 1
    header_ext: dict[str, str] = field(default_factory=dict)
    records: list[UidRecord] = field(default_factory=list)
    #: expunges laid over from the journal: (modseq, UIDs), oldest first
    expunged: list[tuple[int, list[int]]] = field(default_factory=list, compare=False)
    #: expunges with a modseq above this are all in ``expunged``: the header's M
    #: when read from a file (older expunges rewrote it), or the journal's F line
    history_floor: int = field(default=0, compare=False)
    #: records still in the file whose UIDs the journal says are expunged
    dead: int = field(default=0, compare=False)


def base_name(filename: str) -> str:
    """A maildir file name without its ``:2,<flags>`` info suffix."""
    return filename.split(":", 1)[0]


def _int(text: str, what: str) -> int:
    if not text.isdigit():
        raise UidListError(f"bad {what}: {text!r}")
    return int(text)


def parse_uidlist(data: bytes) -> UidList:
    """Parse a dovecot-uidlist (version 3 or 1)."""
    lines = data.decode("utf-8", "surrogateescape").split("\n")
    if not lines or not lines[0]:
        raise UidListError("empty uidlist")
    head = lines[0].split(" ")
    if head[0] == "1":
        if len(head) < 3:
            raise UidListError("bad version 1 header")
        result = UidList(uidvalidity=_int(head[1], "uidvalidity"), nextuid=_int(head[2], "nextuid"))
        for line in lines[1:]:
            if not line:
                continue
            uid_text, _, name = line.partition(" ")
            result.records.append(UidRecord(_int(uid_text, "uid"), name))
        result.records.sort(key=lambda r: r.uid)
        return result
    if head[0] != "3":
        raise UidListError(f"unsupported uidlist version {head[0]!r}")
    fields: dict[str, str] = {}
    for item in head[1:]:
        if item:
            fields[item[0]] = item[1:]
    if "V" not in fields or "N" not in fields:
        raise UidListError("header lacks V or N")
    result = UidList(
        uidvalidity=_int(fields.pop("V"), "uidvalidity"),
        nextuid=_int(fields.pop("N"), "nextuid"),
        guid=fields.pop("G", "") or uuid.uuid4().hex,
        highest_modseq=_int(fields.pop("M", "1"), "modseq"),
        header_ext=fields,
    )
    last_uid = 0
    lines.pop()  # after the last newline: empty, or a record torn by a crash
    for line in lines[1:]:
        if not line:
            continue
        meta, sep, name = line.partition(":")
        if not sep:
            raise UidListError(f"record without file name: {line!r}")
        parts = meta.split()
        uid = _int(parts[0], "uid") if parts else 0
        if uid <= last_uid:
            raise UidListError(f"UIDs out of order at {uid}")
        last_uid = uid
        ext = {p[0]: p[1:] for p in parts[1:]}
        modseq = _int(ext.pop("M", "0"), "modseq")  # 0: not yet given one
        result.records.append(UidRecord(uid, name, modseq, ext))
    if result.records and result.nextuid <= result.records[-1].uid:
        result.nextuid = result.records[-1].uid + 1
    result.history_floor = result.highest_modseq
    top = max((r.modseq for r in result.records), default=0)  # records appended since
    result.highest_modseq = max(result.highest_modseq, top)
    return result


def serialize_uidlist(uidlist: UidList) -> bytes:
    """Render a uidlist in version 3 form."""
    head = [
        "3",
        f"V{uidlist.uidvalidity}",
        f"N{uidlist.nextuid}",
        f"G{uidlist.guid}",
        f"M{uidlist.highest_modseq}",
    ]
    head += [f"{k}{v}" for k, v in uidlist.header_ext.items()]
    return (" ".join(head) + "\n").encode() + serialize_records(uidlist.records)


def serialize_records(records: list[UidRecord]) -> bytes:
    """Record lines, as appended to a uidlist."""
    out = []
    for rec in records:
        ext = "".join(f" {k}{v}" for k, v in rec.ext.items())
        out.append(f"{rec.uid}{ext} M{rec.modseq} :{rec.filename}\n")
    return "".join(out).encode("utf-8", "surrogateescape")


def journal_header(uidvalidity: int, floor: int | None = None) -> bytes:
    return f"V{uidvalidity}\n".encode() + (f"F{floor}\n".encode() if floor is not None else b"")


def journal_record(uid: int, modseq: int, filename: str) -> bytes:
    return f"{uid} {modseq} {filename}\n".encode("utf-8", "surrogateescape")


def journal_expunge(modseq: int, uids: list[int]) -> bytes:
    return f"X{modseq} {uid_set(uids)}\n".encode()


def uid_set(uids: list[int]) -> str:
    """``[1, 2, 3, 7]`` → ``"1:3,7"`` (sorted, ranges collapsed)."""
    parts: list[str] = []
    ordered = sorted(set(uids))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}:{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def parse_uid_set(text: str) -> list[int] | None:
    """Inverse of ``uid_set``; None if malformed."""
    uids: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition(":")
        if not low.isdigit() or (high and not high.isdigit()):
            return None
        first, last = int(low), int(high or low)
        if last < first or last - first > 1 << 24:
            return None
        uids.extend(range(first, last + 1))
    return uids


@dataclass
class Journal:
    """What a ``mailserv-modseq`` journal holds."""

    #: uid → (modseq, file name) of the latest flag change
    entries: dict[int, tuple[int, str]] = field(default_factory=dict)
    #: (modseq, UIDs) of each expunge, in file order
    expunged: list[tuple[int, list[int]]] = field(default_factory=list)
    floor: int | None = None


def parse_journal(data: bytes | None, uidvalidity: int) -> Journal | None:
    """The journal's content; None if it belongs to another UIDVALIDITY.

    The highest modseq of a uid wins; a torn or malformed line is skipped.
    """
    journal = Journal()
    if not data:
        return journal
    lines = data.decode("utf-8", "surrogateescape").split("\n")
    lines.pop()  # after the last newline: empty, or a line torn by a crash
    if not lines or lines[0] != f"V{uidvalidity}":
        return None
    entries = journal.entries
    for line in lines[1:]:
        if line[:1] == "X":
            modseq_text, _, set_text = line[1:].partition(" ")
            uids = parse_uid_set(set_text)
            if modseq_text.isdigit() and uids:
                journal.expunged.append((int(modseq_text), uids))
            continue
        if line[:1] == "F":
            if line[1:].isdigit():
                journal.floor = int(line[1:])
            continue
        uid_text, _, rest = line.partition(" ")
        modseq_text, _, name = rest.partition(" ")
        if uid_text.isdigit() and modseq_text.isdigit() and name:
            uid, modseq = int(uid_text), int(modseq_text)
            if uid not in entries or entries[uid][0] < modseq:
                entries[uid] = (modseq, name)
    return journal


def apply_journal(uidlist: UidList, journal: Journal) -> None:
    """Lay a journal over the records (newer modseq wins, expunged UIDs go) and the modseq."""
    entries = journal.entries
    gone = {uid for _, uids in journal.expunged for uid in uids}
    if gone:
        before = len(uidlist.records)
        uidlist.records = [r for r in uidlist.records if r.uid not in gone]
        uidlist.dead = before - len(uidlist.records)
    for rec in uidlist.records:
        entry = entries.get(rec.uid)
        if entry is not None and entry[0] > rec.modseq and base_name(entry[1]) == rec.base:
            rec.modseq, rec.filename = entry
    top = max((m for m, _ in entries.values()), default=0)
    top = max([top] + [m for m, _ in journal.expunged])
    uidlist.highest_modseq = max(uidlist.highest_modseq, top)
    uidlist.expunged = list(journal.expunged)
    if journal.floor is not None:
        uidlist.history_floor = journal.floor


_KEYWORD_LINE = re.compile(r"^(\d+) (\S+)$")


def parse_keywords(data: bytes | None) -> list[str | None]:
    """Parse dovecot-keywords into 26 slots (index → keyword or None)."""
    slots: list[str | None] = [None] * MAX_KEYWORDS
    if not data:
        return slots
    for line in data.decode("utf-8", "replace").splitlines():
        m = _KEYWORD_LINE.match(line.strip())
        if m and int(m.group(1)) < MAX_KEYWORDS:
            slots[int(m.group(1))] = m.group(2)
    return slots


def serialize_keywords(slots: list[str | None]) -> bytes:
    return "".join(f"{i} {kw}\n" for i, kw in enumerate(slots) if kw).encode()
