"""FETCH attributes: parsing (RFC 3501 section 6.4.5) and response building (section 7.4.2)."""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass, field
from typing import Any

from mailserv.imap import message as mime
from mailserv.imap.parser import Atom, ParseError, Token

_BODY_RE = re.compile(
    r"^(BODY|BODY\.PEEK|BINARY|BINARY\.PEEK|BINARY\.SIZE)\[(.*)\](?:<(\d+)\.(\d+)>)?$", re.S
)
_SECTION_RE = re.compile(
    r"^(?P<path>\d+(?:\.\d+)*)?\.?(?P<spec>HEADER\.FIELDS\.NOT|HEADER\.FIELDS|HEADER|TEXT|MIME)?"
    r"(?:\s*\((?P<fields>[^()]*)\))?$",
    re.S | re.I,
)
_SIMPLE = {
    "ENVELOPE",
    "FLAGS",
    "INTERNALDATE",
    "RFC822",
    "RFC822.HEADER",
    "RFC822.SIZE",
    "RFC822.TEXT",
    "BODY",
    "BODYSTRUCTURE",
    "UID",
    "MODSEQ",
}
_MACROS = {
    "ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
    "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
    "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"],
}
_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


@dataclass
class Attr:
    """One requested FETCH item."""

    name: str  # ENVELOPE, FLAGS, ..., or BODY / BINARY for sections
    section: str = ""  # spec text for the response name
    path: list[int] = field(default_factory=list)
    spec: str = ""
    fields: list[str] = field(default_factory=list)
    partial: tuple[int, int] | None = None
    peek: bool = False
    sets_seen: bool = False
    is_section: bool = False

    @property
    def needs_data(self) -> bool:
        return self.name not in ("FLAGS", "UID", "INTERNALDATE", "MODSEQ", "RFC822.SIZE")

    @property
    def needs_parse(self) -> bool:
        if self.is_section:
            return bool(self.path or self.spec)
        return self.name in ("ENVELOPE", "BODY", "BODYSTRUCTURE", "RFC822.HEADER", "RFC822.TEXT")

    def response_name(self) -> bytes:
        if not self.is_section:
            return self.name.encode("ascii")
        out = f"{self.name}[{self.section}]"
        if self.partial is not None:
            out += f"<{self.partial[0]}>"
        return out.encode("ascii")


def parse_attrs(tok: Token) -> list[Attr]:
    """Parse the FETCH item (a macro, one item or a parenthesised list)."""
    items: list[Token]
    if isinstance(tok, Atom) and tok.upper() in _MACROS:
        return [Attr(name) for name in _MACROS[tok.upper()]]
    items = tok if isinstance(tok, list) else [tok]
    if not items:
        raise ParseError("empty FETCH item list")
    return [parse_attr(item) for item in items]


def parse_attr(item: Token) -> Attr:
    if not isinstance(item, Atom):
        raise ParseError("invalid FETCH item")
    text = str(item)
    upper = text.upper()
    if upper in _SIMPLE:
        attr = Attr(upper)
        if upper in ("RFC822", "RFC822.TEXT"):
            attr.sets_seen = True
        return attr
    m = _BODY_RE.match(text)
    if m is None:
        raise ParseError(f"unknown FETCH item {text[:40]!r}")
    kind = m.group(1).upper()
    section = m.group(2)
    if not section.isascii() or not section.isprintable():
        raise ParseError("section must be printable ASCII")
    sm = _SECTION_RE.match(section.strip())
    if sm is None:
        raise ParseError("invalid section")
    spec = (sm.group("spec") or "").upper()
    fields_text = sm.group("fields")
    if (fields_text is not None) != spec.startswith("HEADER.FIELDS"):
        raise ParseError("header field list only with HEADER.FIELDS")
    fields = fields_text.replace('"', " ").split() if fields_text is not None else []
    if spec.startswith("HEADER.FIELDS") and not fields:
        raise ParseError("empty header field list")
    path = [int(p) for p in sm.group("path").split(".")] if sm.group("path") else []
    if any(p == 0 for p in path):
        raise ParseError("section part number 0")
    if spec == "MIME" and not path:
        raise ParseError("MIME needs a part number")
    if kind.startswith("BINARY") and spec:
        raise ParseError("BINARY takes part numbers only")
    canon = ".".join(str(p) for p in path)
    if spec:
        canon = f"{canon}.{spec}" if canon else spec
    if fields:
        canon += " (" + " ".join(f.upper() for f in fields) + ")"
    partial = None
    if m.group(3) is not None:
        partial = (int(m.group(3)), int(m.group(4)))
        if partial[1] == 0:
            raise ParseError("partial length must be non-zero")
    peek = kind.endswith(".PEEK")
    name = kind.replace(".PEEK", "")
    return Attr(
        name=name,
        section=canon,
        path=path,
        spec=spec,
        fields=fields,
        partial=partial,
        peek=peek,
        sets_seen=not peek and name in ("BODY", "BINARY"),
        is_section=True,
    )


