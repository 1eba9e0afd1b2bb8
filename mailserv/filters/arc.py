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
from zope.interface import implementer

from mailserv.config.schema import Section, integer, option, size
from mailserv.filters.base import CONTINUE, FilterBase
from mailserv.filters.common import (
    Job,
    MethodResult,
    NeedsThread,
    action_kind,
    clean,
    load_options,
    outcome,
    prepared,
    resolver_for,
    results_for,
    then,
)
from mailserv.filters.dkim import check_inline, txt_lookup
from mailserv.interfaces import IMessageFilter

# At most this many ARC sets are verified on the reactor: each costs two signature checks.
INLINE_SETS = 3


class ARCOptions(Section):
    """Keys of ``filter = "arc"``."""

    max_size: int = option(size, 20 * 1024 * 1024)
    min_key_bits: int = option(integer(512, 16384), 1024)
    fail: str = option(action_kind, "ignore")


def verify_chain(
    message: Any, resolver: Any, min_key_bits: int, deadline: float | None = None
) -> MethodResult:
    """Blocking ARC verification of the received message.

    ``deadline`` (time.monotonic): an inline attempt on the reactor, for a
    small message in memory with at most INLINE_SETS sets whose keys are
    cached and cheap to verify with, and whose h= tags cost little to resolve
    (the bounds that keep it well under the chain's budget; common.run_inline
    starts it only before ``deadline``); it raises NeedsThread otherwise.
    """
    inline = deadline is not None
    if inline:
        check_inline(message, "ARC-Message-Signature", INLINE_SETS + 1)
    with message.open() as f:
        raw = f.read()
    state: dict[str, Any] = {}
    arc = dkim.ARC(raw, minkey=min_key_bits)
    if inline and sum(1 for name, _ in arc.headers if name.lower() == b"arc-seal") > INLINE_SETS:
        raise NeedsThread("too many ARC sets to verify on the reactor")
    try:
        cv, sets, comment = arc.verify(dnsfunc=txt_lookup(resolver, state, inline=inline))
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
        """The chain verification, for the chain's jobs of the message (common.start_jobs):
        on the reactor when the message is small and the keys are cached, else in the pool."""
        if not message.header("ARC-Seal") or message.size > self.config.max_size:
            return None
        verify = functools.partial(verify_chain, message, self.resolver, self.config.min_key_bits)
        return Job(verify, verify)  # inline: called with its deadline

    def check_message(self, session: Any, envelope: Any, message: Any) -> Any:
        results = results_for(session, envelope)
        if not message.header("ARC-Seal"):
            results.arc = MethodResult("arc", "none")
            return CONTINUE
        if message.size > self.config.max_size:
            results.arc = MethodResult("arc", "neutral", comment="message too large")
            return CONTINUE
        return self._verify(session, envelope, message, results)

    def _verify(self, session: Any, envelope: Any, message: Any, results: Any) -> Any:
        job = prepared(session, envelope, self.name)
        if job is None:
            job = self.threads.run(
                "crypto", verify_chain, message, self.resolver, self.config.min_key_bits
            )
        return then(job, self._verdict, results)

    def _verdict(self, arc: MethodResult, results: Any) -> Any:
        results.arc = arc
        if arc.result != "fail":
            return CONTINUE
        reason = f"ARC chain failed: {arc.comment}"
        return outcome(
            self.config.fail, reason, (550, "5.7.29", reason), (), results.quarantine.append
        )
