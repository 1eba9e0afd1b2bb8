"""SEARCH keys (RFC 3501 section 6.4.4), ESEARCH (RFC 4731), SORT and THREAD (RFC 5256).

Parsing is iterative over the token list; evaluation runs in the disk thread
pool because text keys read the messages.
"""

from __future__ import annotations

import datetime
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.utils import getaddresses, parsedate_tz
from typing import Any

from mailserv.imap import message as mime
from mailserv.imap.parser import Atom, LiteralFile, ParseError, Token, as_bytes, parse_seqset

MAX_KEYS = 1000
_DATE_RE = re.compile(r"^(\d{1,2})-([A-Za-z]{3})-(\d{4})$")
_MONTHS = {
    m: i + 1
    for i, m in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
    )
}
_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True), "UNANSWERED": ("\\Answered", False),
    "DELETED": ("\\Deleted", True), "UNDELETED": ("\\Deleted", False),
    "DRAFT": ("\\Draft", True), "UNDRAFT": ("\\Draft", False),
    "FLAGGED": ("\\Flagged", True), "UNFLAGGED": ("\\Flagged", False),
    "SEEN": ("\\Seen", True), "UNSEEN": ("\\Seen", False),
}  # fmt: skip
_HEADER_KEYS = {"FROM", "TO", "CC", "BCC", "SUBJECT"}
_DATE_KEYS = {"BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"}


@dataclass
class Key:
    """One node of a search program."""

    op: str
    arg: Any = None
    children: tuple[Key, ...] = ()


class BadCharset(Exception):
    """SEARCH CHARSET other than UTF-8 / US-ASCII (RFC 3501: NO [BADCHARSET])."""


def parse_date(tok: Token) -> datetime.date:
    text = as_bytes(tok, "date").decode("ascii", "replace")
    m = _DATE_RE.match(text)
    if m is None or m.group(2).lower() not in _MONTHS:
        raise ParseError("invalid date")
    try:
        return datetime.date(int(m.group(3)), _MONTHS[m.group(2).lower()], int(m.group(1)))
    except ValueError as exc:
        raise ParseError("invalid date") from exc


def parse_program(tokens: list[Token]) -> tuple[Key, str]:
    """Parse search keys (after the optional CHARSET); returns (AND node, charset).

    Recursion is bounded: parenthesised lists are at most parser.MAX_DEPTH deep
    and NOT/OR chains at most MAX_NESTING.
    """
    pos = 0
    charset = "UTF-8"
    if len(tokens) >= 2 and isinstance(tokens[0], Atom) and tokens[0].upper() == "CHARSET":
        charset = as_bytes(tokens[1]).decode("ascii", "replace").upper()
        if charset not in ("UTF-8", "US-ASCII"):
            raise BadCharset(charset)
        pos = 2
    state = _ProgramParser()
    children = []
    while pos < len(tokens):
        node, pos = state.key(tokens, pos, 0)
        children.append(node)
    if not children:
        raise ParseError("missing search key")
    return Key("AND", children=tuple(children)), charset


MAX_NESTING = 64


class _ProgramParser:
    def __init__(self) -> None:
        self.count = 0

    def key(self, seq: list[Token], idx: int, depth: int) -> tuple[Key, int]:
        if depth > MAX_NESTING:
            raise ParseError("search program too deeply nested")
        self.count += 1
        if self.count > MAX_KEYS:
            raise ParseError("search program too long")
        tok = _take(seq, idx, "search key")
        idx += 1
        if isinstance(tok, list):
            if not tok:
                raise ParseError("empty search list")
            children = []
            sub = 0
            while sub < len(tok):
                node, sub = self.key(tok, sub, depth + 1)
                children.append(node)
            return Key("AND", children=tuple(children)), idx
        if not isinstance(tok, Atom):
            raise ParseError("expected a search key")
        key = tok.upper()
        if key == "NOT":
            child, idx = self.key(seq, idx, depth + 1)
            return Key("NOT", children=(child,)), idx
        if key == "OR":
            left, idx = self.key(seq, idx, depth + 1)
            right, idx = self.key(seq, idx, depth + 1)
            return Key("OR", children=(left, right)), idx
        if key in ("ALL", "NEW", "OLD", "RECENT"):
            return Key(key), idx
        if key in _FLAG_KEYS:
            return Key("FLAG", _FLAG_KEYS[key]), idx
        if key in ("KEYWORD", "UNKEYWORD"):
            flag = str(_take(seq, idx, "keyword"))
            return Key("FLAG", (flag, key == "KEYWORD")), idx + 1
        if key in _HEADER_KEYS:
            return Key("HEADER", (key, _text(_take(seq, idx, "string")))), idx + 1
        if key == "HEADER":
            name = as_bytes(_take(seq, idx, "header name")).decode("latin-1")
            return Key("HEADER", (name.upper(), _text(_take(seq, idx + 1, "string")))), idx + 2
        if key in ("BODY", "TEXT"):
            return Key(key, _text(_take(seq, idx, "string"))), idx + 1
        if key in _DATE_KEYS:
            return Key(key, parse_date(_take(seq, idx, "date"))), idx + 1
        if key in ("LARGER", "SMALLER"):
            return Key(key, _number(_take(seq, idx, "number"))), idx + 1
        if key == "UID":
            return Key("UID", parse_seqset(str(_take(seq, idx, "sequence set")))), idx + 1
        if key == "MODSEQ":
            # MODSEQ [entry-name entry-type] mod-sequence-valzer (RFC 7162 section 3.1.5)
            if isinstance(_take(seq, idx, "modseq"), bytes):
                idx += 2
            return Key("MODSEQ", _number(_take(seq, idx, "modseq"))), idx + 1
        if key[:1].isdigit() or key[:1] == "*":
            return Key("SEQ", parse_seqset(str(tok))), idx
        raise ParseError(f"unknown search key {key[:20]}")


