"""Mail storage: maildir (Maildir++ with Dovecot's index files) and mbox.

Entry points used by the rest of mailserv:

- ``store_for(user, config) -> IMailStore``: the store for ``user.store_format``
  (``"maildir"`` or ``"mbox"``; an empty value falls back to ``config.format``).
- ``mailbox_path(template, localpart, domain, user, home=None)``: expands
  ``{domain} {localpart} {user} {home}`` in the ``[store] path`` template,
  refusing any value that could leave the mail root (``/``, ``..``, NUL...).

Store methods are synchronous and block on disk: callers on the reactor run
them in the ``disk`` pool (``service.threads.run("disk", store.deliver, ...)``).
They are safe across threads and processes.

Delivery: ``store.deliver(user, source, folder=None, prefix=b"") -> str``.
``source`` is a path or a binary file read from its start (rewound when
seekable); ``prefix`` (Return-Path:, Delivered-To: lines) is written before it.
A file object with ``crlf_only = True`` (``Message.open`` of an SMTP message, whose
bare CR and LF were refused) is taken to hold only CRLF line ends: the maildir store
then does not count line ends past its first write for the ``,W=`` size.
It returns once the message is durable (file and directory fsynced), and
raises ``QuotaExceeded(permanent=config.over_quota == "reject")`` when the
user's quota (``User.quota_bytes``/``quota_messages``, else ``[store] quota`` /
``quota_messages``; 0 = unlimited) would be exceeded.

Folder names are IMAP names (Unicode ``str``) with ``SEPARATOR`` ("/") between
levels; ``INBOX`` is case-insensitive and has no children.  A level may not
contain ``.`` (the Maildir++ separator on disk), ``*``, ``%`` or control
characters; bad names raise ``InvalidFolderName``.  On disk, levels are in
IMAP modified UTF-7 (RFC 3501 §5.1.3), as Dovecot writes them.

- maildir: ``user.mailbox`` is the Maildir++ root (INBOX); folder ``A/B`` is
  ``<root>/.A.B``.  See ``mailserv.store.maildir``.
- mbox: ``user.mailbox`` is the INBOX file; other folders live in the sibling
  directory ``<mailbox>.folders/`` as ``A.B.mbox``, and mailserv's own state
  (UID index, subscriptions, maildirsize) in ``<mailbox>.folders/.mailserv/``.
  See ``mailserv.store.mbox``.

Messages are described by ``MessageInfo``; the special-use folders (RFC 6154)
``Sent Drafts Trash Junk Archive`` are created when an account is opened
(``account.special_use()`` maps them to their roles).

Bytes and sizes: ``open_message`` always yields CRLF line ends and
``MessageInfo.size`` is that exact length (the RFC 822 size IMAP and POP3
report).  Maildir files are kept as written (mailserv writes what SMTP
spooled: CRLF); an LF file written by Dovecot, procmail or Python is read
through a CRLF view, its size taken from Dovecot's ``,W=`` field or counted
once.  mbox files hold LF lines (mboxrd) and are read back the same way.

For IMAP/POP3 (all on ``IMailbox``): ``uidvalidity``, ``uidnext()``,
``highest_modseq()``, ``messages()`` / ``message(uid)``, ``refresh()`` (returns
the UIDs that went away; new ones appear in ``messages()``),
``open_message(uid)``, ``set_flags(uid, flags)`` (system flags and keywords in
one iterable; raises ``ValueError`` for a malformed flag and
``TooManyKeywords`` when a maildir folder already uses 26 keywords),
``append(source, flags, internal_date)``, ``copy_to``/``move_to(uids, target)``
(UIDPLUS mapping), ``expunge(uids)``, ``expunged_since(modseq)`` (sorted UIDs
expunged with a higher modseq, for QRESYNC's VANISHED (EARLIER); a superset
when ``modseq`` is older than the bounded history).  ``\\Recent`` is not
stored (the IMAP server tracks it per process).  Every change bumps the
folder's highest modseq; an expunge bumps it too (one modseq per expunge
call, shared by its UIDs).
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mailserv.errors import InvalidFolderName, MailservError

if TYPE_CHECKING:
    from mailserv.config.sections import StoreSection
    from mailserv.directory import User
    from mailserv.envelope import Message
    from mailserv.interfaces import IMailStore

__all__ = [
    "SEPARATOR",
    "SPECIAL_USE",
    "SYSTEM_FLAGS",
    "MessageInfo",
    "TooManyKeywords",
    "decode_mutf7",
    "encode_mutf7",
    "mailbox_path",
    "split_folder_name",
    "store_for",
]

SEPARATOR = "/"

#: RFC 6154 roles of the folders every account gets.
SPECIAL_USE: dict[str, str] = {
    "Drafts": "\\Drafts",
    "Sent": "\\Sent",
    "Trash": "\\Trash",
    "Junk": "\\Junk",
    "Archive": "\\Archive",
}

#: IMAP system flags a store keeps (RFC 3501 §2.3.2; \Recent is per session).
SYSTEM_FLAGS = frozenset({"\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft"})

MAX_KEYWORD_LENGTH = 50  # LIMITS.md
MAX_KEYWORDS_PER_MESSAGE = 64  # LIMITS.md
MAX_NAME_BYTES = 255


class TooManyKeywords(MailservError):
    """The folder cannot hold another keyword (maildir: 26 per folder).  IMAP: NO [LIMIT]."""


class MessageInfo:
    """What IMAP and POP3 need to know about one message without reading it.

    ``flags`` holds the system flags (``\\Seen`` ...), ``keywords`` the IMAP
    keywords (``$Junk`` ...); ``size`` is the exact byte count
    ``open_message`` yields (CRLF line ends, the RFC 822 size); ``internal_date``
    is a POSIX timestamp (RFC 3501 §2.3.3), looked up on first use; ``modseq``
    is the RFC 7162 modification sequence; ``key`` is store-specific (maildir
    base file name, mbox byte offset).  Treat it as immutable.
    """

    __slots__ = ("_date", "flags", "key", "keywords", "modseq", "size", "uid")

    uid: int
    size: int
    flags: frozenset[str]
    keywords: frozenset[str]
    modseq: int
    key: str
    _date: float | Callable[[], float]

    def __init__(
        self,
        uid: int,
        size: int,
        flags: frozenset[str],
        keywords: frozenset[str],
        modseq: int,
        internal_date: float | Callable[[], float],
        key: str,
    ) -> None:
        self.uid = uid
        self.size = size
        self.flags = flags
        self.keywords = keywords
        self.modseq = modseq
        self._date = internal_date
        self.key = key

    @property
    def internal_date(self) -> float:
        date = self._date
        if callable(date):
            date = date()
            self._date = date
        return float(date)

    @property
    def all_flags(self) -> frozenset[str]:
        return self.flags | self.keywords

    def _fields(self) -> tuple[object, ...]:
        return (self.uid, self.size, self.flags, self.keywords, self.modseq, self.key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MessageInfo):
            return NotImplemented
        return self._fields() == other._fields() and self.internal_date == other.internal_date

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            f"MessageInfo(uid={self.uid}, size={self.size}, flags={set(self.flags)},"
            f" keywords={set(self.keywords)}, modseq={self.modseq}, key={self.key!r})"
        )


def split_flags(flags: object) -> tuple[frozenset[str], frozenset[str]]:
    """Split IMAP flags into (system flags, keywords); validates keywords (RFC 3501 §9 atom)."""
    system: set[str] = set()
    keywords: set[str] = set()
    for flag in flags:  # type: ignore[attr-defined]
        if not isinstance(flag, str):
            raise TypeError(f"flag must be str, not {type(flag).__name__}")
        if flag.startswith("\\"):
            canon = {f.lower(): f for f in SYSTEM_FLAGS}.get(flag.lower())
            if canon:
                system.add(canon)
            elif flag.lower() != "\\recent":
                raise ValueError(f"unknown system flag {flag!r}")
        else:
            if (
                not flag
                or len(flag) > MAX_KEYWORD_LENGTH
                or re.search(r'[\x00-\x20\x7f-\uffff(){%*"\\\]]', flag)
            ):
                raise ValueError(f"invalid keyword {flag!r}")
            keywords.add(flag)
    if len(keywords) > MAX_KEYWORDS_PER_MESSAGE:
        raise TooManyKeywords(f"more than {MAX_KEYWORDS_PER_MESSAGE} keywords on one message")
    return frozenset(system), frozenset(keywords)


# ---------------------------------------------------------------------------
# Folder names


def encode_mutf7(text: str) -> str:
    """IMAP modified UTF-7 (RFC 3501 §5.1.3)."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in text:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def decode_mutf7(text: str) -> str:
    """Inverse of ``encode_mutf7``; raises ValueError on malformed input."""

    def repl(m: re.Match[str]) -> str:
        body = m.group(1)
        if not body:
            return "&"
        b64 = body.replace(",", "/")
        b64 += "=" * (-len(b64) % 4)
        return base64.b64decode(b64, validate=True).decode("utf-16-be")

    return re.sub(r"&([A-Za-z0-9+,]*)-", repl, text)


