"""Quarantine: reasons recorded by filters become one QUARANTINE verdict with a header."""

from __future__ import annotations

from typing import Any

import pytest_twisted

from mailserv.filters.base import Action
from mailserv.filters.quarantine import QuarantineFilter
from mailserv.filters.registry import build_pipeline
from tests.filters.conftest import crlf


@pytest_twisted.inlineCallbacks
def test_registry_appends_quarantine_and_the_chain_quarantines(
    filter_env: Any, dns_server: Any
) -> Any:
    from twisted.internet import reactor

    from mailserv.config import parse_config
    from tests.filters.conftest import CONFIG

    text = CONFIG.format(state=filter_env.tmp_path / "state", port=dns_server.port) + (
        '[[pipelines.inbound]]\nfilter = "dnsbl"\nzones = ["zen.example.test"]\n'
        'action = "quarantine"\n'
        '[[pipelines.inbound]]\nfilter = "rules"\nbody_checks = ["/money/ WARN"]\n'
    )
    filter_env.service.config = parse_config(text)
    chain = build_pipeline("inbound", filter_env.service, reactor)
    assert [f.name for f in chain.filters] == ["dnsbl", "rules", "quarantine"]
    dns_server.set({"2.2.0.192.zen.example.test": {"A": ["127.0.0.2"]}})
    session = filter_env.session("192.0.2.2")
    yield chain.connect(session)
    envelope = filter_env.envelope("a@s.test", "bob@example.org")
    message = filter_env.message(crlf("From: a@s.test\nDate: x\n\nmoney\n"))
    result = yield chain.message(session, envelope, message)
    assert result.verdict.action is Action.QUARANTINE
    reason = "client 192.0.2.2 listed in zen.example.test (127.0.0.2)"
    assert result.verdict.reason == reason
    assert ("X-Mailserv-Quarantine", reason) in result.headers
    assert ("X-Mailserv-DNSBL", reason) in result.headers
    # A clean client's message is not quarantined.
    session = filter_env.session("192.0.2.3")
    yield chain.connect(session)
    result = yield chain.message(session, filter_env.envelope("a@s.test", "b@example.org"), message)
    assert result.verdict.action is Action.CONTINUE


def test_no_reasons_no_verdict(filter_env: Any) -> None:
    flt = QuarantineFilter({}, filter_env.service)
    envelope = filter_env.envelope("a@s.test", "b@example.org")
    assert flt.check_message(filter_env.session(), envelope, None).action is Action.CONTINUE