def _take(seq: list[Token], idx: int, what: str) -> Token:
    if idx >= len(seq):
        raise ParseError(f"missing {what}")
    return seq[idx]


def _text(tok: Token) -> str:
    if isinstance(tok, list):
        raise ParseError("expected a string")
    raw = tok.read_all() if isinstance(tok, LiteralFile) else as_bytes(tok)
    return raw.decode("utf-8", "replace").lower()


def _number(tok: Token) -> int:
    text = str(tok) if isinstance(tok, Atom) else ""
    if not text.isdigit():
        raise ParseError("expected a number")
    return int(text)


def needs_data(key: Key) -> bool:
    if key.op in ("HEADER", "BODY", "TEXT", "SENTBEFORE", "SENTON", "SENTSINCE"):
        return True
    return any(needs_data(c) for c in key.children)


def needs_body(key: Key) -> bool:
    """Does the program look past the header (BODY, TEXT)?  Else the header block is enough."""
    if key.op in ("BODY", "TEXT"):
        return True
    return any(needs_body(c) for c in key.children)


def decode_text(raw: bytes) -> str:
    """A header value with RFC 2047 encoded words decoded (lower-cased for matching)."""
    text = raw.decode("utf-8", "replace")
    if "=?" in text:
        try:
            text = str(make_header(decode_header(text)))
        except (ValueError, LookupError, UnicodeError):
            pass
    return text


@dataclass
class Candidate:
    """What a search key is evaluated against."""

    seq: int
    uid: int
    info: Any
    recent: bool
    loader: Callable[[], bytes] | None = None
    number: int = 0  # what THREAD/SORT report: the UID or the sequence number
    _data: bytes | None = None
    _tree: mime.Part | None = None

    def data(self) -> bytes:
        if self._data is None:
            self._data = self.loader() if self.loader is not None else b""
        return self._data

    def drop_text(self) -> None:
        """Forget the message text (the parsed headers stay for SORT and THREAD)."""
        self._data = None

    def tree(self) -> mime.Part:
        if self._tree is None:
            self._tree = mime.parse(self.data())
        return self._tree


