"""Quarantine: turn the reasons other filters recorded into a QUARANTINE verdict.

Filters whose configured action is ``quarantine`` record a reason instead of
ending the stage (so that later filters still run).  This filter, which the
registry puts at the end of any pipeline that needs it, gives the QUARANTINE
verdict with the reasons in a header; the router then delivers into the
user's Junk folder (mailserv/smtp/delivery.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from zope.interface import implementer

from mailserv.config.schema import Section, option
from mailserv.filters.base import CONTINUE, Action, FilterBase, Verdict
from mailserv.filters.common import clean, header_name, load_options, quarantine_reasons
from mailserv.interfaces import IMessageFilter


class QuarantineOptions(Section):
    """Keys of ``filter = "quarantine"``."""

    header: str = option(header_name, "X-Mailserv-Quarantine")


@implementer(IMessageFilter)
class QuarantineFilter(FilterBase):
    """QUARANTINE when any filter recorded a quarantine reason for this message."""

    name = "quarantine"

    def __init__(self, options: Mapping[str, Any] | None = None, service: Any = None) -> None:
        super().__init__(options, service)
        self.config = load_options(QuarantineOptions, self.options)

    def check_message(self, session: Any, envelope: Any, message: Any) -> Verdict:
        reasons = quarantine_reasons(session, envelope)
        if not reasons:
            return CONTINUE
        reason = clean("; ".join(dict.fromkeys(reasons)), 400)
        return Verdict(Action.QUARANTINE, headers=((self.config.header, reason),), reason=reason)


def _wants_quarantine(flt: Any) -> bool:
    config = getattr(flt, "config", None)
    if config is None or not hasattr(config, "keys"):
        return False
    return any(getattr(config, key, None) == "quarantine" for key in config.keys()) or bool(
        getattr(flt, "may_quarantine", False)
    )


def with_quarantine(filters: Sequence[Any], service: Any) -> list[Any]:
    """``filters`` with a QuarantineFilter last when one of them may record quarantine reasons."""
    out = list(filters)
    if any(isinstance(f, QuarantineFilter) for f in out):
        return out
    if any(_wants_quarantine(f) for f in out):
        out.append(QuarantineFilter({}, service))
    return out