def split_folder_name(name: str) -> tuple[str, ...]:
    """Validate an IMAP folder name; returns its levels (``("INBOX",)`` for INBOX).

    Raises InvalidFolderName for anything that could escape the store or
    that the on-disk layout cannot represent (LIMITS.md "mailbox name").
    """
    if not isinstance(name, str) or not name:
        raise InvalidFolderName("empty folder name")
    if name.upper() == "INBOX":
        return ("INBOX",)
    if name.startswith("~"):
        raise InvalidFolderName("folder name may not start with '~'")
    parts = tuple(name.split(SEPARATOR))
    if parts[0].upper() == "INBOX":
        raise InvalidFolderName("INBOX cannot have children")
    for part in parts:
        if not part:
            raise InvalidFolderName("empty level in folder name")
        if re.search(r"[\x00-\x1f\x7f.*%]", part):
            raise InvalidFolderName(f"invalid character in folder name {name!r}")
    if len(".".join(encode_mutf7(p) for p in parts).encode()) > MAX_NAME_BYTES - 10:
        raise InvalidFolderName("folder name too long")
    return parts


def folder_fs_name(parts: tuple[str, ...]) -> str:
    """``("A", "B")`` → ``"A.B"`` (modified UTF-7 levels joined by '.')."""
    return ".".join(encode_mutf7(p) for p in parts)


