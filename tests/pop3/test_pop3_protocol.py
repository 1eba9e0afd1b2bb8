"""POP3 protocol tests: exact bytes on a StringTransport, time from a Clock.

RFC 1939 (commands, states), RFC 2449 (CAPA, response codes), RFC 2595
(STLS), RFC 5034 (AUTH), and the Twisted defects of ARCHITECTURE.md item 8.
"""

from __future__ import annotations

import re
from hashlib import md5

from twisted.internet import defer

from mailserv.errors import TemporaryFailure

MSG1 = b"Subject: one\r\n\r\nfirst\r\n"
MSG2 = b"Subject: two\r\n\r\nsecond message\r\n"
MSG3 = b"Subject: three\r\n\r\n.hidden\r\n..two\r\nend\r\n"


def fill(harness, *messages):
    inbox = harness.inbox()
    for m in messages:
        inbox.add(m)
    return inbox


# -- greeting, CAPA ---------------------------------------------------------------


def test_greeting_without_apop(harness):
    _, t = harness.connect()
    assert t.value() == b"+OK POP3 server ready\r\n"


def test_greeting_carries_apop_timestamp_only_when_apop_can_be_verified(harness):
    harness.backend.apop = True
    _, t = harness.connect()
    assert re.fullmatch(
        rb"\+OK POP3 server ready <\d+\.[0-9a-f]{24}@mail\.example\.org>\r\n", t.value()
    )
    _, t2 = harness.connect()
    assert t2.value() != t.value()  # a fresh timestamp for every connection


def test_tcp_nodelay_is_set(harness):
    # Defect 8: without TCP_NODELAY RETR crawls at ~20 messages/s.
    _, t = harness.connect()
    assert t.nodelay is True


def test_capa_before_login_on_loopback(harness):
    p, t = harness.connect()
    assert harness.send(p, t, b"CAPA\r\n") == (
        b"+OK Capability list follows\r\n"
        b"TOP\r\nUSER\r\nUIDL\r\nSASL PLAIN LOGIN\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n"
        b"STLS\r\nEXPIRE NEVER\r\nLOGIN-DELAY 0\r\nIMPLEMENTATION mailserv\r\n.\r\n"
    )


def test_capa_hides_cleartext_auth_before_tls_off_loopback(harness):
    p, t = harness.connect("192.0.2.7")
    assert harness.send(p, t, b"CAPA\r\n") == (
        b"+OK Capability list follows\r\n"
        b"TOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n"
        b"STLS\r\nEXPIRE NEVER\r\nLOGIN-DELAY 0\r\nIMPLEMENTATION mailserv\r\n.\r\n"
    )


def test_capa_says_pipelining_not_pipeline(harness):
    # Defect 8: Twisted advertises "PIPELINE" (and CELERITY, AUSPEX, POTENCE).
    p, t = harness.connect()
    lines = harness.send(p, t, b"CAPA\r\n").split(b"\r\n")
    assert b"PIPELINING" in lines
    assert not {b"PIPELINE", b"CELERITY", b"AUSPEX", b"POTENCE"} & set(lines)


def test_capa_after_login(harness):
    p, t = harness.login()
    assert harness.send(p, t, b"CAPA\r\n") == (
        b"+OK Capability list follows\r\n"
        b"TOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n"
        b"EXPIRE NEVER\r\nLOGIN-DELAY 0\r\nIMPLEMENTATION mailserv\r\n.\r\n"
    )


def test_no_stls_without_tls_configured(harness):
    harness.factory.tls_options = None
    p, t = harness.connect()
    assert b"STLS" not in harness.send(p, t, b"CAPA\r\n")
    assert harness.send(p, t, b"STLS\r\n") == b"-ERR TLS is not available.\r\n"


# -- STLS -------------------------------------------------------------------------


def test_stls_discards_pipelined_plaintext(harness):
    # RFC 2595 §4 / CVE-2011-0411 class: commands injected after STLS must not run.
    p, t = harness.connect("192.0.2.7")
    out = harness.send(p, t, b"STLS\r\nUSER alice\r\nPASS wonder land\r\n")
    assert out == b"+OK Begin TLS negotiation now.\r\n"
    assert t.tls_started == "tls-options"
    assert harness.backend.logins == []
    assert p.session_state == "AUTHORIZATION"