def evaluate(key: Key, c: Candidate, max_seq: int, max_uid: int) -> bool:
    """Evaluate ``key`` for one message.  Stack-based: programs are bounded by MAX_KEYS."""
    op = key.op
    if op == "AND":
        return all(evaluate(k, c, max_seq, max_uid) for k in key.children)
    if op == "NOT":
        return not evaluate(key.children[0], c, max_seq, max_uid)
    if op == "OR":
        return evaluate(key.children[0], c, max_seq, max_uid) or evaluate(
            key.children[1], c, max_seq, max_uid
        )
    if op == "ALL":
        return True
    flags = c.info.flags
    if op == "FLAG":
        name, present = key.arg
        has = name.lower() in {f.lower() for f in flags}
        return has == present
    if op == "RECENT":
        return c.recent
    if op == "NEW":
        return c.recent and "\\Seen" not in flags
    if op == "OLD":
        return not c.recent
    if op == "LARGER":
        return bool(c.info.size > key.arg)
    if op == "SMALLER":
        return bool(c.info.size < key.arg)
    if op == "SEQ":
        return any(_in(c.seq, lo, hi, max_seq) for lo, hi in key.arg)
    if op == "UID":
        return any(_in(c.uid, lo, hi, max_uid) for lo, hi in key.arg)
    if op == "MODSEQ":
        return bool(c.info.modseq >= key.arg)
    if op in ("BEFORE", "ON", "SINCE"):
        day = datetime.date.fromtimestamp(c.info.internal_date)
        return _compare(op, day, key.arg)
    if op in ("SENTBEFORE", "SENTON", "SENTSINCE"):
        raw = c.tree().header("Date")
        parsed = parsedate_tz(raw.decode("latin-1")) if raw else None
        if parsed is None:
            day = datetime.date.fromtimestamp(c.info.internal_date)
        else:
            try:
                day = datetime.date(parsed[0], parsed[1], parsed[2])
            except ValueError:
                return False
        return _compare(op[4:], day, key.arg)
    if op == "HEADER":
        name, needle = key.arg
        tree = c.tree()
        values = [v for k, v in tree.headers if k.upper() == name]
        if not values:
            return False
        if not needle:
            return True
        return any(needle in decode_text(v).lower() for v in values)
    if op == "BODY":
        tree = c.tree()
        return key.arg in c.data()[tree.body_start :].decode("utf-8", "replace").lower()
    if op == "TEXT":
        return key.arg in c.data().decode("utf-8", "replace").lower()
    raise ParseError(f"unsupported search key {op}")


def _in(value: int, lo: int, hi: int, star: int) -> bool:
    lo = star if lo == 0 else lo
    hi = star if hi == 0 else hi
    if lo > hi:
        lo, hi = hi, lo
    return lo <= value <= hi


def _compare(op: str, day: datetime.date, ref: datetime.date) -> bool:
    if op == "BEFORE":
        return day < ref
    if op == "ON":
        return day == ref
    return day >= ref


# --------------------------------------------------------------------------
# SORT (RFC 5256 section 3)

SORT_KEYS = {"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO", "DISPLAYFROM", "DISPLAYTO"}
_SUBJ_LEADER = re.compile(r"^(?:\s+|\[[^\[\]]*\]\s*|(?:re|fwd?)\s*(?:\[[^\[\]]*\])?\s*:\s*)", re.I)
_SUBJ_TRAILER = re.compile(r"(?:\s*\(fwd\)|\s+)$", re.I)


def parse_sort_criteria(tokens: Token) -> list[tuple[str, bool]]:
    if not isinstance(tokens, list) or not tokens:
        raise ParseError("expected a sort criteria list")
    out = []
    reverse = False
    for tok in tokens:
        name = str(tok).upper()
        if name == "REVERSE":
            reverse = True
            continue
        if name not in SORT_KEYS:
            raise ParseError(f"unknown sort key {name[:20]}")
        out.append((name, reverse))
        reverse = False
    if reverse or not out:
        raise ParseError("bad sort criteria")
    return out


def base_subject(raw: bytes | None) -> str:
    """RFC 5256 section 2.1 base subject (simplified: leaders, trailers, [fwd: ...])."""
    text = decode_text(raw or b"")
    text = " ".join(text.split())
    while True:
        before = text
        text = _SUBJ_TRAILER.sub("", text)
        while True:
            stripped = _SUBJ_LEADER.sub("", text, count=1)
            if stripped == text or not stripped:
                break
            text = stripped
        if text.lower().startswith("[fwd:") and text.endswith("]"):
            text = text[5:-1].strip()
        if text == before:
            break
    return text.upper()


def _first_address(raw: bytes | None, display: bool) -> str:
    if not raw:
        return ""
    pairs = getaddresses([decode_text(raw)])
    if not pairs:
        return ""
    name, addr = pairs[0]
    if display and name:
        return name.upper()
    return addr.partition("@")[0].upper()


def sent_date(c: Candidate) -> float:
    raw = c.tree().header("Date")
    parsed = parsedate_tz(raw.decode("latin-1")) if raw else None
    if parsed is None:
        return float(c.info.internal_date)
    from email.utils import mktime_tz

    try:
        return float(mktime_tz(parsed))
    except (OverflowError, ValueError):
        return float(c.info.internal_date)


def sort_key(name: str, c: Candidate) -> Any:
    if name == "ARRIVAL":
        return c.info.internal_date
    if name == "SIZE":
        return c.info.size
    if name == "DATE":
        return sent_date(c)
    if name == "SUBJECT":
        return base_subject(c.tree().header("Subject"))
    header = {"CC": "Cc", "FROM": "From", "TO": "To", "DISPLAYFROM": "From", "DISPLAYTO": "To"}[
        name
    ]
    return _first_address(c.tree().header(header), name.startswith("DISPLAY"))


