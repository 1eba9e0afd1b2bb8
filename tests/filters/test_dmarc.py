"""DMARC filter (RFC 7489) with real SPF and DKIM results from the loopback DNS server."""

from __future__ import annotations

import random
from typing import Any

import pytest_twisted

from mailserv.filters.base import Action
from mailserv.filters.common import results_for
from mailserv.filters.dmarc import DMARCFilter, aligned, organizational_domain, parse_record
from tests.filters.conftest import crlf


def message(from_header: str) -> bytes:
    return crlf(
        f"From: {from_header}\n"
        "To: bob@example.org\n"
        "Subject: hello\n"
        "Date: Wed, 25 Nov 2026 10:00:00 +0000\n"
        "Message-ID: <1@sender.test>\n"
        "\n"
        "Hello Bob.\n"
    )


@pytest_twisted.inlineCallbacks
def evaluate(env: Any, raw: bytes, sender: str, dmarc: Any = None, **options: Any) -> Any:
    session = env.session("192.0.2.1", helo=None)
    envelope = env.envelope(sender, "bob@example.org")
    yield env.build("spf").check_sender(session, envelope)
    msg = env.message(raw)
    yield env.build("dkim").check_message(session, envelope, msg)
    flt = dmarc or env.build("dmarc", **options)
    verdict = yield flt.check_message(session, envelope, msg)
    return verdict, results_for(session, envelope)


def test_organizational_domain_from_the_public_suffix_list() -> None:
    assert organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert organizational_domain("mail.example.com") == "example.com"
    assert organizational_domain("co.uk") == "co.uk"
    assert organizational_domain("x.sender.test") == "sender.test"
    assert aligned("mail.example.com", "example.com", "r")
    assert not aligned("mail.example.com", "example.com", "s")
    assert not aligned("example.co.uk", "other.co.uk", "r")


def test_record_parsing() -> None:
    policy = parse_record("v=DMARC1; p=reject; sp=none; pct=50; adkim=s", "x.test")
    assert policy is not None
    assert (policy.p, policy.sp, policy.pct, policy.adkim, policy.aspf) == (
        "reject",
        "none",
        50,
        "s",
        "r",
    )
    assert parse_record("v=DMARC1; p=bogus", "x.test") is None
    assert parse_record("v=DMARC1; p=bogus; rua=mailto:a@x.test", "x.test").p == "none"  # type: ignore[union-attr]
    assert parse_record("v=spf1 -all", "x.test") is None


@pytest_twisted.inlineCallbacks
def test_aligned_dkim_passes(filter_env: Any, dns_server: Any, dkim_keys: Any) -> Any:
    dns_server.set(
        {
            **dkim_keys.records("mail.sender.test"),
            "_dmarc.sender.test": {"TXT": ["v=DMARC1; p=reject"]},
        }
    )
    raw = dkim_keys.sign(message("a@sender.test"), "mail.sender.test", "ed25519")
    verdict, results = yield evaluate(filter_env, raw, "bounce@elsewhere.test")
    assert verdict.action is Action.CONTINUE
    assert results.dmarc.render() == (
        "dmarc=pass (p=reject sp=reject dis=none) header.from=sender.test"
    )


@pytest_twisted.inlineCallbacks
def test_aligned_spf_passes(filter_env: Any, dns_server: Any) -> Any:
    dns_server.set(
        {
            "bounces.sender.test": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
            "_dmarc.sender.test": {"TXT": ["v=DMARC1; p=reject"]},
        }
    )
    verdict, results = yield evaluate(filter_env, message("a@sender.test"), "x@bounces.sender.test")
    assert verdict.action is Action.CONTINUE
    assert results.dmarc.result == "pass"


@pytest_twisted.inlineCallbacks
def test_unaligned_is_rejected_by_p_reject(filter_env: Any, dns_server: Any, dkim_keys: Any) -> Any:
    dns_server.set(
        {
            **dkim_keys.records("other.test"),
            "other.test": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
            "_dmarc.sender.test": {"TXT": ["v=DMARC1; p=reject"]},
        }
    )
    raw = dkim_keys.sign(message("Boss <ceo@sender.test>"), "other.test", "rsa")
    verdict, results = yield evaluate(filter_env, raw, "x@other.test")
    assert results.spf_mailfrom == "pass" and results.dkim_pass_domains == ["other.test"]
    assert verdict.action is Action.REJECT
    assert verdict.smtp_reply().code == 550
    assert results.dmarc.render().startswith("dmarc=fail (p=reject sp=reject dis=reject)")


