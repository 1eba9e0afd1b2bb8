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

The file is only written under the ``dovecot-uidlist.lock`` dotlock, to a
temporary file that is fsynced and renamed over the old one.

Flag changes do not rewrite the uidlist: each one appends
``<uid> <modseq> <file name>`` to the folder's ``mailserv-modseq`` journal
(first line ``V<uidvalidity>``; a last line without its newline, torn by a
crash, is ignored), under the same dotlock and without fsync (Dovecot does
not fsync flag changes either).  Readers lay the journal over the uidlist
(an entry counts when its modseq is above the record's); whenever the
uidlist is rewritten (new UIDs, expunge, or the journal grown past
``JOURNAL_FOLD``) the entries are folded into it and the journal removed.
Dovecot ignores the journal and finds the renamed files by base name.

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
    out = [" ".join(head)]
    for rec in uidlist.records:
        ext = "".join(f" {k}{v}" for k, v in rec.ext.items())
        out.append(f"{rec.uid}{ext} M{rec.modseq} :{rec.filename}")
    return ("\n".join(out) + "\n").encode("utf-8", "surrogateescape")


def journal_header(uidvalidity: int) -> bytes:
    return f"V{uidvalidity}\n".encode()


def journal_record(uid: int, modseq: int, filename: str) -> bytes:
    return f"{uid} {modseq} {filename}\n".encode("utf-8", "surrogateescape")


def parse_journal(data: bytes | None, uidvalidity: int) -> dict[int, tuple[int, str]] | None:
    """uid → (modseq, file name) of the journal; None if it belongs to another UIDVALIDITY.

    The highest modseq of a uid wins; a torn or malformed line is skipped.
    """
    if not data:
        return {}
    lines = data.decode("utf-8", "surrogateescape").split("\n")
    lines.pop()  # after the last newline: empty, or a line torn by a crash
    if not lines or lines[0] != f"V{uidvalidity}":
        return None
    entries: dict[int, tuple[int, str]] = {}
    for line in lines[1:]:
        uid_text, _, rest = line.partition(" ")
        modseq_text, _, name = rest.partition(" ")
        if uid_text.isdigit() and modseq_text.isdigit() and name:
            uid, modseq = int(uid_text), int(modseq_text)
            if uid not in entries or entries[uid][0] < modseq:
                entries[uid] = (modseq, name)
    return entries


def apply_journal(uidlist: UidList, entries: dict[int, tuple[int, str]]) -> None:
    """Lay journal entries over the records (newer modseq wins) and the highest modseq."""
    for rec in uidlist.records:
        entry = entries.get(rec.uid)
        if entry is not None and entry[0] > rec.modseq and base_name(entry[1]) == rec.base:
            rec.modseq, rec.filename = entry
    top = max((m for m, _ in entries.values()), default=0)
    uidlist.highest_modseq = max(uidlist.highest_modseq, top)


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