def test_after_stls_cleartext_login_is_allowed_and_stls_is_gone(harness):
    p, t = harness.connect("192.0.2.7")
    harness.send(p, t, b"STLS\r\n")
    capa = harness.send(p, t, b"CAPA\r\n")
    assert b"\r\nUSER\r\n" in capa and b"SASL PLAIN" in capa and b"STLS" not in capa
    assert harness.send(p, t, b"STLS\r\n") == b"-ERR TLS is already active.\r\n"
    out = harness.send(p, t, b"USER alice\r\nPASS wonder land\r\n")
    assert out == b"+OK Send your password.\r\n+OK Logged in, 0 messages (0 octets).\r\n"


def test_stls_not_valid_after_login(harness):
    p, t = harness.login()
    assert harness.send(p, t, b"STLS\r\n") == b"-ERR Command not valid in this state.\r\n"


# -- USER/PASS, APOP, AUTH --------------------------------------------------------


def test_user_refused_before_tls_off_loopback(harness):
    p, t = harness.connect("192.0.2.7")
    assert harness.send(p, t, b"USER alice\r\n") == (
        b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n"
    )


def test_plaintext_always_allowed_when_configured(harness):
    harness.factory.allow_plaintext_auth = "always"
    p, t = harness.connect("192.0.2.7")
    assert harness.send(p, t, b"USER alice\r\n") == b"+OK Send your password.\r\n"


def test_plaintext_never_even_on_loopback(harness):
    harness.factory.allow_plaintext_auth = "never"
    p, t = harness.connect("127.0.0.1")
    assert harness.send(p, t, b"USER alice\r\n").startswith(b"-ERR [AUTH] ")


def test_user_pass_login_records_pop_before_smtp(harness):
    fill(harness, MSG1, MSG2)
    p, t = harness.connect()
    out = harness.send(p, t, b"USER alice\r\nPASS wonder land\r\n")
    assert out == b"+OK Send your password.\r\n+OK Logged in, 2 messages (%d octets).\r\n" % (
        len(MSG1) + len(MSG2)
    )
    assert harness.backend.successes == [("127.0.0.1", "alice")]


def test_wrong_password_gets_auth_code_after_the_failure_delay(harness):
    p, t = harness.connect()
    out = harness.send(p, t, b"USER alice\r\nPASS wrong\r\nCAPA\r\n")
    assert out == b"+OK Send your password.\r\n"  # the reply (and CAPA) wait for the delay
    harness.clock.advance(1.9)
    assert t.value() == b"+OK Send your password.\r\n"
    harness.clock.advance(0.1)
    assert t.value().startswith(
        b"+OK Send your password.\r\n-ERR [AUTH] Authentication failed.\r\n+OK Capability"
    )


def test_empty_password_is_a_failed_login(harness):
    p, t = harness.connect()
    harness.send(p, t, b"USER alice\r\nPASS\r\n")
    harness.clock.advance(2)
    assert t.value().endswith(b"-ERR [AUTH] Authentication failed.\r\n")


def test_pass_without_user(harness):
    p, t = harness.connect()
    assert harness.send(p, t, b"PASS x\r\n") == b"-ERR USER first.\r\n"


def test_backend_down_gives_sys_temp(harness):
    harness.backend.down = True
    p, t = harness.connect()
    out = harness.send(p, t, b"USER alice\r\nPASS wonder land\r\n")
    assert out.endswith(b"-ERR [SYS/TEMP] Authentication service unavailable, try again later.\r\n")


def test_apop_login(harness):
    harness.backend.apop = True
    fill(harness, MSG1)
    p, t = harness.connect()
    magic = re.search(rb"<[^>]+>", t.value()).group(0)
    digest = md5(magic + b"wonder land").hexdigest().encode()
    out = harness.send(p, t, b"APOP alice " + digest + b"\r\n")
    assert out == b"+OK Logged in, 1 messages (%d octets).\r\n" % len(MSG1)


def test_apop_wrong_digest(harness):
    harness.backend.apop = True
    p, t = harness.connect()
    harness.send(p, t, b"APOP alice " + b"0" * 32 + b"\r\n")
    harness.clock.advance(2)
    assert t.value() == b"-ERR [AUTH] Authentication failed.\r\n"


