"""Headers filter: RFC 5322 §3.6 analysis, actions per finding, forged A-R removal."""

from __future__ import annotations

from typing import Any

import pytest_twisted

from mailserv.filters.base import Action
from tests.filters.conftest import crlf

GOOD = (
    "From: Alice <alice@sender.test>\n"
    "To: bob@example.org, Carol <carol@example.org>\n"
    "Subject: hello\n"
    "Date: Wed, 25 Nov 2026 10:00:00 +0000\n"
    "Message-ID: <1@sender.test>\n"
)


@pytest_twisted.inlineCallbacks
def check(env: Any, head: str, body: str = "Hi.\n", smtputf8: bool = False, **options: Any) -> Any:
    flt = env.build("headers", **options)
    envelope = env.envelope("alice@sender.test", "bob@example.org")
    envelope.smtputf8 = smtputf8
    message = env.message(crlf(head + "\n" + body))
    verdict = yield flt.check_message(env.session(), envelope, message)
    return verdict, message


@pytest_twisted.inlineCallbacks
def test_a_good_message_passes(plain_env: Any) -> Any:
    verdict, _ = yield check(plain_env, GOOD)
    assert verdict.action is Action.CONTINUE and verdict.headers == ()


@pytest_twisted.inlineCallbacks
def test_missing_from_is_rejected_missing_date_tagged(plain_env: Any) -> Any:
    head = GOOD.replace("From: Alice <alice@sender.test>\n", "")
    verdict, _ = yield check(plain_env, head)
    assert verdict.action is Action.REJECT
    reply = verdict.smtp_reply()
    assert (reply.code, reply.enhanced) == (550, "5.6.0")
    assert "missing from header" in reply.text
    head = GOOD.replace("Date: Wed, 25 Nov 2026 10:00:00 +0000\n", "")
    verdict, _ = yield check(plain_env, head)
    assert verdict.action is Action.CONTINUE
    assert verdict.headers == (("X-Mailserv-Header-Check", "missing date header"),)


@pytest_twisted.inlineCallbacks
def test_duplicate_singletons(plain_env: Any) -> Any:
    verdict, _ = yield check(plain_env, GOOD + "From: Mallory <m@evil.test>\n")
    assert verdict.action is Action.REJECT
    assert "duplicate from header" in verdict.reason
    verdict, _ = yield check(plain_env, GOOD + "Subject: again\n", duplicate="tag")
    assert verdict.action is Action.CONTINUE
    assert verdict.headers[0][1] == "duplicate subject header"


@pytest_twisted.inlineCallbacks
def test_malformed_address_headers(plain_env: Any) -> Any:
    for bad in ("To: Alice <a@>\n", "Cc: foo bar\n", "Reply-To: a@b@c\n"):
        verdict, _ = yield check(plain_env, GOOD + bad, malformed_address="reject")
        assert verdict.action is Action.REJECT, bad
        assert "malformed" in verdict.reason
    verdict, _ = yield check(plain_env, GOOD.replace("To: bob", "To: undisclosed:;\nX: bob"))
    assert verdict.action is Action.CONTINUE and verdict.headers == ()
    verdict, _ = yield check(plain_env, GOOD + "Cc: foo bar\n")  # tagged by default
    assert verdict.headers == (("X-Mailserv-Header-Check", "malformed Cc header"),)


@pytest_twisted.inlineCallbacks
def test_eight_bit_headers_need_smtputf8(plain_env: Any) -> Any:
    head = GOOD.replace("Subject: hello", "Subject: grüße")
    verdict, _ = yield check(plain_env, head, eight_bit="reject")
    assert verdict.action is Action.REJECT and "8-bit header" in verdict.reason
    verdict, _ = yield check(plain_env, head)
    assert verdict.headers == (("X-Mailserv-Header-Check", "8-bit header without SMTPUTF8"),)
    verdict, _ = yield check(plain_env, head, smtputf8=True)
    assert verdict.action is Action.CONTINUE


