"""The message submission policy (RFC 6409; ``protocol = "submission"``, 587 and 465).

AUTH is required before MAIL (§4.3 "MUST" for us); the envelope sender and
the From header must belong to the authenticated user: the login name, an
address the directory maps to that user, or an alias routed to that user
(``sender_login_match``, default on).  The MSA completes the message as
§8 asks: a Date and a Message-ID when missing, a Sender when the From has
several addresses.  No header of the client is ever dropped.
"""

from __future__ import annotations

import secrets
import time
from email.utils import formatdate
from typing import Any

from twisted.internet import defer

from mailserv.address import Address, parse_header_addresses
from mailserv.envelope import Envelope, Message, Session
from mailserv.errors import SMTPReply
from mailserv.filters.policy import RecipientExists, RelayControl

NOT_OWNER = SMTPReply(553, "5.7.1", "Sender address rejected: not owned by the authenticated user")
FROM_NOT_OWNER = SMTPReply(550, "5.7.1", "From header address not owned by the authenticated user")


class SubmissionPolicy:
    """Policy hooks of a submission listener."""

    require_auth = True
    default_pipeline = "outbound"

    def __init__(self, service: Any, sender_login_match: bool = True) -> None:
        self.service = service
        self.sender_login_match = sender_login_match
        self.hostname = service.config.hostname

    def builtin_filters(self) -> list[Any]:
        return [
            RelayControl({"allow_authenticated": True}, self.service),
            RecipientExists({}, self.service),
        ]

    @defer.inlineCallbacks
    def owns(self, user: str, address: Address) -> Any:
        """Deferred[bool]: may ``user`` send as ``address``?"""
        if address.key == user.lower():
            return True
        found = yield self.service.directory.lookup(address.key)
        if found is not None:
            return bool(found.name == user)
        router = self.service.router
        if router.is_local(address):
            route = yield router.resolve(address)
            if route is not None and route.local and not route.remote:
                return all(t.user.name == user for t in route.local)
        return False

    @defer.inlineCallbacks
    def check_sender(self, session: Session, envelope: Envelope) -> Any:
        if not self.sender_login_match or envelope.mail_from is None:
            return None
        assert session.auth_user is not None
        ok = yield self.owns(session.auth_user, envelope.mail_from)
        return None if ok else NOT_OWNER

    @defer.inlineCallbacks
    def check_message(self, session: Session, envelope: Envelope, message: Message) -> Any:
        froms: list[Address] = []
        from_headers = message.header("From")
        for value in from_headers:
            froms.extend(parse_header_addresses(_text(value)))
        if self.sender_login_match and session.auth_user is not None:
            if from_headers and not froms:
                return FROM_NOT_OWNER
            for address in froms:
                ok = yield self.owns(session.auth_user, address)
                if not ok:
                    return FROM_NOT_OWNER
        added = envelope.msa_headers
        if not message.header("Date"):
            added.append(("Date", formatdate(time.time(), localtime=False)))
        if not message.header("Message-ID"):
            added.append(("Message-ID", f"<{secrets.token_hex(12)}@{self.hostname}>"))
        if len(froms) > 1 and not message.header("Sender"):
            sender = envelope.mail_from or froms[0]
            added.append(("Sender", str(sender)))
        return None


def _text(value: bytes) -> str:
    return value.replace(b"\r\n", b"").decode("utf-8", "replace")