def test_apop_refused_when_not_offered(harness):
    p, t = harness.connect()
    assert harness.send(p, t, b"APOP alice " + b"0" * 32 + b"\r\n") == (
        b"-ERR APOP is not available.\r\n"
    )


def test_auth_plain_with_initial_response(harness):
    p, t = harness.connect()
    out = harness.send(p, t, b"AUTH PLAIN " + harness.plain(b"bob", b"builder") + b"\r\n")
    assert out == b"+OK Logged in, 0 messages (0 octets).\r\n"


def test_auth_plain_with_continuation(harness):
    p, t = harness.connect()
    assert harness.send(p, t, b"AUTH plain\r\n") == b"+ \r\n"
    out = harness.send(p, t, harness.plain(b"bob", b"builder") + b"\r\n")
    assert out == b"+OK Logged in, 0 messages (0 octets).\r\n"


def test_auth_cancel_and_bad_base64(harness):
    p, t = harness.connect()
    harness.send(p, t, b"AUTH PLAIN\r\n")
    assert harness.send(p, t, b"*\r\n") == b"-ERR Authentication cancelled.\r\n"
    harness.send(p, t, b"AUTH PLAIN\r\n")
    assert harness.send(p, t, b"!!!\r\n") == b"-ERR Malformed authentication exchange.\r\n"
    # Well-formed base64 of a malformed PLAIN message.
    assert harness.send(p, t, b"AUTH PLAIN AAAA\r\n") == (
        b"-ERR Malformed authentication exchange.\r\n"
    )
    assert harness.send(p, t, b"AUTH PLAIN =\r\n") == (
        b"-ERR Malformed authentication exchange.\r\n"
    )
    assert harness.send(p, t, b"CAPA\r\n").startswith(b"+OK Capability")


def test_auth_login_exchange(harness):
    # The LOGIN prompts Outlook expects: "Username:" and "Password:".
    p, t = harness.connect()
    assert harness.send(p, t, b"AUTH LOGIN\r\n") == b"+ VXNlcm5hbWU6\r\n"
    assert harness.send(p, t, b"Ym9i\r\n") == b"+ UGFzc3dvcmQ6\r\n"
    assert harness.send(p, t, b"YnVpbGRlcg==\r\n") == b"+OK Logged in, 0 messages (0 octets).\r\n"


def test_auth_plain_wrong_password(harness):
    p, t = harness.connect()
    assert harness.send(p, t, b"AUTH PLAIN " + harness.plain(b"bob", b"bad") + b"\r\n") == b""
    harness.clock.advance(2)
    assert t.value() == b"-ERR [AUTH] Authentication failed.\r\n"


def test_auth_lists_mechanisms_and_refuses_unknown(harness):
    p, t = harness.connect()
    assert harness.send(p, t, b"AUTH\r\n") == b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"
    assert harness.send(p, t, b"AUTH CRAM-MD5\r\n") == (
        b"-ERR Unsupported authentication mechanism.\r\n"
    )


def test_auth_plain_not_offered_before_tls_off_loopback(harness):
    p, t = harness.connect("192.0.2.7")
    assert harness.send(p, t, b"AUTH PLAIN " + harness.plain(b"bob", b"builder") + b"\r\n") == (
        b"-ERR Unsupported authentication mechanism.\r\n"
    )


def test_transaction_commands_need_login(harness):
    p, t = harness.connect()
    assert harness.send(p, t, b"STAT\r\n") == b"-ERR Not logged in.\r\n"


# -- maildrop lock ----------------------------------------------------------------


def test_second_session_gets_in_use(harness):
    p1, t1 = harness.login()
    p2, t2 = harness.connect()
    out = harness.send(p2, t2, b"USER alice\r\nPASS wonder land\r\n")
    assert out.endswith(b"-ERR [IN-USE] Mailbox is locked by another POP3 session.\r\n")
    assert harness.send(p1, t1, b"QUIT\r\n") == b"+OK Logging out, 0 messages deleted.\r\n"
    p3, t3 = harness.connect()
    assert harness.send(p3, t3, b"USER alice\r\nPASS wonder land\r\n").endswith(b"octets).\r\n")


