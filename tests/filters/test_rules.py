"""Rules filter: Postfix-style header/body checks with a guard against catastrophic patterns."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from mailserv.errors import ConfigError
from mailserv.filters.base import Action
from mailserv.filters.common import results_for
from mailserv.filters.registry import chain_of
from mailserv.filters.rules import parse_rule
from tests.filters.conftest import crlf, pools_used

MESSAGE = crlf(
    "From: Alice <alice@sender.test>\n"
    "To: bob@example.org\n"
    "Subject: Cheap pills\n"
    "  for you\n"
    "Date: Wed, 25 Nov 2026 10:00:00 +0000\n"
    "\n"
    "Hello Bob,\n"
    "visit http://pills.example/ today\n"
)


@pytest_twisted.inlineCallbacks
def run(env: Any, raw: bytes = MESSAGE, **options: Any) -> Any:
    flt = env.build("rules", **options)
    session = env.session()
    envelope = env.envelope("alice@sender.test", "bob@example.org")
    verdict = yield flt.check_message(session, envelope, env.message(raw))
    return verdict, results_for(session, envelope)


def test_rule_syntax() -> None:
    rule = parse_rule(r"!/^Subject:.*a\/b/ix PREPEND X-Flag: yes")
    assert rule.negate and rule.action == "prepend" and rule.text == "X-Flag: yes"
    assert rule.pattern.pattern == "^Subject:.*a/b"
    for bad in (
        "Subject REJECT",
        "/x REJECT",
        "/x/q REJECT",
        "/x/ BOUNCE",
        "/(/ REJECT",
        "/x/ PREPEND nonsense",
    ):
        with pytest.raises(ValueError):
            parse_rule(bad)


@pytest_twisted.inlineCallbacks
def test_header_reject_sees_unfolded_lines(plain_env: Any) -> Any:
    verdict, _ = yield run(
        plain_env, header_checks=["/^Subject: cheap pills +for you$/i REJECT No pills here"]
    )
    assert verdict.action is Action.REJECT
    reply = verdict.smtp_reply()
    assert (reply.code, reply.enhanced, reply.text) == (550, "5.7.1", "No pills here")


@pytest_twisted.inlineCallbacks
def test_body_tempfail_prepend_warn_and_first_match_wins(plain_env: Any) -> Any:
    verdict, _ = yield run(
        plain_env,
        header_checks=[
            "/^From:/ DUNNO",
            "/^From:/ REJECT never reached: DUNNO matched first",
            "/^To:/ PREPEND X-Rule: to-seen",
            "/^Date:/ WARN dated",
        ],
        body_checks=["/pills\\.example/ DEFER Checking that link"],
    )
    assert verdict.action is Action.TEMPFAIL
    assert verdict.smtp_reply().text == "Checking that link"
    verdict, _ = yield run(plain_env, header_checks=["/^To:/ PREPEND X-Rule: to-seen"])
    assert verdict.action is Action.CONTINUE
    assert verdict.headers == (("X-Rule", "to-seen"),)


@pytest_twisted.inlineCallbacks
def test_quarantine_discard_and_ok(plain_env: Any) -> Any:
    verdict, results = yield run(plain_env, body_checks=["/^visit/ HOLD suspicious link"])
    assert verdict.action is Action.CONTINUE
    assert results.quarantine == ["rule quarantine: suspicious link"]
    verdict, results = yield run(
        plain_env, header_checks=["/^From:.*sender\\.test/ OK", "/^Subject:/ REJECT x"]
    )
    assert verdict.action is Action.CONTINUE and results.quarantine == []
    # DISCARD accepts and drops (Postfix): its own verdict, not a quarantine.
    verdict, results = yield run(
        plain_env, body_checks=["/pills/ DISCARD", "/today/ HOLD never reached"]
    )
    assert verdict.action is Action.DISCARD and not verdict.refuses
    assert verdict.reason == "rule discard: visit http://pills.example/ today"
    assert results.quarantine == []


@pytest_twisted.inlineCallbacks
def test_catastrophic_pattern_fails_closed_quickly(plain_env: Any) -> Any:
    from twisted.internet import reactor

    raw = crlf("From: a@b.test\nSubject: " + "a" * 80 + "b\n\nbody\n")
    flt = plain_env.build("rules", header_checks=["/^Subject: (a|aa)+$/ REJECT x"])
    chain = chain_of([flt], reactor, "inbound")
    session = plain_env.session()
    envelope = plain_env.envelope("a@b.test", "bob@example.org")
    started = time.monotonic()
    result = yield chain.message(session, envelope, plain_env.message(raw))
    assert time.monotonic() - started < 3
    assert result.verdict.action is Action.TEMPFAIL
    assert result.verdict.smtp_reply().code == 451
    assert result.verdict.smtp_reply().enhanced == "4.3.0"
    # With on_timeout = "skip" the rule is skipped and the message goes on.
    verdict, _ = yield run(
        plain_env, raw, header_checks=["/^Subject: (a|aa)+$/ REJECT x"], on_timeout="skip"
    )
    assert verdict.action is Action.CONTINUE


@pytest_twisted.inlineCallbacks
def test_small_messages_are_checked_on_the_reactor_within_the_inline_budget(
    plain_env: Any, monkeypatch: Any
) -> Any:
    """A small message in memory is checked on the reactor; a pattern still running when
    the inline budget (common.INLINE_BUDGET) is spent holds the reactor no longer than
    that, and the check starts again in the pool with the configured timeouts."""
    from twisted.internet import reactor

    from mailserv.filters.common import INLINE_BUDGET

    pools = pools_used(plain_env, monkeypatch)
    flt = plain_env.build(
        "rules", header_checks=["/^Subject: (a|aa)+$/ REJECT slow", "/^Subject: Cheap/ REJECT no"]
    )
    chain = chain_of([flt], reactor, "inbound")
    session = plain_env.session()
    result = yield chain.message(
        session, plain_env.envelope("a@b.test", "bob@example.org"), plain_env.message(MESSAGE, True)
    )
    assert result.verdict.action is Action.REJECT and result.verdict.reply.text == "no"
    assert pools == []
    raw = crlf("From: a@b.test\nSubject: " + "a" * 80 + "b\n\nbody\n")
    started = time.monotonic()
    pending = chain.message(
        session, plain_env.envelope("a@b.test", "bob@example.org"), plain_env.message(raw, True)
    )
    held = time.monotonic() - started
    assert held < INLINE_BUDGET + 0.05, held
    assert pools == ["crypto"]
    result = yield pending
    assert result.verdict.action is Action.TEMPFAIL  # the pool's 0.25 s match timeout, as before


@pytest_twisted.inlineCallbacks
def test_rules_from_a_postfix_style_file(plain_env: Any, tmp_path: Path) -> Any:
    path = tmp_path / "header_checks"
    path.write_text("# comment\n\n/^Subject:.*pills/i\n  REJECT from file\n")
    verdict, _ = yield run(plain_env, header_checks_file=str(path))
    assert verdict.smtp_reply().text == "from file"
    path.write_text("/ok/ REJECT\n/bad(/ REJECT\n")
    with pytest.raises(ConfigError) as info:
        plain_env.build("rules", header_checks_file=str(path), body_checks=["nope"])
    assert [p.key for p in info.value.problems] == ["pipelines.inbound[0].body_checks[0]"]
    with pytest.raises(ConfigError) as info:
        plain_env.build("rules", header_checks_file=str(path))
    [problem] = info.value.problems
    assert problem.key == "pipelines.inbound[0].header_checks_file"
    assert "line 2: bad regular expression" in problem.message


@pytest_twisted.inlineCallbacks
def test_body_rules_keep_per_line_semantics(plain_env: Any) -> Any:
    # \A anchors each line (Postfix matches line by line), not only the body's start.
    verdict, _ = yield run(plain_env, body_checks=["/\\Avisit/ REJECT a"])
    assert verdict.smtp_reply().text == "a"
    # A negated rule matches the first line that lacks the pattern.
    verdict, _ = yield run(plain_env, body_checks=["!/Bob/ REJECT b"])
    assert verdict.smtp_reply().text == "b"
    # $ is the end of each line (the lines end in CRLF on the wire).
    verdict, _ = yield run(plain_env, body_checks=["/today$/ REJECT d"])
    assert verdict.smtp_reply().text == "d"
    # A lookahead at the end of a line sees the end of the line, not the next line.
    verdict, _ = yield run(plain_env, body_checks=["/Bob,(?!\\n)$/ REJECT e"])
    assert verdict.smtp_reply().text == "e"
    # A pattern spanning two lines never matches a single line.
    verdict, _ = yield run(plain_env, body_checks=["/Bob,[^x]*visit/ REJECT c"])
    assert verdict.action is Action.CONTINUE
