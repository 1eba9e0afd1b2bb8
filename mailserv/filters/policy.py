"""The first filters every MX needs: relay control, recipient existence, size.

The MX listener always runs ``relay`` and ``recipient`` before the filters of
its configured pipeline; a pipeline may use them (and ``size``) explicitly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from mailserv.address import AddressError, normalise_domain
from mailserv.errors import SMTPReply
from mailserv.filters.base import CONTINUE, FilterBase, Verdict
from mailserv.interfaces import IMessageFilter, IRecipientFilter, ISenderFilter

RELAY_DENIED = SMTPReply(554, "5.7.1", "Relay access denied")
UNKNOWN_USER = SMTPReply(550, "5.1.1", "Recipient address rejected: user unknown")

# Characters that other MTAs interpret as routing inside a local part
# (percent hack, bang paths, quoted "user@host"): never accepted for us.
_ROUTING_CHARS = frozenset("%!@")


class _DomainsOf:
    """The local domains of ``service.config``, recomputed when the service reloads."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self._config: Any = None
        self._domains: frozenset[str] = frozenset()

    def get(self) -> frozenset[str]:
        config = self.service.config
        if config is not self._config:
            self._config, self._domains = config, local_domains(config)
        return self._domains


def local_domains(config: Any) -> frozenset[str]:
    """The configured local domains in A-label lower-case form."""
    out = set()
    for domain in getattr(config, "domains", ()):
        try:
            out.add(normalise_domain(domain)[0])
        except AddressError:
            out.add(domain.lower())
    return frozenset(out)


@implementer(IRecipientFilter)
class RelayControl(FilterBase):
    """Refuse recipients outside the local domains, unless the session authenticated.

    Options: ``allow_authenticated`` (default false on the MX; submission uses true).
    Address literals and routing characters in local parts are always refused
    for unauthenticated sessions (RFC 5321 §3.6.1, §4.1.1.3; "open relay tricks").
    """

    name = "relay"

    def __init__(self, options: Mapping[str, Any] | None = None, service: Any = None) -> None:
        super().__init__(options, service)
        self.allow_authenticated = bool(self.options.pop("allow_authenticated", False))
        domains = self.options.pop("domains", None)
        self._static = (
            frozenset(normalise_domain(d)[0] for d in domains) if domains is not None else None
        )
        self._dynamic = _DomainsOf(service)
        if self.options:
            raise ValueError(f"unknown options {sorted(self.options)}")

    def check_recipient(
        self, session: Any, envelope: Any, rcpt: Any
    ) -> Verdict | defer.Deferred[Verdict]:
        address = rcpt.address
        if self.allow_authenticated and session.auth_user is not None:
            return CONTINUE
        domains = self._static if self._static is not None else self._dynamic.get()
        if _ROUTING_CHARS & set(address.local):
            return Verdict.reject(
                RELAY_DENIED.code, RELAY_DENIED.enhanced, RELAY_DENIED.text, "routing in local part"
            )
        if address.domain not in domains:
            recent = getattr(self.service, "pop_before_smtp", None)
            if recent is not None:
                # POP-before-SMTP: a recent POP3/IMAP login from this address may relay.
                d = defer.maybeDeferred(recent.allowed, session.peer_host)
                return d.addCallback(lambda ok: CONTINUE if ok else _relay_denied())
            return _relay_denied()
        return CONTINUE


def _relay_denied() -> Verdict:
    return Verdict.reject(RELAY_DENIED.code, RELAY_DENIED.enhanced, RELAY_DENIED.text, "relay")


@implementer(IRecipientFilter)
class RecipientExists(FilterBase):
    """Check local recipients against the router (directory, aliases, catch-all).

    The route found is kept on the recipient for the delivery.  Unknown users
    get ``550 5.1.1`` and nothing more (no hint about which part is wrong).
    """

    name = "recipient"

    def __init__(self, options: Mapping[str, Any] | None = None, service: Any = None) -> None:
        super().__init__(options, service)
        self.router = self.options.pop("router", None) or service.router
        self._domains = _DomainsOf(service)

    @defer.inlineCallbacks
    def check_recipient(self, session: Any, envelope: Any, rcpt: Any) -> Any:
        if rcpt.address.domain not in self._domains.get():
            return CONTINUE
        route = yield self.router.resolve(rcpt.address)
        if route is None:
            return Verdict.reject(
                UNKNOWN_USER.code, UNKNOWN_USER.enhanced, UNKNOWN_USER.text, "unknown user"
            )
        rcpt.route = route
        return CONTINUE


@implementer(ISenderFilter, IMessageFilter)
class MessageSize(FilterBase):
    """A pipeline-specific size limit (RFC 1870): at MAIL (SIZE=) and after the data."""

    name = "size"

    def __init__(self, options: Mapping[str, Any] | None = None, service: Any = None) -> None:
        super().__init__(options, service)
        from mailserv.config.schema import parse_size

        raw = self.options.pop("max_size")
        self.max_size = parse_size(raw) if isinstance(raw, str) else int(raw)
        if self.options:
            raise ValueError(f"unknown options {sorted(self.options)}")

    def _too_big(self) -> Verdict:
        return Verdict.reject(552, "5.3.4", "Message size exceeds fixed limit", "size")

    def check_sender(self, session: Any, envelope: Any) -> Verdict:
        if envelope.size is not None and envelope.size > self.max_size:
            return self._too_big()
        return CONTINUE

    def check_message(self, session: Any, envelope: Any, message: Any) -> Verdict:
        return self._too_big() if message.size > self.max_size else CONTINUE