def format_internaldate(ts: float) -> bytes:
    """``"dd-Mon-yyyy hh:mm:ss +zzzz"`` in local time (RFC 3501 date-time)."""
    t = time.localtime(ts)
    offset = t.tm_gmtoff // 60
    sign = "+" if offset >= 0 else "-"
    offset = abs(offset)
    return (
        f'"{t.tm_mday:02d}-{_MONTHS[t.tm_mon - 1]}-{t.tm_year:04d} '
        f'{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {sign}{offset // 60:02d}{offset % 60:02d}"'
    ).encode("ascii")


def format_flags(flags: Any) -> bytes:
    return _format_flags(frozenset(flags))


@functools.lru_cache(maxsize=4096)
def _format_flags(flags: frozenset[str]) -> bytes:
    """Few distinct flag sets occur in a mailbox: FETCH 1:* (FLAGS) formats each once."""
    return b"(" + " ".join(sorted(flags)).encode("utf-8", "surrogateescape") + b")"


class UnknownCTE(Exception):
    """BINARY of a part whose Content-Transfer-Encoding we cannot decode (RFC 3516 4.3)."""


_IDENTITY_CTE = frozenset({b"", b"7bit", b"8bit", b"binary"})


def _decode_binary(part_data: bytes, encoding: bytes | None) -> bytes:
    import base64
    import quopri

    enc = (encoding or b"").strip().lower()
    if enc == b"base64":
        return base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", part_data) + b"==")
    if enc == b"quoted-printable":
        return quopri.decodestring(part_data)
    if enc not in _IDENTITY_CTE:
        raise UnknownCTE(enc.decode("ascii", "replace"))
    return part_data


def build_items(attrs: list[Attr], info: Any, data: bytes | None, cache: dict[str, Any]) -> bytes:
    """The parenthesised item list of one FETCH response (without FLAGS/UID/MODSEQ handling).

    ``cache`` holds the parsed MIME tree between items of the same message.
    """
    out: list[bytes] = []
    for attr in attrs:
        if attr.name in ("FLAGS", "UID", "MODSEQ"):
            continue  # added by the caller, which knows the session's view
        name = attr.response_name()
        value: bytes
        if attr.name == "INTERNALDATE":
            value = format_internaldate(info.internal_date)
        elif attr.name == "RFC822.SIZE":
            value = b"%d" % info.size
        else:
            assert data is not None
            if attr.needs_parse:
                if "tree" not in cache:
                    cache["tree"] = mime.parse(data)
                tree = cache["tree"]
            if attr.name == "ENVELOPE":
                value = mime.envelope(tree)
            elif attr.name == "BODYSTRUCTURE":
                value = mime.body_structure(data, tree, extended=True)
            elif attr.name == "BODY" and not attr.is_section:
                value = mime.body_structure(data, tree, extended=False)
            elif attr.name == "RFC822":
                value = mime.literal(data)
            elif attr.name == "RFC822.HEADER":
                value = mime.literal(data[: tree.body_start])
            elif attr.name == "RFC822.TEXT":
                value = mime.literal(data[tree.body_start :])
            else:
                value = _section_value(attr, data, cache)
        out.append(name + b" " + value)
    return b" ".join(out)


def _section_value(attr: Attr, data: bytes, cache: dict[str, Any]) -> bytes:
    if attr.path or attr.spec:
        if "tree" not in cache:
            cache["tree"] = mime.parse(data)
        tree = cache["tree"]
        try:
            content = mime.section_bytes(data, tree, attr.path, attr.spec, attr.fields)
        except mime.SectionError:
            content = b""
        if attr.name in ("BINARY", "BINARY.SIZE") and attr.path:
            part = mime.find_part(tree, attr.path)
            enc = part.header("Content-Transfer-Encoding") if part is not None else None
            content = _decode_binary(content, enc)
    else:
        content = data
    if attr.name == "BINARY.SIZE":
        return b"%d" % len(content)
    if attr.partial is not None:
        origin, count = attr.partial
        content = content[origin : origin + count]
    if attr.name == "BINARY" and b"\x00" in content:
        return b"~{%d}\r\n" % len(content) + content
    return mime.literal(content)
