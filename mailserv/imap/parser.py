"""IMAP command tokenizer (RFC 3501 section 9), iterative and bounded.

The protocol (server.py) splits the input into line fragments and literals;
this module turns them into tokens.  Parentheses are handled with an explicit
stack and a depth limit, never by recursion (defect 9 of ARCHITECTURE.md).
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Sequence
from typing import IO, Union

MAX_DEPTH = 32

_LITERAL_RE = re.compile(rb"\{(\d{1,10})(\+?)\}$")
_ATOM_STOP = frozenset(b' (){"\r\n')


class ParseError(Exception):
    """A malformed command: the client gets a tagged BAD."""


class Atom(str):
    """An unquoted atom (including NIL, flags and FETCH attributes with sections)."""

    __slots__ = ()


class Literal(bytes):
    """The octets of a literal held in memory (a quoted string is plain ``bytes``):
    APPEND tells its messages from a quoted date-time by this."""

    __slots__ = ()


class LiteralFile:
    """A large literal spooled to a temporary file (APPEND)."""

    def __init__(self, file: IO[bytes], size: int) -> None:
        self.file = file
        self.size = size

    def read_all(self) -> bytes:
        self.file.seek(0)
        return self.file.read()


Token = Union[Atom, bytes, LiteralFile, list["Token"]]  # noqa: UP007


def literal_marker(line: bytes) -> tuple[int, bool] | None:
    """If ``line`` ends with ``{n}`` or ``{n+}`` return (n, non_synchronising)."""
    m = _LITERAL_RE.search(line)
    if m is None:
        return None
    return int(m.group(1)), m.group(2) == b"+"


def strip_marker(line: bytes) -> bytes:
    return _LITERAL_RE.sub(b"", line)


def tokenize(fragments: Sequence[bytes | LiteralFile]) -> list[Token]:
    """Tokenize a command: line fragments alternate with literal contents.

    Even indices are line text (without CRLF and without the literal marker),
    odd indices are literal data (bytes or LiteralFile).
    """
    top: list[Token] = []
    stack: list[list[Token]] = [top]
    for index, frag in enumerate(fragments):
        if index % 2 == 1:
            stack[-1].append(frag if isinstance(frag, LiteralFile) else Literal(frag))
            continue
        assert isinstance(frag, bytes)
        _tokenize_line(frag, stack)
    if len(stack) != 1:
        raise ParseError("unbalanced parentheses")
    return top


def _tokenize_line(line: bytes, stack: list[list[Token]]) -> None:
    i = 0
    n = len(line)
    while i < n:
        c = line[i]
        if c == 0x20:
            i += 1
        elif c == 0x28:  # (
            if len(stack) > MAX_DEPTH:
                raise ParseError("too deeply nested")
            new: list[Token] = []
            stack[-1].append(new)
            stack.append(new)
            i += 1
        elif c == 0x29:  # )
            if len(stack) == 1:
                raise ParseError("unbalanced parentheses")
            stack.pop()
            i += 1
        elif c == 0x22:  # "
            i, value = _quoted(line, i + 1)
            stack[-1].append(value)
        elif c == 0x7B:  # {  (a literal marker not at the end of a fragment)
            raise ParseError("misplaced literal")
        elif c < 0x20 or c == 0x7F:
            raise ParseError("control character in command")
        else:
            start = i
            while i < n and line[i] not in _ATOM_STOP:
                if line[i] == 0x5B:  # [ ... ] may hold spaces and parentheses
                    close = line.find(b"]", i)
                    if close < 0:
                        raise ParseError("unterminated [")
                    i = close + 1
                else:
                    i += 1
            stack[-1].append(Atom(line[start:i].decode("utf-8", "surrogateescape")))


def _quoted(line: bytes, i: int) -> tuple[int, bytes]:
    out = bytearray()
    n = len(line)
    while i < n:
        c = line[i]
        if c == 0x22:
            return i + 1, bytes(out)
        if c == 0x5C:
            if i + 1 >= n or line[i + 1] not in b'"\\':
                raise ParseError("bad escape in quoted string")
            out.append(line[i + 1])
            i += 2
            continue
        out.append(c)
        i += 1
    raise ParseError("unterminated quoted string")


class Args:
    """A cursor over a command's arguments, with typed accessors raising ParseError."""

    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.pos = 0

    def more(self) -> bool:
        return self.pos < len(self.tokens)

    def peek(self) -> Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def next(self, what: str = "argument") -> Token:
        if self.pos >= len(self.tokens):
            raise ParseError(f"missing {what}")
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def end(self) -> None:
        if self.pos != len(self.tokens):
            raise ParseError("too many arguments")

    def atom(self, what: str = "atom") -> str:
        tok = self.next(what)
        if not isinstance(tok, Atom):
            raise ParseError(f"expected {what}")
        return str(tok)

    def astring(self, what: str = "string") -> bytes:
        tok = self.next(what)
        return as_bytes(tok, what)

    def list(self, what: str = "list") -> list[Token]:
        tok = self.next(what)
        if not isinstance(tok, list):
            raise ParseError(f"expected {what}")
        return tok

    def optional_list(self) -> builtins.list[Token] | None:
        if isinstance(self.peek(), list):
            return self.list()
        return None