def test_dropped_connection_releases_the_lock(harness):
    p1, _ = harness.login()
    p1.connectionLost(None)
    p2, t2 = harness.connect()
    assert harness.send(p2, t2, b"USER alice\r\nPASS wonder land\r\n").endswith(b"octets).\r\n")


def test_other_users_are_not_locked_out(harness):
    harness.login("alice")
    harness.login("bob")


def test_login_delay(harness):
    harness.factory.login_delay = 60
    p, t = harness.login()
    harness.send(p, t, b"QUIT\r\n")
    harness.clock.advance(30)
    p2, t2 = harness.connect()
    out = harness.send(p2, t2, b"USER alice\r\nPASS wonder land\r\n")
    assert out.endswith(b"-ERR [LOGIN-DELAY] Wait 60 seconds between logins.\r\n")
    assert b"LOGIN-DELAY 60\r\n" in harness.send(p2, t2, b"CAPA\r\n")
    harness.clock.advance(31)
    p3, t3 = harness.connect()
    assert harness.send(p3, t3, b"USER alice\r\nPASS wonder land\r\n").endswith(b"octets).\r\n")


# -- TRANSACTION ------------------------------------------------------------------


def test_stat_list_uidl(harness):
    fill(harness, MSG1, MSG2, MSG3)
    p, t = harness.login()
    n1, n2, n3 = len(MSG1), len(MSG2), len(MSG3)
    assert harness.send(p, t, b"STAT\r\n") == b"+OK 3 %d\r\n" % (n1 + n2 + n3)
    assert harness.send(p, t, b"LIST\r\n") == (
        b"+OK 3 messages (%d octets)\r\n1 %d\r\n2 %d\r\n3 %d\r\n.\r\n" % (n1 + n2 + n3, n1, n2, n3)
    )
    assert harness.send(p, t, b"LIST 2\r\n") == b"+OK 2 %d\r\n" % n2
    assert harness.send(p, t, b"UIDL\r\n") == (
        b"+OK\r\n1 0000000100000001\r\n2 0000000200000001\r\n3 0000000300000001\r\n.\r\n"
    )
    assert harness.send(p, t, b"UIDL 3\r\n") == b"+OK 3 0000000300000001\r\n"


def test_uidl_is_stable_across_sessions(harness):
    inbox = fill(harness, MSG1, MSG2, MSG3)
    p, t = harness.login()
    harness.send(p, t, b"DELE 1\r\nQUIT\r\n")
    inbox.add(MSG1)
    p, t = harness.login()
    assert harness.send(p, t, b"UIDL\r\n") == (
        b"+OK\r\n1 0000000200000001\r\n2 0000000300000001\r\n3 0000000400000001\r\n.\r\n"
    )


def test_bad_message_numbers(harness):
    # Defect 8: Twisted's "DELE 0" deletes the last message (index -1).
    fill(harness, MSG1, MSG2)
    p, t = harness.login()
    for arg in (b"0", b"-1", b"3", b"abc", b"99999999999", b"1x", b"+1", b"\xff"):
        for cmd in (b"DELE", b"RETR", b"LIST", b"UIDL", b"TOP"):
            line = cmd + b" " + arg + (b" 0" if cmd == b"TOP" else b"") + b"\r\n"
            assert harness.send(p, t, line).startswith(b"-ERR "), line
    harness.send(p, t, b"QUIT\r\n")
    assert harness.inbox().expunged == []
    assert len(harness.inbox().contents) == 2


def test_missing_and_extra_arguments(harness):
    fill(harness, MSG1)
    p, t = harness.login()
    assert harness.send(p, t, b"RETR\r\n") == b"-ERR Wrong number of arguments.\r\n"
    assert harness.send(p, t, b"DELE 1 2\r\n") == b"-ERR Wrong number of arguments.\r\n"
    assert harness.send(p, t, b"TOP 1\r\n") == b"-ERR Wrong number of arguments.\r\n"
    assert harness.send(p, t, b"TOP 1 -1\r\n") == b"-ERR Invalid number of lines.\r\n"


