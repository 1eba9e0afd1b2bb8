"""DNSBL filter (RFC 5782) against blocklist zones served by the loopback DNS server."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from mailserv.address import parse_mailbox
from mailserv.envelope import Recipient
from mailserv.errors import ConfigError
from mailserv.filters.base import Action
from mailserv.filters.common import connection_marks, results_for
from mailserv.filters.dnsbl import reversed_name

V6 = "2001:db8::1"
V6_NAME = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"


def listed(zone: str, name: str, code: str = "127.0.0.2", reason: str | None = None) -> dict:
    records: dict[str, Any] = {"A": [code]}
    if reason:
        records["TXT"] = [reason]
    return {f"{name}.{zone}": records}


def rcpt(address: str) -> Recipient:
    return Recipient(parse_mailbox(address))


@pytest_twisted.inlineCallbacks
def at_rcpt(env: Any, peer: str, to: str = "bob@example.org", **options: Any) -> Any:
    flt = env.build("dnsbl", **options)
    session = env.session(peer)
    yield flt.check_connect(session)
    envelope = env.envelope("a@sender.test", to)
    verdict = yield flt.check_recipient(session, envelope, rcpt(to))
    return verdict, session


def test_reversed_names() -> None:
    assert reversed_name("192.0.2.99") == "99.2.0.192"
    assert reversed_name("::ffff:192.0.2.99") == "99.2.0.192"
    assert reversed_name(V6) == V6_NAME
    assert reversed_name("not an address") is None


@pytest_twisted.inlineCallbacks
def test_listed_ipv4_client_rejected_at_rcpt_with_txt_reason(
    filter_env: Any, dns_server: Any
) -> Any:
    dns_server.set(listed("zen.example.test", "2.2.0.192", reason="Listed: spam source"))
    verdict, session = yield at_rcpt(filter_env, "192.0.2.2", zones=["zen.example.test"])
    assert verdict.action is Action.REJECT
    reply = verdict.smtp_reply()
    assert (reply.code, reply.enhanced) == (554, "5.7.1")
    assert reply.text == (
        "Client host [192.0.2.2] blocked using zen.example.test; Listed: spam source"
    )
    assert connection_marks(session)["listed"] is True
    # postmaster@ stays reachable (RFC 5321 §4.5.1).
    verdict, _ = yield at_rcpt(
        filter_env, "192.0.2.2", "postmaster@example.org", zones=["zen.example.test"]
    )
    assert verdict.action is Action.CONTINUE


@pytest_twisted.inlineCallbacks
def test_ipv6_nibble_lookup(filter_env: Any, dns_server: Any) -> Any:
    dns_server.set(listed("v6.example.test", V6_NAME))
    verdict, _ = yield at_rcpt(filter_env, V6, zones=["v6.example.test"])
    assert verdict.action is Action.REJECT
    verdict, _ = yield at_rcpt(filter_env, V6, zones=["v6.example.test"], ipv6=False)
    assert verdict.action is Action.CONTINUE


@pytest_twisted.inlineCallbacks
def test_return_codes_weights_and_threshold(filter_env: Any, dns_server: Any) -> Any:
    dns_server.set(
        {
            **listed("a.example.test", "2.2.0.192", "127.0.0.2"),
            **listed("b.example.test", "2.2.0.192", "127.0.0.10"),
            **listed("c.example.test", "2.2.0.192", "127.255.255.254"),  # query refused
        }
    )
    zones = [
        {"zone": "a.example.test", "weight": 1},
        {"zone": "b.example.test", "weight": 1, "codes": ["127.0.0.4/30"]},
        "c.example.test",
    ]
    verdict, _ = yield at_rcpt(filter_env, "192.0.2.2", zones=zones, threshold=2)
    assert verdict.action is Action.CONTINUE  # b's code is filtered out, c's is an error code
    zones[1]["codes"] = ["127.0.0.8/29"]
    verdict, _ = yield at_rcpt(filter_env, "192.0.2.2", zones=zones, threshold=2)
    assert verdict.action is Action.REJECT
    verdict, _ = yield at_rcpt(filter_env, "192.0.2.3", zones=zones, threshold=1)
    assert verdict.action is Action.CONTINUE  # not listed anywhere


@pytest_twisted.inlineCallbacks
def test_timeouts_ignored_or_tempfail(filter_env: Any, dns_server: Any) -> Any:
    dns_server.set({"2.2.0.192.slow.example.test": {"TIMEOUT": True}})
    verdict, _ = yield at_rcpt(filter_env, "192.0.2.2", zones=["slow.example.test"])
    assert verdict.action is Action.CONTINUE
    verdict, _ = yield at_rcpt(
        filter_env, "192.0.2.2", zones=["slow.example.test"], on_dns_error="tempfail"
    )
    assert verdict.action is Action.TEMPFAIL and verdict.smtp_reply().code == 451


@pytest_twisted.inlineCallbacks
def test_connect_stage_and_allowlist(filter_env: Any, dns_server: Any) -> Any:
    dns_server.set(listed("zen.example.test", "2.2.0.192"))
    flt = filter_env.build("dnsbl", zones=["zen.example.test"], stage="connect")
    verdict = yield flt.check_connect(filter_env.session("192.0.2.2"))
    assert verdict.action is Action.REJECT
    flt = filter_env.build(
        "dnsbl", zones=["zen.example.test"], stage="connect", allowlist=["192.0.2.0/24"]
    )
    verdict = yield flt.check_connect(filter_env.session("192.0.2.2"))
    assert verdict.action is Action.CONTINUE


@pytest_twisted.inlineCallbacks
def test_tag_and_quarantine_with_the_message(filter_env: Any, dns_server: Any) -> Any:
    dns_server.set(listed("zen.example.test", "2.2.0.192"))
    for action in ("tag", "quarantine"):
        flt = filter_env.build("dnsbl", zones=["zen.example.test"], action=action)
        session = filter_env.session("192.0.2.2")
        yield flt.check_connect(session)
        envelope = filter_env.envelope("a@sender.test", "bob@example.org")
        verdict = yield flt.check_recipient(session, envelope, envelope.recipients[0])
        assert verdict.action is Action.CONTINUE
        verdict = yield flt.check_message(session, envelope, None)
        assert verdict.action is Action.CONTINUE
        assert verdict.headers == (
            ("X-Mailserv-DNSBL", "client 192.0.2.2 listed in zen.example.test (127.0.0.2)"),
        )
        quarantined = results_for(session, envelope).quarantine
        assert quarantined == ([] if action == "tag" else [verdict.headers[0][1]])


def test_zone_options_are_validated(filter_env: Any) -> None:
    with pytest.raises(ConfigError) as info:
        filter_env.build("dnsbl", zones=["ok.test", {"zone": "x.test", "weight": "2"}, 5])
    assert sorted(p.key for p in info.value.problems) == [
        "pipelines.inbound[0].zones[1]",
        "pipelines.inbound[0].zones[1].weight",
        "pipelines.inbound[0].zones[2]",
    ]
    with pytest.raises(ConfigError) as info:
        filter_env.build("dnsbl")
    assert [p.key for p in info.value.problems] == ["pipelines.inbound[0].zones"]
