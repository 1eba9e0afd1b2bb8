"""Spam traps block the client that wrote to them."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from mailserv.filters.base import Action
from mailserv.filters.common import connection_marks
from mailserv.filters.spamtrap import SpamtrapFilter


def test_trap_hit_blocks_the_client_for_a_while(plain_env: Any) -> None:
    clock = Clock()
    flt = SpamtrapFilter(
        {"addresses": ["trap@example.org", "@traps.example.org"], "block_for": "1h"},
        plain_env.service,
        clock=clock,
    )
    session = plain_env.session("192.0.2.1")
    envelope = plain_env.envelope("a@s.test", "bob@example.org", "Trap@Example.org")
    bob, trap = envelope.recipients
    assert flt.check_recipient(session, envelope, bob).action is Action.CONTINUE
    verdict = flt.check_recipient(session, envelope, trap)
    assert verdict.action is Action.REJECT and verdict.smtp_reply().code == 550
    assert connection_marks(session)["listed"] is True
    # The same client is now refused at connect and at every recipient.
    later = plain_env.session("192.0.2.1")
    verdict = flt.check_connect(later)
    assert verdict.action is Action.REJECT
    assert (verdict.smtp_reply().code, verdict.smtp_reply().enhanced) == (554, "5.7.1")
    assert flt.check_recipient(later, envelope, bob).action is Action.REJECT
    assert flt.check_connect(plain_env.session("192.0.2.2")).action is Action.CONTINUE
    clock.advance(3601)
    assert flt.check_connect(plain_env.session("192.0.2.1")).action is Action.CONTINUE


def test_trap_domains(plain_env: Any) -> None:
    flt = plain_env.build("spamtrap", addresses=["@traps.example.org"])
    envelope = plain_env.envelope("a@s.test", "anything@traps.example.org")
    session = plain_env.session("2001:db8::5")
    assert flt.check_recipient(session, envelope, envelope.recipients[0]).action is Action.REJECT
    # IPv6 clients are blocked by /64.
    assert flt.check_connect(plain_env.session("2001:db8::99")).action is Action.REJECT
