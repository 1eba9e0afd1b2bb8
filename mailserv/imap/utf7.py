"""Modified UTF-7 mailbox names (RFC 3501 section 5.1.3) and mailbox-name safety."""

from __future__ import annotations

import base64

from mailserv.errors import InvalidFolderName

MAX_NAME_LENGTH = 255
MAX_NAME_DEPTH = 16


def _b64_encode(chunk: str) -> str:
    raw = chunk.encode("utf-16-be")
    return base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",")


def encode(name: str) -> str:
    """Encode a Unicode mailbox name in modified UTF-7."""
    out: list[str] = []
    pending: list[str] = []
    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            if pending:
                out.append("&" + _b64_encode("".join(pending)) + "-")
                pending = []
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    if pending:
        out.append("&" + _b64_encode("".join(pending)) + "-")
    return "".join(out)


def decode(wire: str) -> str:
    """Decode a modified UTF-7 name strictly; raise InvalidFolderName on malformed input."""
    out: list[str] = []
    i = 0
    n = len(wire)
    while i < n:
        ch = wire[i]
        if ord(ch) < 0x20 or ord(ch) > 0x7E:
            raise InvalidFolderName("mailbox name is not 7-bit (modified UTF-7 expected)")
        if ch != "&":
            out.append(ch)
            i += 1
            continue
        end = wire.find("-", i + 1)
        if end < 0:
            raise InvalidFolderName("unterminated modified UTF-7 sequence")
        chunk = wire[i + 1 : end]
        i = end + 1
        if not chunk:
            out.append("&")
            continue
        padded = chunk.replace(",", "/")
        padded += "=" * (-len(padded) % 4)
        try:
            raw = base64.b64decode(padded, validate=True)
            text = raw.decode("utf-16-be")
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidFolderName("malformed modified UTF-7 sequence") from exc
        if any(0x20 <= ord(c) <= 0x7E for c in text) or _b64_encode(text) != chunk:
            raise InvalidFolderName("non-canonical modified UTF-7 sequence")
        out.append(text)
    return "".join(out)


def check_name(name: str, delimiter: str) -> str:
    """Refuse names that could leave the user's store (LIMITS.md, mailbox name).

    Returns the name with INBOX normalised to upper case (RFC 3501 section 5.1).
    """
    if not name:
        raise InvalidFolderName("empty mailbox name")
    if len(name.encode("utf-8")) > MAX_NAME_LENGTH:
        raise InvalidFolderName("mailbox name too long")
    if any(ord(c) < 0x20 or ord(c) == 0x7F or 0x80 <= ord(c) < 0xA0 for c in name):
        raise InvalidFolderName("control character in mailbox name")
    if name[0] in "/~" or "\\" in name:
        raise InvalidFolderName("mailbox name may not start with / or ~")
    parts = name.split(delimiter)
    if len(parts) > MAX_NAME_DEPTH:
        raise InvalidFolderName("mailbox hierarchy too deep")
    for part in parts:
        if not part or part[0] in ".~":
            raise InvalidFolderName("empty component, or one starting with '.' or '~'")
        if "/" in part:
            raise InvalidFolderName("'/' in a mailbox name component")
    if parts[0].upper() == "INBOX":
        parts[0] = "INBOX"
    return delimiter.join(parts)