@pytest_twisted.inlineCallbacks
def test_subdomain_policy_from_organizational_domain(filter_env: Any, dns_server: Any) -> Any:
    dns_server.set({"_dmarc.sender.test": {"TXT": ["v=DMARC1; p=none; sp=quarantine"]}})
    verdict, results = yield evaluate(filter_env, message("a@news.sender.test"), "x@other.test")
    assert verdict.action is Action.CONTINUE  # quarantine is recorded, not a final verdict
    assert results.quarantine == ["DMARC policy of news.sender.test is quarantine"]
    verdict, results = yield evaluate(filter_env, message("a@sender.test"), "x@other.test")
    assert results.quarantine == [] and "dis=none" in results.dmarc.comment


@pytest_twisted.inlineCallbacks
def test_strict_dkim_alignment(filter_env: Any, dns_server: Any, dkim_keys: Any) -> Any:
    dns_server.set(
        {
            **dkim_keys.records("mail.sender.test"),
            "_dmarc.sender.test": {"TXT": ["v=DMARC1; p=reject; adkim=s"]},
        }
    )
    raw = dkim_keys.sign(message("a@sender.test"), "mail.sender.test", "ed25519")
    verdict, _results = yield evaluate(filter_env, raw, "x@other.test")
    assert verdict.action is Action.REJECT


@pytest_twisted.inlineCallbacks
def test_pct_sampling_applies_the_weaker_policy(filter_env: Any, dns_server: Any) -> Any:
    dns_server.set({"_dmarc.sender.test": {"TXT": ["v=DMARC1; p=reject; pct=50"]}})

    class Fixed(random.Random):
        def __init__(self, value: int) -> None:
            super().__init__()
            self.value = value

        def randrange(self, *args: Any, **kw: Any) -> int:  # type: ignore[override]
            return self.value

    out = DMARCFilter({}, filter_env.service, rng=Fixed(75))
    verdict, results = yield evaluate(filter_env, message("a@sender.test"), "x@o.test", out)
    assert verdict.action is Action.CONTINUE and "dis=quarantine" in results.dmarc.comment
    inside = DMARCFilter({}, filter_env.service, rng=Fixed(10))
    verdict, results = yield evaluate(filter_env, message("a@sender.test"), "x@o.test", inside)
    assert verdict.action is Action.REJECT


@pytest_twisted.inlineCallbacks
def test_none_permerror_and_temperror(filter_env: Any, dns_server: Any) -> Any:
    dns_server.set({"_dmarc.slow.test": {"TIMEOUT": True}})
    _verdict, results = yield evaluate(filter_env, message("a@sender.test"), "x@o.test")
    assert results.dmarc.render() == "dmarc=none header.from=sender.test"
    raw = message("a@sender.test, b@other.test")
    _verdict, results = yield evaluate(filter_env, raw, "x@o.test", permerror="reject")
    assert results.dmarc.result == "permerror" and _verdict.action is Action.REJECT
    verdict, results = yield evaluate(filter_env, message("a@slow.test"), "x@o.test")
    assert results.dmarc.result == "temperror"
    assert verdict.action is Action.TEMPFAIL and verdict.smtp_reply().code == 451


@pytest_twisted.inlineCallbacks
def test_authenticated_sessions_and_loopback_are_not_judged(
    filter_env: Any, dns_server: Any
) -> Any:
    dns_server.set(
        {
            "_dmarc.sender.test": {"TXT": ["v=DMARC1; p=reject"]},
            "sender.test": {"TXT": ["v=spf1 -all"]},
        }
    )
    session = filter_env.session("192.0.2.1", helo=None)
    session.auth_user = "alice"
    envelope = filter_env.envelope("a@sender.test", "bob@example.org")
    verdict = yield filter_env.build("dmarc").check_message(
        session, envelope, filter_env.message(message("a@sender.test"))
    )
    assert verdict.action is Action.CONTINUE and results_for(session, envelope).dmarc is None
    # SPF is not evaluated for mail from this host itself.
    local = filter_env.session("127.0.0.1", helo=None)
    verdict = yield filter_env.build("spf").check_sender(local, envelope)
    assert verdict.action is Action.CONTINUE and verdict.headers == ()


