"""ARC (RFC 8617) chain verification with dkimpy, reported in Authentication-Results.

The chain validation status is ``pass``, ``fail`` or ``none`` (no ARC sets);
a chain whose newest seal says cv=fail is a ``fail``.  Verification runs in
the ``crypto`` pool with our resolver for the keys, like DKIM.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import dkim
from twisted.internet import defer
from zope.interface import implementer

from mailserv.config.schema import Section, integer, option, size
from mailserv.filters.base import CONTINUE, FilterBase
from mailserv.filters.common import (
    MethodResult,
    action_kind,
    clean,
    load_options,
    outcome,
    prepared,
    resolver_for,
    results_for,
)
from mailserv.filters.dkim import txt_lookup
from mailserv.interfaces import IMessageFilter


class ARCOptions(Section):
    """Keys of ``filter = "arc"``."""

    max_size: int = option(size, 20 * 1024 * 1024)
    min_key_bits: int = option(integer(512, 16384), 1024)
    fail: str = option(action_kind, "ignore")


def verify_chain(message: Any, resolver: Any, min_key_bits: int) -> MethodResult:
    """Blocking ARC verification of the received message."""
    with message.open() as f:
        raw = f.read()
    state: dict[str, Any] = {}
    try:
        cv, sets, comment = dkim.ARC(raw, minkey=min_key_bits).verify(
            dnsfunc=txt_lookup(resolver, state)
        )
    except dkim.DKIMException as exc:
        return MethodResult("arc", "fail", comment=clean(str(exc), 120))
    if "temporary" in state:
        return MethodResult("arc", "temperror", comment="key lookup failed")
    result = {dkim.CV_Pass: "pass", dkim.CV_None: "none"}.get(cv, "fail")
    count = len(sets)
    note = f"{count} ARC set{'s' if count != 1 else ''}: {comment}" if count else str(comment)
    return MethodResult("arc", result, comment=clean(note, 120))


@implementer(IMessageFilter)
class ARCFilter(FilterBase):
    """Verify the ARC chain of the message (RFC 8617 §5.2)."""

    name = "arc"
    default_timeout = 30.0

    def __init__(self, options: Mapping[str, Any] | None = None, service: Any = None) -> None:
        super().__init__(options, service)
        self.config = load_options(ARCOptions, self.options)
        self.resolver = resolver_for(service)
        self.threads = service.threads

    def message_job(self, session: Any, envelope: Any, message: Any) -> Any:
        """The chain verification, for the chain's one thread job per message."""
        if not message.header("ARC-Seal") or message.size > self.config.max_size:
            return None
        return functools.partial(verify_chain, message, self.resolver, self.config.min_key_bits)

    def check_message(self, session: Any, envelope: Any, message: Any) -> Any:
        results = results_for(session, envelope)
        if not message.header("ARC-Seal"):
            results.arc = MethodResult("arc", "none")
            return CONTINUE
        if message.size > self.config.max_size:
            results.arc = MethodResult("arc", "neutral", comment="message too large")
            return CONTINUE
        return self._verify(session, envelope, message, results)

    @defer.inlineCallbacks
    def _verify(self, session: Any, envelope: Any, message: Any, results: Any) -> Any:
        job = prepared(session, envelope, self.name)
        if job is None:
            job = self.threads.run(
                "crypto", verify_chain, message, self.resolver, self.config.min_key_bits
            )
        results.arc = yield job
        if results.arc.result != "fail":
            return CONTINUE
        reason = f"ARC chain failed: {results.arc.comment}"
        return outcome(
            self.config.fail, reason, (550, "5.7.29", reason), (), results.quarantine.append
        )