def test_dele_marks_and_quit_deletes(harness):
    # Defect 8: Twisted deletes at DELE; RFC 1939 §6 deletes in the UPDATE state.
    inbox = fill(harness, MSG1, MSG2, MSG3)
    p, t = harness.login()
    assert harness.send(p, t, b"DELE 2\r\n") == b"+OK Message 2 deleted.\r\n"
    assert len(inbox.contents) == 3 and inbox.expunged == []
    assert harness.send(p, t, b"DELE 2\r\n") == b"-ERR Message is deleted.\r\n"
    assert harness.send(p, t, b"RETR 2\r\n") == b"-ERR Message is deleted.\r\n"
    assert harness.send(p, t, b"STAT\r\n") == b"+OK 2 %d\r\n" % (len(MSG1) + len(MSG3))
    assert harness.send(p, t, b"LIST\r\n").count(b"\r\n") == 4
    assert harness.send(p, t, b"QUIT\r\n") == b"+OK Logging out, 1 messages deleted.\r\n"
    assert t.disconnecting
    assert inbox.expunged == [[2]]
    assert sorted(inbox.contents) == [1, 3]


def test_rset_unmarks(harness):
    inbox = fill(harness, MSG1, MSG2)
    p, t = harness.login()
    harness.send(p, t, b"DELE 1\r\nDELE 2\r\n")
    assert harness.send(p, t, b"RSET\r\n") == b"+OK 2 messages (%d octets).\r\n" % (
        len(MSG1) + len(MSG2)
    )
    harness.send(p, t, b"QUIT\r\n")
    assert inbox.expunged == [] and len(inbox.contents) == 2


def test_dropped_connection_deletes_nothing(harness):
    inbox = fill(harness, MSG1, MSG2)
    p, t = harness.login()
    harness.send(p, t, b"DELE 1\r\nDELE 2\r\n")
    p.connectionLost(None)
    assert inbox.expunged == [] and len(inbox.contents) == 2
    assert len(harness.cache) == 1  # released (kept for the next login), lock dropped


def test_failed_expunge_reports_sys_temp(harness):
    inbox = fill(harness, MSG1)
    inbox.fail_expunge = OSError("disk on fire")
    p, t = harness.login()
    out = harness.send(p, t, b"DELE 1\r\nQUIT\r\n")
    assert out.endswith(b"-ERR [SYS/TEMP] Deleted messages were not removed.\r\n")
    assert t.disconnecting


def test_retr_and_top(harness):
    fill(harness, MSG1, MSG2, MSG3)
    p, t = harness.login()
    assert harness.send(p, t, b"RETR 1\r\n") == b"+OK %d octets\r\n" % len(MSG1) + MSG1 + b".\r\n"
    assert harness.send(p, t, b"RETR 3\r\n") == (
        b"+OK %d octets\r\nSubject: three\r\n\r\n..hidden\r\n...two\r\nend\r\n.\r\n" % len(MSG3)
    )
    assert harness.send(p, t, b"TOP 3 0\r\n") == (
        b"+OK Top of message follows\r\nSubject: three\r\n\r\n.\r\n"
    )
    assert harness.send(p, t, b"TOP 3 2\r\n") == (
        b"+OK Top of message follows\r\nSubject: three\r\n\r\n..hidden\r\n...two\r\n.\r\n"
    )


def test_retr_of_a_message_removed_meanwhile(harness):
    inbox = fill(harness, MSG1)
    p, t = harness.login()
    del inbox.contents[1]
    assert harness.send(p, t, b"RETR 1\r\n") == b"-ERR Message was removed by another session.\r\n"


def test_noop_and_unknown(harness):
    p, t = harness.login()
    assert harness.send(p, t, b"NOOP\r\n") == b"+OK\r\n"
    assert harness.send(p, t, b"noop\r\n") == b"+OK\r\n"
    assert harness.send(p, t, b"LAST\r\n") == b"-ERR Unknown command.\r\n"


def test_pipelined_commands_answer_in_order(harness):
    fill(harness, MSG1, MSG2)
    p, t = harness.connect()
    out = harness.send(
        p, t, b"CAPA\r\nUSER alice\r\nPASS wonder land\r\nSTAT\r\nRETR 1\r\nDELE 1\r\nQUIT\r\n"
    )
    replies = re.findall(rb"^[+-](?:OK|ERR)[^\r]*", out, re.M)
    assert [r.split(b" ")[0] for r in replies] == [b"+OK"] * 7
    assert out.endswith(b"+OK Logging out, 1 messages deleted.\r\n")


# -- limits -----------------------------------------------------------------------