def test_from_domain_fast_path_agrees_with_the_rfc5322_parser() -> None:
    from mailserv.envelope import Message
    from mailserv.filters import dmarc

    simple = [
        " Alice <alice@sender.test>",
        "alice@Sender.Test",
        " Bob Smith <bob.smith+x@mail.example.co.uk> ",
        "<a@b.test>",
        "Alice<a@b.test>",
    ]
    other = [
        "a@b.test, c@d.test",
        ' "Quoted, Name" <q@quoted.test>',
        " Alice <alice@sender.test> (comment)",
        "Eve <eve@evil.test>  <x@y.test>",
        "undisclosed-recipients:;",
        "Bad <a@-bad.test>",
        "x@y",
        "A <a@b.test",
        "a..b@c.test",
    ]
    for value in simple + other:
        assert (dmarc._SIMPLE_FROM.fullmatch(value) is not None) == (value in simple), value
        message = Message(None, 1, [("From", value.encode())])
        assert dmarc.from_domain(message) == dmarc._parsed_from_domain(value), value


@pytest_twisted.inlineCallbacks
def test_the_policy_lookup_starts_with_the_message_stage(
    filter_env: Any, dns_server: Any, dkim_keys: Any
) -> Any:
    """``prefetch`` (called by the chain before the first message filter, beside the DKIM
    key's lookup) starts the policy lookup; check_message takes that answer instead of
    asking again after DKIM and ARC are done."""
    from twisted.internet import defer

    dns_server.set({"_dmarc.prefetch.test": {"TXT": ["v=DMARC1; p=reject"]}})
    session = filter_env.session("192.0.2.1", helo=None)
    envelope = filter_env.envelope("bounce@elsewhere.test", "bob@example.org")
    msg = filter_env.message(message("a@prefetch.test"))
    flt = filter_env.build("dmarc")
    flt.resolver.plain.cache = None  # every lookup goes to the server (cache_size = 0)
    flt.prefetch(session, envelope, msg)
    yield deferLater_ms(50)  # the answer has arrived
    dns_server.set({"_dmarc.prefetch.test": {"TXT": ["v=DMARC1; p=none"]}})
    verdict = yield defer.maybeDeferred(flt.check_message, session, envelope, msg)
    assert verdict.action is Action.REJECT  # the prefetched policy, not a second lookup
    assert results_for(session, envelope).dmarc.render().startswith("dmarc=fail (p=reject")
    # The next message of the session looks the policy up again.
    envelope2 = filter_env.envelope("bounce@elsewhere.test", "bob@example.org")
    verdict = yield defer.maybeDeferred(flt.check_message, session, envelope2, msg)
    assert verdict.action is Action.CONTINUE  # p=none


@pytest_twisted.inlineCallbacks
def test_a_prefetched_lookup_that_failed_is_a_temperror(filter_env: Any) -> Any:
    """A policy lookup started by ``prefetch`` that has already failed when check_message
    runs gives the same temperror as a lookup that fails in check_message."""
    from twisted.internet import defer

    from mailserv.errors import TemporaryFailure

    flt = filter_env.build("dmarc")
    flt.discover = lambda domain: defer.fail(TemporaryFailure("SERVFAIL"))
    session = filter_env.session("192.0.2.1", helo=None)
    envelope = filter_env.envelope("bounce@elsewhere.test", "bob@example.org")
    msg = filter_env.message(message("a@prefetch.test"))
    flt.prefetch(session, envelope, msg)
    verdict = yield defer.maybeDeferred(flt.check_message, session, envelope, msg)
    assert verdict.action is Action.TEMPFAIL
    assert results_for(session, envelope).dmarc.render().startswith("dmarc=temperror")


def deferLater_ms(ms: int) -> Any:
    from twisted.internet import reactor, task

    return task.deferLater(reactor, ms / 1000, lambda: None)
