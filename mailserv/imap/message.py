"""MIME structure of a message: sections, BODYSTRUCTURE, ENVELOPE (RFC 3501 section 7.4.2).

Offsets are computed on the raw bytes so that ``BODY[1.2]<0.100>`` returns
exactly those octets of the stored message.  Nesting is bounded (LIMITS.md:
MIME nesting 100, parts 10 000): deeper parts are treated as opaque leaves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.utils import getaddresses

MAX_DEPTH = 100
MAX_PARTS = 10000

_HEADER_END_RE = re.compile(rb"\r?\n\r?\n")
_PARAM_RE = re.compile(
    r';\s*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)', re.DOTALL
)


@dataclass
class Part:
    """One MIME entity: raw offsets into the message and its parsed headers."""

    start: int
    body_start: int
    end: int
    headers: list[tuple[str, bytes]]
    maintype: str = "text"
    subtype: str = "plain"
    params: list[tuple[str, str]] = field(default_factory=list)
    children: list[Part] = field(default_factory=list)
    message: Part | None = None

    def header(self, name: str) -> bytes | None:
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None


def _unfold(value: bytes) -> bytes:
    return re.sub(rb"\r?\n(?=[ \t])", b"", value).strip()


def parse_headers(raw: bytes) -> list[tuple[str, bytes]]:
    """Split a header block into (name, unfolded value) pairs."""
    headers: list[tuple[str, bytes]] = []
    name: str | None = None
    value: list[bytes] = []
    for line in raw.splitlines():
        if line[:1] in (b" ", b"\t") and name is not None:
            value.append(line)
            continue
        if name is not None:
            headers.append((name, _unfold(b"\r\n".join(value))))
        key, sep, rest = line.partition(b":")
        if sep and key and b" " not in key.strip():
            name = key.strip().decode("latin-1")
            value = [rest]
        else:
            name = None
    if name is not None:
        headers.append((name, _unfold(b"\r\n".join(value))))
    return headers


def _content_type(value: bytes | None, default: tuple[str, str]) -> tuple[str, str, list]:
    if not value:
        return default[0], default[1], [("charset", "us-ascii")] if default[0] == "text" else []
    text = value.decode("latin-1")
    main, _, rest = text.partition(";")
    maintype, _, subtype = main.strip().partition("/")
    if not maintype or not subtype:
        return "text", "plain", [("charset", "us-ascii")]
    return maintype.strip().lower(), subtype.strip().lower(), _params(";" + rest)


def _params(text: str) -> list[tuple[str, str]]:
    out = []
    for m in _PARAM_RE.finditer(text):
        v = m.group(2)
        if v.startswith('"') and v.endswith('"') and len(v) >= 2:
            v = re.sub(r"\\(.)", r"\1", v[1:-1])
        out.append((m.group(1).lower(), v))
    return out


def parse(data: bytes) -> Part:
    """Parse a whole message."""
    counter = [0]
    return _parse_part(data, 0, len(data), ("text", "plain"), 0, counter)


def _parse_part(
    data: bytes, start: int, end: int, default: tuple[str, str], depth: int, counter: list[int]
) -> Part:
    counter[0] += 1
    m = _HEADER_END_RE.search(data, start, end)
    if data.startswith(b"\r\n", start) or data.startswith(b"\n", start):
        header_end = start
        body_start = start + (2 if data.startswith(b"\r\n", start) else 1)
    elif m is None:
        header_end = body_start = end
    else:
        header_end = m.start()
        body_start = m.end()
    headers = parse_headers(data[start:header_end])
    part = Part(start, body_start, end, headers)
    for key, value in headers:
        if key.lower() == "content-type":
            part.maintype, part.subtype, part.params = _content_type(value, default)
            break
    else:
        part.maintype, part.subtype, part.params = _content_type(None, default)
    if depth >= MAX_DEPTH or counter[0] >= MAX_PARTS:
        return part
    if part.maintype == "multipart":
        boundary = dict(part.params).get("boundary")
        if boundary:
            child_default = ("message", "rfc822") if part.subtype == "digest" else ("text", "plain")
            for cstart, cend in _split_multipart(data, body_start, end, boundary.encode("latin-1")):
                if counter[0] >= MAX_PARTS:
                    break
                part.children.append(
                    _parse_part(data, cstart, cend, child_default, depth + 1, counter)
                )
    elif part.maintype == "message" and part.subtype in ("rfc822", "global"):
        part.message = _parse_part(data, body_start, end, ("text", "plain"), depth + 1, counter)
    return part


def _split_multipart(data: bytes, start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
    """Offsets of the body parts between ``--boundary`` lines (RFC 2046 section 5.1.1)."""
    delim = b"--" + boundary
    spans: list[tuple[int, int]] = []
    pos = start
    part_start: int | None = None
    while pos < end:
        idx = data.find(delim, pos, end)
        if idx < 0:
            break
        at_line_start = idx == start or data[idx - 1 : idx] == b"\n"
        if not at_line_start:
            pos = idx + len(delim)
            continue
        line_end = data.find(b"\n", idx, end)
        line_end = end if line_end < 0 else line_end + 1
        closing = data.startswith(b"--", idx + len(delim))
        if part_start is not None:
            # the CRLF before the delimiter belongs to the delimiter
            stop = idx
            if stop > part_start and data[stop - 1 : stop] == b"\n":
                stop -= 1
                if stop > part_start and data[stop - 1 : stop] == b"\r":
                    stop -= 1
            spans.append((part_start, max(stop, part_start)))
        if closing:
            return spans
        part_start = line_end
        pos = line_end
    if part_start is not None and part_start < end:
        spans.append((part_start, end))
    return spans


# --------------------------------------------------------------------------
# Sections (RFC 3501 section 6.4.5)


class SectionError(Exception):
    """A section specifier that is malformed."""


def find_part(root: Part, path: list[int]) -> Part | None:
    """The part addressed by ``1.2.3``; None when it does not exist."""
    part = root
    for number in path:
        if part.message is not None and part is not root:
            part = part.message
        if part.children:
            if number < 1 or number > len(part.children):
                return None
            part = part.children[number - 1]
        elif number == 1 and part.maintype != "multipart":
            continue
        else:
            return None
    return part


def section_bytes(data: bytes, root: Part, path: list[int], spec: str, fields: list[str]) -> bytes:
    """The octets of BODY[path.spec (fields)] (empty when the part does not exist)."""
    part = find_part(root, path) if path else root
    if part is None:
        return b""
    if not spec:
        if not path:
            return data
        return data[part.body_start : part.end]
    if spec == "MIME":
        if not path:
            raise SectionError("MIME needs a part number")
        return data[part.start : part.body_start]
    target = part
    if path:
        if part.message is None:
            return b""
        target = part.message
    if spec == "TEXT":
        return data[target.body_start : target.end]
    header_block = data[target.start : target.body_start]
    if spec == "HEADER":
        return header_block
    wanted = {f.lower() for f in fields}
    keep_matching = spec == "HEADER.FIELDS"
    out = []
    for name, raw in _raw_header_lines(header_block):
        if (name.lower() in wanted) == keep_matching:
            out.append(raw)
    return b"".join(out) + b"\r\n"


def _raw_header_lines(block: bytes) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for line in block.splitlines(keepends=True):
        if not line.strip():
            continue
        if line[:1] in (b" ", b"\t") and out:
            out[-1] = (out[-1][0], out[-1][1] + _crlf(line))
            continue
        name = line.partition(b":")[0].strip().decode("latin-1")
        out.append((name, _crlf(line)))
    return out


def _crlf(line: bytes) -> bytes:
    return line.rstrip(b"\r\n") + b"\r\n"


# --------------------------------------------------------------------------
# Response encoding


def nstring(value: bytes | str | None) -> bytes:
    """NIL, a quoted string, or a literal when quoting is not possible."""
    if value is None:
        return b"NIL"
    if isinstance(value, str):
        value = value.encode("utf-8")
    if len(value) < 1024 and not re.search(rb"[\x00\r\n\x80-\xff]", value):
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(value) + value


def literal(value: bytes) -> bytes:
    return b"{%d}\r\n" % len(value) + value


def _plist(params: list[tuple[str, str]]) -> bytes:
    if not params:
        return b"NIL"
    return b"(" + b" ".join(nstring(k.upper()) + b" " + nstring(v) for k, v in params) + b")"


def _disposition(part: Part) -> bytes:
    value = part.header("Content-Disposition")
    if not value:
        return b"NIL"
    text = value.decode("latin-1")
    kind, _, rest = text.partition(";")
    return b"(" + nstring(kind.strip()) + b" " + _plist(_params(";" + rest)) + b")"


def _language(part: Part) -> bytes:
    value = part.header("Content-Language")
    if not value:
        return b"NIL"
    tags = [t.strip() for t in value.decode("latin-1").split(",") if t.strip()]
    if not tags:
        return b"NIL"
    return b"(" + b" ".join(nstring(t) for t in tags) + b")"


def body_structure(data: bytes, part: Part, extended: bool = True) -> bytes:
    """BODY / BODYSTRUCTURE of ``part`` (RFC 3501 section 7.4.2)."""
    if part.maintype == "multipart":
        if part.children:
            inner = b"".join(body_structure(data, c, extended) for c in part.children)
        else:
            inner = b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0)'
        out = b"(" + inner + b" " + nstring(part.subtype.upper())
        if extended:
            out += b" " + _plist([p for p in part.params])
            out += b" " + _disposition(part) + b" " + _language(part)
            out += b" " + nstring(part.header("Content-Location"))
        return out + b")"
    body = data[part.body_start : part.end]
    encoding = part.header("Content-Transfer-Encoding")
    fields = [
        nstring(part.maintype.upper()),
        nstring(part.subtype.upper()),
        _plist(part.params),
        nstring(part.header("Content-ID")),
        nstring(part.header("Content-Description")),
        nstring(encoding.decode("latin-1").strip().upper() if encoding else "7BIT"),
        b"%d" % len(body),
    ]
    if part.message is not None:
        fields.append(envelope(part.message))
        fields.append(body_structure(data, part.message, extended))
        fields.append(b"%d" % _count_lines(body))
    elif part.maintype == "text":
        fields.append(b"%d" % _count_lines(body))
    if extended:
        fields.append(nstring(part.header("Content-MD5")))
        fields.append(_disposition(part))
        fields.append(_language(part))
        fields.append(nstring(part.header("Content-Location")))
    return b"(" + b" ".join(fields) + b")"


def _count_lines(body: bytes) -> int:
    if not body:
        return 0
    return body.count(b"\n") + (0 if body.endswith(b"\n") else 1)


def _address(name: str | None, addr: str) -> bytes:
    local, at, host = addr.rpartition("@")
    if not at:
        local, host = addr, ""
    return (
        b"("
        + nstring(name or None)
        + b" NIL "
        + nstring(local or None)
        + b" "
        + nstring(host or None)
        + b")"
    )


def _split_groups(text: str) -> list[tuple[str | None, str]]:
    """Split an address list at its groups (RFC 5322 section 3.4: ``name: a, b;``).

    Returns (group name or None, member text) in order; quoted strings, comments
    and angle brackets are skipped over, so a ":" or ";" inside them is no
    delimiter.  Linear in the length of the header.
    """
    out: list[tuple[str | None, str]] = []
    group: str | None = None
    start = 0
    depth = 0  # comment nesting
    quoted = angle = False
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif depth:
            if ch == "\\":
                i += 1
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
        elif ch == '"':
            quoted = True
        elif ch == "(":
            depth = 1
        elif angle:
            angle = ch != ">"
        elif ch == "<":
            angle = True
        elif ch == ":" and group is None:
            head = text[start:i]
            cut = head.rfind(",")  # addresses before the group stay ungrouped
            if cut >= 0:
                out.append((None, head[:cut]))
            name = head[cut + 1 :].strip()
            if len(name) >= 2 and name[0] == name[-1] == '"':
                name = name[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            group = name
            start = i + 1
        elif ch == ";" and group is not None:
            out.append((group, text[start:i]))
            group = None
            start = i + 1
        i += 1
    if group is not None:
        out.append((group, text[start:]))  # an unterminated group ends with the header
    else:
        out.append((None, text[start:]))
    return out


def _addresses(value: bytes | None) -> bytes:
    """An ENVELOPE address list; a group is (NIL NIL "name" NIL) before its members and
    (NIL NIL NIL NIL) after them (RFC 3501 section 7.4.2)."""
    if value is None:
        return b"NIL"
    text = value.decode("utf-8", "replace")
    out = []
    for group, members in _split_groups(text):
        if group is not None:
            out.append(b"(NIL NIL " + nstring(group) + b" NIL)")
        for name, addr in getaddresses([members]) if members.strip() else []:
            if addr or name:
                out.append(_address(name, addr))
        if group is not None:
            out.append(b"(NIL NIL NIL NIL)")
    if not out:
        return b"NIL"
    return b"(" + b"".join(out) + b")"


def envelope(part: Part) -> bytes:
    """ENVELOPE of a message (RFC 3501 section 7.4.2)."""
    sender = part.header("Sender") or part.header("From")
    reply_to = part.header("Reply-To") or part.header("From")
    return (
        b"("
        + b" ".join(
            [
                nstring(part.header("Date")),
                nstring(part.header("Subject")),
                _addresses(part.header("From")),
                _addresses(sender),
                _addresses(reply_to),
                _addresses(part.header("To")),
                _addresses(part.header("Cc")),
                _addresses(part.header("Bcc")),
                nstring(part.header("In-Reply-To")),
                nstring(part.header("Message-ID")),
            ]
        )
        + b")"
    )
