"""Authentication-Results (RFC 8601) under our authserv-id, and removal of forged ones.

The ``authresults`` filter goes after ``spf``, ``dkim``, ``arc`` and ``dmarc``
in a pipeline and writes one header with every result they recorded.  RFC
8601 §5: a border MTA removes Authentication-Results fields that claim its
own authserv-id before adding its own, so a sender cannot forge them; that is
done here (and by the ``headers`` filter) by rewriting the spooled header.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from mailserv.config.schema import Section, boolean, option, optional, string
from mailserv.envelope import parse_header_section
from mailserv.filters.base import FilterBase, Verdict
from mailserv.filters.common import authserv_id, load_options, results_for
from mailserv.interfaces import IMessageFilter

MAX_HEADER_BYTES = 1024 * 1024  # far above the 100 KiB header limit the SMTP layer enforces


def read_header_block(message: Any, limit: int = MAX_HEADER_BYTES) -> tuple[bytes, int]:
    """The header section (with its final CRLF) and the offset where the rest begins.

    The rest is the empty line and the body.  When there is no empty line
    within ``limit`` the whole prefix read is taken as the header.
    """
    with message.open() as f:
        data = f.read(limit)
    if data.startswith(b"\r\n"):
        return b"", 0
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data, len(data)
    return data[: end + 2], end + 2


def split_fields(head: bytes) -> list[bytes]:
    """The raw fields of a header section, each with its continuation lines and CRLFs."""
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def rewrite_without(message: Any, drop: Callable[[str, bytes], bool]) -> int:
    """Remove header fields for which ``drop(name, raw_value)`` is true (blocking).

    A spooled file is rewritten next to itself and renamed over it; a message
    held in memory gets new ``data``.  ``message.size`` and ``message.headers``
    are updated.  Returns the count removed.
    """
    head, rest_at = read_header_block(message)
    kept, removed = [], 0
    for raw in split_fields(head):
        name, colon, value = raw.partition(b":")
        if colon and drop(name.strip().decode("ascii", "replace"), value):
            removed += 1
        else:
            kept.append(raw)
    if not removed:
        return 0
    new_head = b"".join(kept)
    message.headers = parse_header_section(new_head)
    if message.path is None:  # held in memory (small messages)
        with message.open() as src:
            src.seek(rest_at)
            message.data = new_head + src.read()
        message.size = len(message.data)
        return removed
    tmp = message.path + ".hdr"
    with open(message.path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(new_head)
        src.seek(rest_at)
        while chunk := src.read(1 << 20):
            dst.write(chunk)
        size = dst.tell()
    os.replace(tmp, message.path)
    message.size = size
    return removed


_COMMENT = re.compile(rb"\((?:[^()\\]|\\.)*\)")


def claimed_authserv_id(value: bytes) -> str:
    """The authserv-id an Authentication-Results value claims (RFC 8601 §2.2)."""
    first = value.split(b";", 1)[0]
    for _ in range(3):  # nested comments, bounded
        first = _COMMENT.sub(b" ", first)
    words = first.split()
    return words[0].decode("utf-8", "replace").lower().rstrip(".") if words else ""


def forged_by_id(our_id: str) -> Callable[[str, bytes], bool]:
    our = our_id.lower().rstrip(".")

    def drop(name: str, value: bytes) -> bool:
        return name.lower() == "authentication-results" and claimed_authserv_id(value) == our

    return drop


def remove_forged(service: Any, message: Any, our_id: str) -> int | defer.Deferred[int]:
    """Remove forged Authentication-Results fields in the disk pool: Deferred[int].

    0 at once when the message has none that claims ``our_id``.
    """
    values = message.header("Authentication-Results")
    our = our_id.lower().rstrip(".")
    if not any(claimed_authserv_id(v) == our for v in values):
        return 0
    return service.threads.run("disk", rewrite_without, message, forged_by_id(our_id))  # type: ignore[no-any-return]


def render(our_id: str, results: list[Any]) -> str:
    """``authserv-id; resinfo; resinfo`` folded one result per line (RFC 8601 §2.2)."""
    if not results:
        return f"{our_id}; none"
    return f"{our_id};\r\n\t" + ";\r\n\t".join(r.render() for r in results)


class AuthResultsOptions(Section):
    """Keys of ``filter = "authresults"``."""

    authserv_id: str | None = option(optional(string), None)
    remove_forged: bool = option(boolean, True)


@implementer(IMessageFilter)
class AuthResultsFilter(FilterBase):
    """Add one Authentication-Results header with the results of this message."""

    name = "authresults"

    def __init__(self, options: Mapping[str, Any] | None = None, service: Any = None) -> None:
        super().__init__(options, service)
        self.config = load_options(AuthResultsOptions, self.options)
        self.authserv_id = authserv_id(service, self.config.authserv_id)

    def check_message(self, session: Any, envelope: Any, message: Any) -> Any:
        results = results_for(session, envelope)
        removed: Any = 0
        if self.config.remove_forged:
            removed = remove_forged(self.service, message, self.authserv_id)
        if isinstance(removed, int):
            return self._header(results, removed)
        return removed.addCallback(lambda count: self._header(results, count))

    def _header(self, results: Any, removed: int) -> Verdict:
        results.forged_removed += removed
        return Verdict.cont(("Authentication-Results", render(self.authserv_id, results.all())))
