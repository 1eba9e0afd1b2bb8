"""SPF filter (RFC 7208) against the loopback DNS server."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from mailserv.errors import ConfigError
from mailserv.filters.base import Action
from mailserv.filters.common import results_for


@pytest_twisted.inlineCallbacks
def test_pass_adds_received_spf_and_records_result(filter_env: Any, dns_server: Any) -> Any:
    dns_server.set({"sender.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]}})
    flt = filter_env.build("spf", check_helo=False)
    session = filter_env.session("192.0.2.1")
    envelope = filter_env.envelope("alice@sender.test", "bob@example.org")
    verdict = yield flt.check_sender(session, envelope)
    assert verdict.action is Action.CONTINUE
    [(name, value)] = verdict.headers
    assert name == "Received-SPF"
    assert value.startswith("Pass (mx.example.org: domain of sender.test designates 192.0.2.1")
    assert "client-ip=192.0.2.1;" in value and "identity=mailfrom" in value
    results = results_for(session, envelope)
    assert results.spf_mailfrom == "pass" and results.spf_domain == "sender.test"
    assert results.spf[0].render() == ("spf=pass (sender SPF authorized) smtp.mailfrom=sender.test")


@pytest_twisted.inlineCallbacks
def test_fail_is_rejected_with_rfc7372_code(filter_env: Any, dns_server: Any) -> Any:
    dns_server.set({"sender.test": {"TXT": ["v=spf1 ip4:198.51.100.0/24 -all"]}})
    flt = filter_env.build("spf", check_helo=False)
    verdict = yield flt.check_sender(
        filter_env.session("192.0.2.1"), filter_env.envelope("a@sender.test")
    )
    assert verdict.action is Action.REJECT
    reply = verdict.smtp_reply()
    assert (reply.code, reply.enhanced) == (550, "5.7.23")


@pytest_twisted.inlineCallbacks
def test_softfail_is_tagged_by_default(filter_env: Any, dns_server: Any) -> Any:
    dns_server.set({"sender.test": {"TXT": ["v=spf1 ~all"]}})
    flt = filter_env.build("spf", check_helo=False)
    verdict = yield flt.check_sender(
        filter_env.session("192.0.2.1"), filter_env.envelope("a@sender.test")
    )
    assert verdict.action is Action.CONTINUE
    assert verdict.headers[0][1].startswith("SoftFail")


@pytest_twisted.inlineCallbacks
def test_more_than_ten_dns_terms_is_permerror(filter_env: Any, dns_server: Any) -> Any:
    # RFC 7208 §4.6.4: at most 10 terms that cause DNS queries.
    records: dict[str, Any] = {"sender.test": {"TXT": ["v=spf1 include:i0.sender.test -all"]}}
    for i in range(12):
        records[f"i{i}.sender.test"] = {"TXT": [f"v=spf1 include:i{i + 1}.sender.test -all"]}
    records["i12.sender.test"] = {"TXT": ["v=spf1 +all"]}
    dns_server.set(records)
    flt = filter_env.build("spf", check_helo=False, permerror="reject")
    session = filter_env.session("192.0.2.1")
    envelope = filter_env.envelope("a@sender.test")
    verdict = yield flt.check_sender(session, envelope)
    assert results_for(session, envelope).spf_mailfrom == "permerror"
    assert verdict.action is Action.REJECT
    assert verdict.smtp_reply().enhanced == "5.7.24"


@pytest_twisted.inlineCallbacks
def test_more_than_two_void_lookups_is_permerror(filter_env: Any, dns_server: Any) -> Any:
    dns_server.set(
        {"sender.test": {"TXT": ["v=spf1 a:v1.sender.test a:v2.sender.test a:v3.sender.test +all"]}}
    )
    flt = filter_env.build("spf", check_helo=False)
    session = filter_env.session("192.0.2.1")
    envelope = filter_env.envelope("a@sender.test")
    verdict = yield flt.check_sender(session, envelope)
    assert results_for(session, envelope).spf_mailfrom == "permerror"
    assert verdict.action is Action.CONTINUE  # permerror = "tag" by default
    assert verdict.headers[0][1].startswith("PermError")


@pytest_twisted.inlineCallbacks
def test_dns_timeout_is_temperror_and_tempfails(filter_env: Any, dns_server: Any) -> Any:
    dns_server.set({"sender.test": {"TIMEOUT": True}})
    flt = filter_env.build("spf", check_helo=False)
    verdict = yield flt.check_sender(
        filter_env.session("192.0.2.1"), filter_env.envelope("a@sender.test")
    )
    assert verdict.action is Action.TEMPFAIL
    reply = verdict.smtp_reply()
    assert (reply.code, reply.enhanced) == (451, "4.4.3")


@pytest_twisted.inlineCallbacks
def test_helo_identity_for_null_sender(filter_env: Any, dns_server: Any) -> Any:
    # RFC 7208 §2.4: with MAIL FROM:<> the identity is postmaster@helo.
    dns_server.set({"client.example.net": {"TXT": ["v=spf1 -all"]}})
    flt = filter_env.build("spf")
    session = filter_env.session("192.0.2.1", helo="client.example.net")
    envelope = filter_env.envelope(None)
    verdict = yield flt.check_sender(session, envelope)
    assert verdict.action is Action.REJECT
    results = results_for(session, envelope)
    assert results.spf[0].render().startswith("spf=fail")
    assert "smtp.helo=client.example.net" in results.spf[0].render()


@pytest_twisted.inlineCallbacks
def test_none_when_no_record_and_authenticated_sessions_skipped(
    filter_env: Any, dns_server: Any
) -> Any:
    dns_server.set({"sender.test": {"A": ["192.0.2.9"]}})
    flt = filter_env.build("spf", check_helo=False)
    session = filter_env.session("192.0.2.1")
    envelope = filter_env.envelope("a@sender.test")
    verdict = yield flt.check_sender(session, envelope)
    assert verdict.headers[0][1].startswith("None")
    assert results_for(session, envelope).spf_mailfrom == "none"
    session.auth_user = "alice"
    envelope2 = filter_env.envelope("a@sender.test")
    verdict = yield flt.check_sender(session, envelope2)
    assert verdict.headers == () and results_for(session, envelope2).spf == []


def test_bad_options_are_reported_with_dotted_keys(filter_env: Any) -> None:
    with pytest.raises(ConfigError) as info:
        filter_env.build("spf", fail="bounce", trusted_networks=["nonsense"], colour=1)
    keys = sorted(p.key for p in info.value.problems)
    assert keys == [
        "pipelines.inbound[0].colour",
        "pipelines.inbound[0].fail",
        "pipelines.inbound[0].trusted_networks[0]",
    ]


@pytest_twisted.inlineCallbacks
def test_recent_results_are_reused_briefly(filter_env: Any, dns_server: Any) -> Any:
    dns_server.set({"sender.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]}})
    cached = filter_env.build("spf", check_helo=False)
    uncached = filter_env.build("spf", check_helo=False, cache_for="0s")
    session = filter_env.session("192.0.2.1")
    for flt in (cached, uncached):
        verdict = yield flt.check_sender(session, filter_env.envelope("a@sender.test"))
        assert verdict.action is Action.CONTINUE
    dns_server.set({"sender.test": {"TXT": ["v=spf1 -all"]}})
    filter_env.service.dns.resolver.cache.flush()
    verdict = yield cached.check_sender(session, filter_env.envelope("a@sender.test"))
    assert verdict.action is Action.CONTINUE  # the same inputs within cache_for
    verdict = yield uncached.check_sender(session, filter_env.envelope("a@sender.test"))
    assert verdict.action is Action.REJECT
    verdict = yield cached.check_sender(session, filter_env.envelope("b@sender.test"))
    assert verdict.action is Action.REJECT  # another sender: evaluated afresh


@pytest_twisted.inlineCallbacks
def test_a_reused_result_is_a_verdict_at_once(filter_env: Any, dns_server: Any) -> Any:
    from mailserv.filters.base import Verdict

    dns_server.set({"sender.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]}})
    flt = filter_env.build("spf", check_helo=False)
    session = filter_env.session("192.0.2.1")
    envelope = filter_env.envelope("a@sender.test")
    first = yield flt.check_sender(session, envelope)
    first_results = [r.render() for r in results_for(session, envelope).spf]
    again_envelope = filter_env.envelope("a@sender.test")
    again = flt.check_sender(session, again_envelope)
    assert isinstance(again, Verdict)
    assert (again.action, again.headers) == (first.action, first.headers)
    assert [r.render() for r in results_for(session, again_envelope).spf] == first_results
    assert results_for(session, again_envelope).spf_mailfrom == "pass"