def test_idle_timeout_is_ten_minutes(harness):
    # Defect 8: Twisted's is 300 s; RFC 1939 §3 asks at least 10 minutes.
    fill(harness, MSG1)
    p, t = harness.login()
    harness.send(p, t, b"DELE 1\r\n")
    harness.clock.advance(599)
    assert not t.disconnecting
    t.clear()
    harness.clock.advance(1)
    assert t.value() == b"-ERR Disconnected for inactivity.\r\n"
    assert t.disconnecting
    p.connectionLost(None)
    assert harness.inbox().expunged == []


def test_long_line_is_refused_and_the_session_stays_in_sync(harness):
    p, t = harness.connect()
    assert harness.send(p, t, b"CAPA " + b"x" * 600 + b"\r\n") == b"-ERR Line too long.\r\n"
    assert harness.send(p, t, b"USER alice\r\n") == b"+OK Send your password.\r\n"
    # Longer than the limit before any CRLF arrives: refused at once, the rest skipped.
    assert harness.send(p, t, b"y" * 1000) == b"-ERR Line too long.\r\n"
    assert harness.send(p, t, b"y" * 5000 + b"\r\nCAPA\r\n").startswith(b"+OK Capability")
    assert len(p._inbuf) == 0


def test_too_many_bad_commands_before_login(harness):
    p, t = harness.connect()
    out = harness.send(p, t, b"FOO\r\nBAR\r\nBAZ\r\nCAPA\r\n")
    assert out == (
        b"-ERR Unknown command.\r\n-ERR Unknown command.\r\n-ERR Unknown command.\r\n"
        b"-ERR Too many bad commands.\r\n"
    )
    assert t.disconnecting


def test_backend_failure_is_a_protocol_error_not_a_traceback(harness):
    def boom(creds):
        raise RuntimeError("secret internals")

    harness.backend.login = lambda creds, peer: defer.maybeDeferred(boom, creds)
    p, t = harness.connect()
    out = harness.send(p, t, b"USER alice\r\nPASS x\r\n")
    assert out.endswith(b"-ERR [SYS/TEMP] Internal error, try again later.\r\n")
    assert b"secret" not in out


def test_mailbox_unavailable_is_sys_temp(harness):
    def unavailable(user):
        raise TemporaryFailure("store down")

    harness.store.open = unavailable
    p, t = harness.connect()
    out = harness.send(p, t, b"USER alice\r\nPASS wonder land\r\n")
    assert out.endswith(b"-ERR [SYS/TEMP] Mailbox unavailable, try again later.\r\n")


def test_mailbox_permission_error_is_sys_perm(harness):
    def forbidden(user):
        raise PermissionError(13, "denied")

    harness.store.open = forbidden
    p, t = harness.connect()
    out = harness.send(p, t, b"USER alice\r\nPASS wonder land\r\n")
    assert out.endswith(b"-ERR [SYS/PERM] Mailbox cannot be opened.\r\n")
    # The lock was released: a later login works once the store is back.
    del harness.store.open
    p2, t2 = harness.connect()
    assert harness.send(p2, t2, b"USER alice\r\nPASS wonder land\r\n").endswith(b"octets).\r\n")


def test_retr_reads_ahead_in_one_disk_job(harness):
    # Clients fetch in order: one disk job serves the next messages too (bounded).
    fill(harness, *(MSG1 for _ in range(100)))
    p, t = harness.login()
    jobs = []

    def counting(fn, *args):
        jobs.append(fn.__name__)
        return defer.maybeDeferred(fn, *args)

    harness.factory.run_disk = counting
    harness.send(p, t, b"DELE 3\r\n")
    for n in (1, 2, 4, 5):
        assert (
            harness.send(p, t, b"RETR %d\r\n" % n)
            == b"+OK %d octets\r\n" % len(MSG1) + MSG1 + b".\r\n"
        )
    assert jobs == ["read_messages"]
    assert p.maildrop._cached_bytes <= 1024 * 1024
    harness.send(p, t, b"RETR 70\r\n")
    assert jobs == ["read_messages", "read_messages"]
    # TOP leaves the content for the RETR that usually follows.
    assert harness.send(p, t, b"TOP 71 0\r\n").startswith(b"+OK Top")
    assert harness.send(p, t, b"RETR 71\r\n").endswith(MSG1 + b".\r\n")
    assert len(jobs) == 2
    # A message marked deleted leaves the cache.
    harness.send(p, t, b"DELE 72\r\n")
    assert 72 not in p.maildrop._cache


