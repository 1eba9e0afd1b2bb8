"""Verdicts and the base class of filters (ARCHITECTURE.md "Filters").

A filter implements one or more of the stage interfaces of
mailserv.interfaces (IConnectionFilter, IHeloFilter, ISenderFilter,
IRecipientFilter, IMessageFilter); each stage method returns a Deferred (or a
plain value) of a Verdict.  Filters keep no per-message state on themselves.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mailserv.errors import SMTPReply


class Action(enum.Enum):
    CONTINUE = "continue"  # no opinion: the next filter decides
    ACCEPT = "accept"  # accept now: skip the rest of the stage
    REJECT = "reject"  # permanent refusal (5xx)
    TEMPFAIL = "tempfail"  # temporary refusal (4xx)
    QUARANTINE = "quarantine"  # accept, deliver into the Junk folder
    DISCARD = "discard"  # message stage: accept (250), then drop the message (Postfix DISCARD)
    DISCONNECT = "disconnect"  # reply (421) and close the connection


_DEFAULT_REPLIES = {
    Action.REJECT: SMTPReply(550, "5.7.1", "Rejected by policy"),
    Action.TEMPFAIL: SMTPReply(451, "4.7.1", "Try again later"),
    Action.DISCONNECT: SMTPReply(421, "4.7.0", "Closing connection"),
}

FILTER_FAILURE = SMTPReply(451, "4.3.0", "Temporary filter failure, try again later")


@dataclass(frozen=True)
class Verdict:
    """What a filter decided, plus headers to add and an optional reply."""

    action: Action = Action.CONTINUE
    reply: SMTPReply | None = None
    headers: tuple[tuple[str, str], ...] = ()
    reason: str = ""
    filter: str = ""

    @property
    def final(self) -> bool:
        """True when the stage stops here (anything but CONTINUE)."""
        return self.action is not Action.CONTINUE

    @property
    def refuses(self) -> bool:
        return self.action in (Action.REJECT, Action.TEMPFAIL, Action.DISCONNECT)

    def smtp_reply(self) -> SMTPReply:
        """The reply the client gets for a refusing verdict."""
        if self.reply is not None:
            return self.reply
        return _DEFAULT_REPLIES.get(self.action, SMTPReply(250, "2.0.0", "OK"))

    @classmethod
    def cont(cls, *headers: tuple[str, str]) -> Verdict:
        return cls(Action.CONTINUE, headers=tuple(headers))

    @classmethod
    def reject(cls, code: int, enhanced: str, text: str, reason: str = "") -> Verdict:
        return cls(Action.REJECT, SMTPReply(code, enhanced, text), reason=reason or text)

    @classmethod
    def tempfail(cls, code: int, enhanced: str, text: str, reason: str = "") -> Verdict:
        return cls(Action.TEMPFAIL, SMTPReply(code, enhanced, text), reason=reason or text)


CONTINUE = Verdict()
ACCEPT = Verdict(Action.ACCEPT)


class FilterBase:
    """Convenience base: a name, a timeout, and the options of its pipeline entry.

    Subclasses implement the stage methods they need and declare the matching
    interfaces with ``@implementer``.
    """

    name = "filter"
    default_timeout = 10.0

    def __init__(self, options: Mapping[str, Any] | None = None, service: Any = None) -> None:
        self.options = dict(options or {})
        self.service = service
        self.timeout = float(self.options.pop("timeout", self.default_timeout))


@dataclass
class StageResult:
    """The combined outcome of one stage of a chain."""

    verdict: Verdict = CONTINUE
    headers: list[tuple[str, str]] = field(default_factory=list)
    trail: list[str] = field(default_factory=list)  # "name:action" of each filter that spoke