def _sort_key_of(name: str, c: Candidate) -> Any:
    return sort_key(name, c)


def sort_candidates(cands: list[Candidate], criteria: list[tuple[str, bool]]) -> list[Candidate]:
    """Stable multi-key sort; ties broken by sequence number (RFC 5256 section 3)."""
    out = sorted(cands, key=lambda c: c.seq)
    for name, reverse in reversed(criteria):
        out.sort(key=functools.partial(_sort_key_of, name), reverse=reverse)
    return out


# --------------------------------------------------------------------------
# THREAD (RFC 5256 section 4)

_MSGID_RE = re.compile(rb"<[^<>\s]+>")


def thread_orderedsubject(cands: list[Candidate]) -> bytes:
    groups: dict[str, list[Candidate]] = {}
    for c in sorted(
        cands, key=lambda c: (base_subject(c.tree().header("Subject")), sent_date(c), c.seq)
    ):
        groups.setdefault(base_subject(c.tree().header("Subject")), []).append(c)
    threads = sorted(groups.values(), key=lambda g: (sent_date(g[0]), g[0].seq))
    out = []
    for group in threads:
        first, rest = group[0], group[1:]
        if rest:
            out.append(b"(%d " % first.number + b"".join(b"(%d)" % c.number for c in rest) + b")")
        else:
            out.append(b"(%d)" % first.number)
    return b"".join(out)


def thread_references(cands: list[Candidate]) -> bytes:
    """A faithful-enough REFERENCES threading: parent links from References/In-Reply-To,
    dummy roots pruned, siblings ordered by sent date, roots grouped by base subject."""
    by_id: dict[bytes, dict[str, Any]] = {}

    def container(mid: bytes) -> dict[str, Any]:
        if mid not in by_id:
            by_id[mid] = {"msg": None, "parent": None, "children": []}
        return by_id[mid]

    def is_ancestor(a: dict[str, Any], b: dict[str, Any]) -> bool:
        seen = 0
        while b is not None and seen < 10000:
            if b is a:
                return True
            b = b["parent"]
            seen += 1
        return False

    for c in cands:
        tree = c.tree()
        mids = _MSGID_RE.findall(tree.header("Message-ID") or b"")
        mid = (
            mids[0]
            if (mids and mids[0] not in by_id) or (mids and by_id[mids[0]]["msg"] is None)
            else None
        )
        if mid is None:
            mid = b"<dup-%d@mailserv>" % c.seq
        cont = container(mid)
        cont["msg"] = c
        refs = _MSGID_RE.findall(tree.header("References") or b"")
        if not refs:
            refs = _MSGID_RE.findall(tree.header("In-Reply-To") or b"")[:1]
        parent = None
        for ref in refs:
            node = container(ref)
            if parent is not None and node["parent"] is None and not is_ancestor(node, parent):
                node["parent"] = parent
                parent["children"].append(node)
            parent = node
        if cont["parent"] is not None:
            cont["parent"]["children"].remove(cont)
            cont["parent"] = None
        if parent is not None and parent is not cont and not is_ancestor(cont, parent):
            cont["parent"] = parent
            parent["children"].append(cont)
    roots = [n for n in by_id.values() if n["parent"] is None]

    def date_of(node: dict[str, Any]) -> tuple[float, int]:
        if node["msg"] is not None:
            return (sent_date(node["msg"]), node["msg"].seq)
        dates = [date_of(ch) for ch in node["children"]]
        return min(dates) if dates else (0.0, 0)

    def render(node: dict[str, Any]) -> bytes:
        # prune dummies: a dummy with one child is replaced by it
        kids = sorted(node["children"], key=date_of)
        if node["msg"] is None:
            kids = [k for k in kids if _has_message(k)]
            if len(kids) == 1:
                return render(kids[0])
            return b"(" + b"".join(render(k) for k in kids) + b")"
        parts = [b"%d" % node["msg"].number]
        while len(kids) == 1:
            node = kids[0]
            if node["msg"] is None:
                break
            parts.append(b"%d" % node["msg"].number)
            kids = sorted(node["children"], key=date_of)
        inner = b" ".join(parts)
        if kids:
            inner += b" " + b"".join(render(k) for k in kids)
        return b"(" + inner + b")"

    roots = [r for r in roots if _has_message(r)]
    roots.sort(key=date_of)
    return b"".join(render(r) for r in roots)


def _has_message(node: dict[str, Any]) -> bool:
    stack = [node]
    while stack:
        n = stack.pop()
        if n["msg"] is not None:
            return True
        stack.extend(n["children"])
    return False