def test_drain_closes_idle_sessions_without_update(harness):
    inbox = fill(harness, MSG1)
    p, t = harness.login()
    harness.send(p, t, b"DELE 1\r\n")
    t.clear()
    p.drain()
    assert t.value() == b"-ERR [SYS/TEMP] Server shutting down, try again later.\r\n"
    assert t.disconnecting
    p.connectionLost(None)
    assert inbox.expunged == [] and len(inbox.contents) == 1


def test_drain_lets_the_command_in_progress_finish(harness):
    harness.backend.failure_delay = 2
    p, t = harness.connect()
    harness.send(p, t, b"USER alice\r\nPASS wrong\r\n")
    p.drain()
    assert not t.disconnecting
    harness.clock.advance(2)
    assert t.value().endswith(
        b"-ERR [AUTH] Authentication failed.\r\n"
        b"-ERR [SYS/TEMP] Server shutting down, try again later.\r\n"
    )
    assert t.disconnecting


def test_connections_per_ip_are_limited(harness):
    harness.factory.max_connections_per_ip = 2
    first = harness.connect("192.0.2.7")
    harness.connect("192.0.2.7")
    p3, t3 = harness.connect("192.0.2.7")
    assert t3.value() == b"-ERR [SYS/TEMP] Too many connections from your address.\r\n"
    assert t3.disconnecting
    p3.connectionLost(None)
    _, other = harness.connect("192.0.2.8")
    assert other.value() == b"+OK POP3 server ready\r\n"
    first[0].connectionLost(None)
    _, again = harness.connect("192.0.2.7")
    assert again.value() == b"+OK POP3 server ready\r\n"
    assert harness.factory.connections == {"192.0.2.7": 2, "192.0.2.8": 1}


def test_next_login_refreshes_the_cached_mailbox(harness):
    inbox = fill(harness, MSG1)
    refreshed = []
    inbox.refresh = lambda: refreshed.append(True) or []
    p, t = harness.login()
    assert harness.send(p, t, b"QUIT\r\n").startswith(b"+OK")
    assert len(harness.cache) == 1 and inbox.closed == 0
    inbox.add(MSG2)  # new mail between two polls
    p, t = harness.login()
    assert refreshed == [True]
    assert harness.send(p, t, b"STAT\r\n") == b"+OK 2 %d\r\n" % (len(MSG1) + len(MSG2))
    harness.send(p, t, b"QUIT\r\n")
    # Bounded: the least recently used mailbox is closed when a third user comes along.
    harness.login("bob")[0].connectionLost(None)
    harness.store.account("carol")
    harness.backend.passwords["carol"] = b"pw"
    harness.login("carol")[0].connectionLost(None)
    assert len(harness.cache) == 2 and inbox.closed == 1


def test_a_cached_mailbox_that_fails_to_refresh_is_reopened(harness):
    inbox = fill(harness, MSG1)
    p, t = harness.login()
    harness.send(p, t, b"QUIT\r\n")

    def broken():
        raise OSError("gone")

    inbox.refresh = broken
    p, t = harness.login()
    assert inbox.closed == 1
    assert harness.send(p, t, b"STAT\r\n") == b"+OK 1 %d\r\n" % len(MSG1)


def test_loopback_detection_for_cleartext_policy():
    from mailserv.pop3.server import _is_loopback

    assert _is_loopback("127.0.0.1") and _is_loopback("127.3.2.1")
    assert _is_loopback("::1") and _is_loopback("::ffff:127.0.0.1")
    assert not _is_loopback("192.0.2.1") and not _is_loopback("2001:db8::1")
    assert not _is_loopback("fe80::1%eth0") and not _is_loopback("") and not _is_loopback("unix")


def test_user_allowed_from_ipv6_loopback(harness):
    from twisted.internet.address import IPv6Address

    p = harness.factory.buildProtocol(None)
    t = type(harness.connect()[1])(peerAddress=IPv6Address("TCP", "::1", 40000))
    p.makeConnection(t)
    assert harness.send(p, t, b"USER alice\r\n") == b"+OK Send your password.\r\n"