@pytest_twisted.inlineCallbacks
def test_long_header_line_and_bad_field(plain_env: Any) -> Any:
    verdict, _ = yield check(plain_env, GOOD + "X-Long: " + "a" * 1000 + "\n")
    assert verdict.action is Action.REJECT and "998" in verdict.reason
    verdict, _ = yield check(plain_env, GOOD + "not a header line\n")
    assert verdict.action is Action.CONTINUE
    assert verdict.headers[0][1] == "line that is not a header field"
    verdict, _ = yield check(plain_env, GOOD + "not a header line\n", bad_field="ignore")
    assert verdict.headers == ()


@pytest_twisted.inlineCallbacks
def test_forged_authentication_results_removed(plain_env: Any) -> Any:
    head = (
        "Authentication-Results: MX.example.org; dkim=pass header.d=bank.test\n"
        "Authentication-Results: (comment) mx.example.org. 1; spf=pass\n"
        "Authentication-Results: other.example; spf=fail\n"
        "  smtp.mailfrom=x.test\n" + GOOD
    )
    verdict, message = yield check(
        plain_env, head, body="Body line.\n\nAuthentication-Results: x\n"
    )
    assert verdict.action is Action.CONTINUE
    data = open(message.path, "rb").read()
    assert data == crlf(
        "Authentication-Results: other.example; spf=fail\n  smtp.mailfrom=x.test\n"
        + GOOD
        + "\nBody line.\n\nAuthentication-Results: x\n"
    )
    assert message.size == len(data)
    assert [v for v in message.header("Authentication-Results")] == [
        b"other.example; spf=fail\r\n  smtp.mailfrom=x.test"
    ]


@pytest_twisted.inlineCallbacks
def test_forged_removal_in_a_message_held_in_memory(plain_env: Any) -> Any:
    raw = crlf("Authentication-Results: mx.example.org; spf=pass\n" + GOOD + "\nBody.\n")
    message = plain_env.message(raw, memory=True)
    flt = plain_env.build("headers")
    envelope = plain_env.envelope("alice@sender.test", "bob@example.org")
    verdict = yield flt.check_message(plain_env.session(), envelope, message)
    assert verdict.action is Action.CONTINUE
    assert message.open().read() == crlf(GOOD + "\nBody.\n")
    assert message.size == len(crlf(GOOD + "\nBody.\n"))
    assert message.header("Authentication-Results") == []


@pytest_twisted.inlineCallbacks
def test_submission_gets_date_and_message_id_from_the_msa(plain_env: Any) -> Any:
    head = GOOD.replace("Date: Wed, 25 Nov 2026 10:00:00 +0000\n", "").replace(
        "Message-ID: <1@sender.test>\n", ""
    )
    flt = plain_env.build("headers")
    session = plain_env.session()
    session.protocol = "submission"
    envelope = plain_env.envelope("alice@sender.test", "bob@example.org")
    verdict = yield flt.check_message(session, envelope, plain_env.message(crlf(head + "\nHi.\n")))
    assert verdict.action is Action.CONTINUE and verdict.headers == ()


def test_a_small_message_in_memory_is_answered_at_once(plain_env: Any) -> None:
    """Analysed inline and nothing forged to remove: a Verdict, not a Deferred."""
    from mailserv.filters.base import Verdict

    flt = plain_env.build("headers")
    envelope = plain_env.envelope("alice@sender.test", "bob@example.org")
    good = flt.check_message(
        plain_env.session(), envelope, plain_env.message(crlf(GOOD + "\nHi.\n"), memory=True)
    )
    assert isinstance(good, Verdict) and good.action is Action.CONTINUE and good.headers == ()
    head = GOOD.replace("Date: Wed, 25 Nov 2026 10:00:00 +0000\n", "")
    tagged = flt.check_message(
        plain_env.session(), envelope, plain_env.message(crlf(head + "\nHi.\n"), memory=True)
    )
    assert isinstance(tagged, Verdict) and tagged.action is Action.CONTINUE and tagged.headers