def folder_from_fs_name(fs_name: str) -> str | None:
    """``"A.B"`` → ``"A/B"``; None if the name is not one we could have written."""
    try:
        parts = tuple(decode_mutf7(p) for p in fs_name.split("."))
        if folder_fs_name(parts) != fs_name:
            return None  # not canonical modified UTF-7
        name = SEPARATOR.join(parts)
        if split_folder_name(name) != parts:
            return None
    except (ValueError, InvalidFolderName):
        return None
    return name


# ---------------------------------------------------------------------------
# Mailbox locations

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def _safe_component(value: str, what: str) -> str:
    if (
        not value
        or value in (".", "..")
        or "/" in value
        or "\\" in value
        or re.search(r"[\x00-\x1f\x7f]", value)
    ):
        raise InvalidFolderName(f"unsafe {what} for a mailbox path: {value!r}")
    return value


def mailbox_path(
    template: str,
    address_localpart: str,
    domain: str,
    user_name: str,
    home: str | None = None,
) -> str:
    """Expand a ``[store] path`` template safely.

    ``{localpart}``, ``{domain}`` and ``{user}`` must each be a single path
    level (no ``/``, no ``..``); ``{home}`` must be an absolute path without
    ``..``.  The result is normalised and may not contain ``..``.  Raises
    InvalidFolderName (a MailservError) for anything unsafe.
    """
    values = {
        "localpart": address_localpart,
        "domain": domain,
        "user": user_name,
    }

    def repl(m: re.Match[str]) -> str:
        key = m.group(1)
        if key == "home":
            if not home or not os.path.isabs(home) or ".." in home.split("/") or "\x00" in home:
                raise InvalidFolderName(f"unsafe home for a mailbox path: {home!r}")
            return home.rstrip("/") or "/"
        if key not in values:
            raise InvalidFolderName(f"unknown placeholder {{{key}}} in {template!r}")
        return _safe_component(values[key], key)

    expanded = _PLACEHOLDER.sub(repl, template)
    if ".." in expanded.split("/"):
        raise InvalidFolderName(f"mailbox path escapes its root: {expanded!r}")
    return os.path.normpath(expanded)


def store_for(user: User, config: StoreSection) -> IMailStore:
    """The IMailStore for ``user`` (``user.store_format``, else ``config.format``)."""
    fmt = (user.store_format or config.format).lower()
    if fmt == "maildir":
        from mailserv.store.maildir import MaildirStore

        return MaildirStore(config)
    if fmt == "mbox":
        from mailserv.store.mbox import MboxStore

        return MboxStore(config)
    raise ValueError(f"unknown store format {fmt!r}")


def deliver_message(
    store: Any,
    user: User,
    message: Message,
    folder: str | None,
    prefix: bytes,
    detail_to_folder: bool,
) -> str | None:
    """Deliver an accepted SMTP message into ``folder`` (None: INBOX); returns the folder used.

    A ``user+detail`` folder (``detail_to_folder``) that does not exist means INBOX; Junk
    (quarantine) is made when missing.  Blocking: the router runs it in a delivery helper
    process or in the ``disk`` pool.
    """
    chosen = folder
    if chosen is not None and chosen != "Junk" and detail_to_folder:
        try:
            if chosen not in store.open(user).list_folders():
                chosen = None
        except Exception:
            chosen = None
    with message.open() as source:
        store.deliver(user, source, chosen, prefix=prefix)
    return chosen
