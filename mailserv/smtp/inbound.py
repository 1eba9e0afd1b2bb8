"""The MX policy (``protocol = "smtp"``): mail for the local domains only.

Relay control and recipient existence run as the first filters of the
chain (mailserv/filters/policy.py), before the configured pipeline; no
authentication opens relaying on the MX (use submission for that).
"""

from __future__ import annotations

from typing import Any

from mailserv.envelope import Envelope, Message, Session
from mailserv.errors import SMTPReply
from mailserv.filters.policy import RecipientExists, RelayControl


class InboundPolicy:
    """Policy hooks of the MX listener."""

    require_auth = False
    default_pipeline = "inbound"

    def __init__(self, service: Any) -> None:
        self.service = service

    def builtin_filters(self) -> list[Any]:
        return [
            RelayControl({"allow_authenticated": False}, self.service),
            RecipientExists({}, self.service),
        ]

    def check_sender(self, session: Session, envelope: Envelope) -> SMTPReply | None:
        return None

    def check_message(
        self, session: Session, envelope: Envelope, message: Message
    ) -> SMTPReply | None:
        return None