def as_bytes(tok: Token, what: str = "string") -> bytes:
    if isinstance(tok, Atom):
        return str(tok).encode("utf-8", "surrogateescape")
    if isinstance(tok, bytes):
        return tok
    if isinstance(tok, LiteralFile):
        if tok.size > 65536:
            raise ParseError(f"{what} too long")
        return tok.read_all()
    raise ParseError(f"expected {what}")


def as_text(tok: Token, what: str = "string") -> str:
    try:
        return as_bytes(tok, what).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParseError(f"{what} is not UTF-8") from exc


# --------------------------------------------------------------------------
# Sequence sets (RFC 3501 section 9, sequence-set)

_SEQSET_RE = re.compile(r"^(\d+|\*)(?::(\d+|\*))?$")
MAX_SEQSET_RANGES = 10000


def parse_seqset(text: str) -> list[tuple[int, int]]:
    """Parse ``1,3:5,7:*`` into (low, high) ranges; ``*`` is 0 (resolved later)."""
    if text == "$":
        raise ParseError("search result variable not supported")
    ranges: list[tuple[int, int]] = []
    parts = text.split(",")
    if len(parts) > MAX_SEQSET_RANGES:
        raise ParseError("sequence set too long")
    for part in parts:
        m = _SEQSET_RE.match(part)
        if m is None:
            raise ParseError("invalid sequence set")
        lo = 0 if m.group(1) == "*" else int(m.group(1))
        hi_text = m.group(2) if m.group(2) is not None else m.group(1)
        hi = 0 if hi_text == "*" else int(hi_text)
        if (lo == 0 and m.group(1) != "*") or (hi == 0 and hi_text != "*"):
            raise ParseError("invalid sequence number 0")
        if lo > 0xFFFFFFFF or hi > 0xFFFFFFFF:
            raise ParseError("sequence number too large")
        ranges.append((lo, hi))
    return ranges


def resolve_seqset(ranges: list[tuple[int, int]], star: int) -> list[tuple[int, int]]:
    """Replace ``*`` by ``star`` and order each range low..high."""
    out = []
    for lo, hi in ranges:
        lo = star if lo == 0 else lo
        hi = star if hi == 0 else hi
        if lo > hi:
            lo, hi = hi, lo
        out.append((lo, hi))
    return out


def in_ranges(value: int, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= value <= hi for lo, hi in ranges)


def format_set(values: Sequence[int]) -> str:
    """Compact an ordered list of numbers into ``1:3,5`` form (UIDPLUS, ESEARCH)."""
    out: list[str] = []
    start = prev = None
    for v in values:
        if start is None:
            start = prev = v
        elif prev is not None and v == prev + 1:
            prev = v
        else:
            out.append(f"{start}" if start == prev else f"{start}:{prev}")
            start = prev = v
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}:{prev}")
    return ",".join(out)
