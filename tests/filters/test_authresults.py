"""Authentication-Results (RFC 8601) from a real chain of spf, dkim, dmarc and authresults."""

from __future__ import annotations

from typing import Any

import pytest_twisted

from mailserv.filters.authresults import claimed_authserv_id, render
from mailserv.filters.base import Action
from mailserv.filters.registry import chain_of
from tests.filters.conftest import crlf

MESSAGE = (
    "From: Alice <alice@sender.test>\n"
    "To: bob@example.org\n"
    "Subject: hello\n"
    "Date: Wed, 25 Nov 2026 10:00:00 +0000\n"
    "Message-ID: <1@sender.test>\n"
    "\n"
    "Hello Bob.\n"
)


def test_authserv_id_of_a_value() -> None:
    assert claimed_authserv_id(b"mx.example.org; spf=pass") == "mx.example.org"
    assert claimed_authserv_id(b" (c (nested)) MX.Example.Org. 1 ; none") == "mx.example.org"
    assert claimed_authserv_id(b"") == ""
    assert render("mx.example.org", []) == "mx.example.org; none"


@pytest_twisted.inlineCallbacks
def test_chain_adds_one_header_with_every_result(
    filter_env: Any, dns_server: Any, dkim_keys: Any
) -> Any:
    from twisted.internet import reactor

    dns_server.set(
        {
            **dkim_keys.records("sender.test"),
            "sender.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
            "_dmarc.sender.test": {"TXT": ["v=DMARC1; p=reject"]},
        }
    )
    env = filter_env
    chain = chain_of(
        [env.build(n) for n in ("spf", "dkim", "dmarc", "authresults")], reactor, "inbound"
    )
    session = env.session("192.0.2.7", helo="mail.sender.test")
    envelope = env.envelope("alice@sender.test", "bob@example.org")
    sender = yield chain.sender(session, envelope)
    assert [h[0] for h in sender.headers] == ["Received-SPF"]
    forged = "Authentication-Results: mx.example.org; dkim=pass header.d=bank.test\n"
    raw = dkim_keys.sign(crlf(MESSAGE), "sender.test", "ed25519")
    message = env.message(crlf(forged) + raw)
    result = yield chain.message(session, envelope, message)
    assert result.verdict.action is Action.CONTINUE
    [(name, value)] = result.headers
    assert name == "Authentication-Results"
    lines = value.split(";\r\n\t")
    assert lines[0] == "mx.example.org"
    assert lines[1] == "spf=none smtp.helo=mail.sender.test"
    assert lines[2] == "spf=pass (sender SPF authorized) smtp.mailfrom=sender.test"
    assert lines[3].startswith("dkim=pass (ed25519 key) header.d=sender.test header.i=@sender.test")
    assert lines[4] == "dmarc=pass (p=reject sp=reject dis=none) header.from=sender.test"
    # The forged field claiming our authserv-id is gone; the signature still verifies.
    assert open(message.path, "rb").read() == raw
