"""Header analysis (RFC 5322 §3.6, RFC 6532) and removal of forged Authentication-Results.

Findings, each with its own configurable action:

- ``missing_from`` / ``missing_date`` / ``missing_message_id``: §3.6 requires
  From and Date; Message-ID SHOULD be present;
- ``duplicate``: more than one of a field §3.6 allows once (Date, From,
  Sender, Reply-To, To, Cc, Bcc, Message-ID, In-Reply-To, References, Subject);
- ``malformed_address``: an address field that does not parse (§3.4);
- ``eight_bit``: non-ASCII header bytes in a message sent without SMTPUTF8
  (RFC 6532 §3, RFC 6531 §3.1);
- ``long_line``: a header line over 998 characters (§2.1.1);
- ``bad_field``: a line that is neither a field nor a continuation (§2.2).

The server itself adjusts trace and MSA headers (Received, Return-Path, and on
submission Date and Message-ID: mailserv/smtp); this filter reports and acts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from email import policy
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from mailserv.config.schema import Section, boolean, option, optional, string
from mailserv.filters.authresults import read_header_block, remove_forged, split_fields
from mailserv.filters.base import CONTINUE, FilterBase, Verdict
from mailserv.filters.common import (
    ACTIONS,
    action_kind,
    authserv_id,
    clean,
    header_name,
    load_options,
    outcome,
    results_for,
    run_on_message,
)
from mailserv.interfaces import IMessageFilter

SINGLETONS = (
    "date",
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "bcc",
    "message-id",
    "in-reply-to",
    "references",
    "subject",
)
ADDRESS_FIELDS = ("from", "sender", "reply-to", "to", "cc", "bcc")
MAX_ADDRESS_FIELD = 16 * 1024
MAX_LINE = 998  # RFC 5322 §2.1.1, without CRLF


class HeadersOptions(Section):
    """Keys of ``filter = "headers"``: an action per finding."""

    missing_from: str = option(action_kind, "reject")
    missing_date: str = option(action_kind, "tag")
    missing_message_id: str = option(action_kind, "tag")
    duplicate: str = option(action_kind, "reject")
    # Tagged by default: common in legitimate mail from sloppy clients.
    malformed_address: str = option(action_kind, "tag")
    eight_bit: str = option(action_kind, "tag")
    long_line: str = option(action_kind, "reject")
    bad_field: str = option(action_kind, "tag")
    remove_forged_authres: bool = option(boolean, True)
    authserv_id: str | None = option(optional(string), None)
    tag_header: str = option(header_name, "X-Mailserv-Header-Check")


@dataclass
class Findings:
    problems: list[tuple[str, str]] = field(default_factory=list)  # (kind, description)

    def add(self, kind: str, text: str) -> None:
        self.problems.append((kind, text))


def analyse(message: Any, smtputf8: bool, msa: bool = False) -> Findings:
    """Read the header section of the message and list its problems (may block: a file).

    ``msa``: on submission the server adds a missing Date and Message-ID
    (RFC 6409 §8.2, §8.3), so their absence is not a finding.
    """
    head, _rest = read_header_block(message)
    found = Findings()
    counts: dict[str, int] = {}
    eight_bit_reported = False
    for raw in split_fields(head):
        for line in raw.split(b"\r\n"):
            if len(line) > MAX_LINE:
                found.add("long_line", "header line longer than 998 characters")
                break
        if not smtputf8 and not raw.isascii() and not eight_bit_reported:
            found.add("eight_bit", "8-bit header without SMTPUTF8")
            eight_bit_reported = True
        name_b, colon, value_b = raw.partition(b":")
        name = name_b.decode("ascii", "replace")
        if not colon or not name or not name_b.isascii() or name != name.strip() or " " in name:
            found.add("bad_field", "line that is not a header field")
            continue
        lname = name.lower()
        counts[lname] = counts.get(lname, 0) + 1
        if lname in ADDRESS_FIELDS and not _address_ok(lname, value_b):
            found.add("malformed_address", f"malformed {name} header")
    for lname in SINGLETONS:
        if counts.get(lname, 0) > 1:
            found.add("duplicate", f"duplicate {lname} header")
    for kind, lname in (
        ("missing_from", "from"),
        ("missing_date", "date"),
        ("missing_message_id", "message-id"),
    ):
        if msa and kind != "missing_from":
            continue
        if not counts.get(lname):
            found.add(kind, f"missing {lname} header")
    return found


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_ADDR_SPEC = rf"{_ATEXT}+(?:\.{_ATEXT}+)*@{_LABEL}(?:\.{_LABEL})+"
_DISPLAY = rf"(?:\"(?:[^\"\\\r\n]|\\.)*\"|{_ATEXT}+(?: {_ATEXT}+)*)"
_MAILBOX = rf"(?:{_ADDR_SPEC}|(?:{_DISPLAY} ?)?<{_ADDR_SPEC}>)"
# The common, plainly valid forms; anything else goes to the full RFC 5322 parser.
_SIMPLE_LIST = re.compile(rf"{_MAILBOX}(?: ?, ?{_MAILBOX})*")


def _address_ok(lname: str, value: bytes) -> bool:
    if len(value) > MAX_ADDRESS_FIELD:
        return False
    text = value.decode("utf-8", "replace").replace("\r\n", "").strip()
    if _SIMPLE_LIST.fullmatch(text):
        return True
    header = policy.default.header_factory(lname, text)
    if any(type(d).__name__ == "InvalidHeaderDefect" for d in header.defects):
        return False
    addresses = getattr(header, "addresses", ())
    if any(not a.domain or not a.username for a in addresses):
        return False
    return not (lname in ("from", "sender") and not addresses)


_SEVERITY = {name: i for i, name in enumerate(reversed(ACTIONS))}  # ignore < tag < ... < reject


@implementer(IMessageFilter)
class HeadersFilter(FilterBase):
    """Analyse the header section; remove forged Authentication-Results claiming our id."""

    name = "headers"

    def __init__(self, options: Mapping[str, Any] | None = None, service: Any = None) -> None:
        super().__init__(options, service)
        self.config = load_options(HeadersOptions, self.options)
        self.authserv_id = authserv_id(service, self.config.authserv_id)

    def check_message(self, session: Any, envelope: Any, message: Any) -> Any:
        """The verdict at once for a small message in memory with nothing forged to
        remove, else a Deferred of it."""
        found = run_on_message(
            self.service.threads,
            "disk",
            analyse,
            message,
            bool(envelope.smtputf8),
            getattr(session, "protocol", "smtp") == "submission",
        )
        if isinstance(found, defer.Deferred):
            return found.addCallback(self._remove_forged, session, envelope, message)
        return self._remove_forged(found, session, envelope, message)

    def _remove_forged(self, found: Any, session: Any, envelope: Any, message: Any) -> Any:
        removed: Any = 0
        if self.config.remove_forged_authres:
            removed = remove_forged(self.service, message, self.authserv_id)
        if isinstance(removed, defer.Deferred):
            return removed.addCallback(lambda count: self._verdict(found, session, envelope, count))
        return self._verdict(found, session, envelope, removed)

    def _verdict(self, found: Any, session: Any, envelope: Any, removed: int) -> Verdict:
        results = results_for(session, envelope)
        results.forged_removed += removed
        if not found.problems:
            return CONTINUE
        worst = max(
            (getattr(self.config, kind) for kind, _ in found.problems), key=_SEVERITY.__getitem__
        )
        relevant = [text for kind, text in found.problems if getattr(self.config, kind) != "ignore"]
        if not relevant:
            return CONTINUE
        reason = clean("; ".join(dict.fromkeys(relevant)), 300)
        verdict: Verdict = outcome(
            worst,
            reason,
            (550, "5.6.0", f"Message header rejected: {reason}"),
            ((self.config.tag_header, reason),),
            results.quarantine.append,
        )
        return verdict
