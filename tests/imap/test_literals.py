"""Non-synchronising literals (RFC 7888): LITERAL- before login, LITERAL+ after it, and
what a too-large one gets (section 4: a clear error, the connection left in sync)."""

from __future__ import annotations

import re

from mailserv.imap.server import Settings
from tests.imap.harness import Env


def _caps(out: bytes) -> set[bytes]:
    m = re.search(rb"CAPABILITY ([^\]\r]*)", out)
    assert m is not None, out
    return set(m.group(1).split())


def test_literal_minus_before_login_literal_plus_after():
    """RFC 7888 section 5: never both at once.  Before login the 4096-octet bound of
    LITERAL- (LIMITS.md); after it LITERAL+, bounded like synchronising literals."""
    s = Env().session()
    before = _caps(s.greeting())
    assert b"LITERAL-" in before and b"LITERAL+" not in before
    after = _caps(s.login())
    assert b"LITERAL+" in after and b"LITERAL-" not in after
    assert _caps(s.cmd("c CAPABILITY")) == after


def test_literal_plus_append_larger_than_4096_is_stored():
    env = Env()
    s = env.session()
    s.login()
    body = b"Subject: big\r\n\r\n" + b"y" * 6000
    out = s.send(b"a APPEND INBOX {%d+}\r\n" % len(body) + body + b"\r\nb NOOP\r\n")
    assert re.fullmatch(
        rb"a OK \[APPENDUID \d+ 1\] APPEND completed\r\nb OK NOOP completed\r\n", out
    ), out
    stored = env.store.account("alice").folders["INBOX"].messages[1][0]
    assert stored == body


def test_literal_plus_other_command_within_the_command_limit():
    s = Env().session()
    s.login()
    name = b"F" * 5000
    out = s.send(b"a STATUS {5000+}\r\n" + name + b" (MESSAGES)\r\n")
    # the literal is read as the mailbox name (too long for a name, but not a framing error)
    assert out.startswith(b"a NO ") and b"Non-synchronising" not in out


def test_too_large_literal_plus_append_is_refused_at_once_and_skipped():
    """RFC 7888 section 4, first choice: reply before reading, read the octets, stay in sync."""
    s = Env(Settings(max_append=10_000)).session()
    s.login()
    out = s.send(b"a APPEND INBOX {20000+}\r\n")
    assert out == b"a NO [TOOBIG] Message too large\r\n"
    out = s.send(b"z" * 20000 + b"\r\nb NOOP\r\n")
    assert out == b"b OK NOOP completed\r\n"


def test_too_large_literal_plus_in_another_command_is_refused_with_toobig():
    s = Env().session()
    s.login()
    out = s.send(b"a CREATE {70000+}\r\n" + b"x" * 70000 + b"\r\nb NOOP\r\n")
    assert out == b"a BAD [TOOBIG] Command too long\r\nb OK NOOP completed\r\n"


def test_absurd_non_synchronising_literal_closes_the_connection():
    """RFC 7888 section 4, second choice, for a literal no limit could ever admit:
    BYE with TOOBIG and close rather than read gigabytes."""
    s = Env().session()
    s.login()
    out = s.send(b"a APPEND INBOX {9999999999+}\r\n")
    assert out == b"* BYE [TOOBIG] Literal too large\r\n"
    assert s.transport.disconnecting


def test_literal_minus_bound_before_login_has_toobig():
    s = Env().session()
    s.take()
    out = s.send(b"a LOGIN {5000+}\r\n" + b"x" * 5000 + b" secret\r\nb NOOP\r\n")
    assert out == b"a BAD [TOOBIG] Non-synchronising literal too large\r\nb OK NOOP completed\r\n"


def test_literal_minus_configuration_keeps_the_4096_bound_after_login():
    s = Env(Settings(literal_plus=False)).session()
    after = _caps(s.login())
    assert b"LITERAL-" in after and b"LITERAL+" not in after
    out = s.send(b"a APPEND INBOX {5000+}\r\n" + b"x" * 5000 + b"\r\nb NOOP\r\n")
    assert out == b"a BAD [TOOBIG] Non-synchronising literal too large\r\nb OK NOOP completed\r\n"
