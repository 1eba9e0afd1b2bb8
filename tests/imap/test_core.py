"""Protocol tests of the RFC 3501 core, driven over StringTransport with exact bytes."""

from __future__ import annotations

from tests.imap.harness import Env, message, selected


def test_greeting_and_capability_before_login_on_loopback():
    s = Env().session()
    greeting = s.greeting()
    assert greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    assert b"STARTTLS" in greeting and b"AUTH=PLAIN" in greeting
    assert b"LOGINDISABLED" not in greeting


def test_remote_plaintext_gets_logindisabled_and_no_auth():
    s = Env().session(host="192.0.2.7")
    out = s.cmd("a CAPABILITY")
    assert b"LOGINDISABLED" in out and b"AUTH=" not in out
    assert s.cmd("b LOGIN alice secret") == (
        b"b NO [PRIVACYREQUIRED] Use STARTTLS before LOGIN\r\n"
    )


def test_starttls_discards_pipelined_commands():
    """CVE-2011-0411 class (defect 3): plaintext after STARTTLS is never executed."""
    s = Env().session(host="192.0.2.7")
    s.take()
    out = s.send(b"a STARTTLS\r\nb LOGIN alice secret\r\n")
    assert out == b"a OK Begin TLS negotiation now\r\n"
    assert s.transport.tls_started
    # after TLS, the capability list offers AUTH and no STARTTLS
    out = s.cmd("c CAPABILITY")
    assert b"AUTH=PLAIN" in out and b"STARTTLS" not in out and b"LOGINDISABLED" not in out
    assert s.server.state == "notauth"


def test_login_success_and_failure_delay():
    env = Env()
    s = env.session()
    s.take()
    out = s.cmd("a LOGIN alice wrong")
    assert out == b""  # the failure waits for the delay
    env.clock.advance(2)
    assert s.take() == b"a NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
    assert s.cmd('b LOGIN "alice" {6+}\r\nsecret') == b""  # the per-IP penalty applies
    env.clock.advance(2)
    out = s.take()
    assert out.startswith(b"b OK [CAPABILITY IMAP4rev1 ")
    assert b"UIDPLUS" in out and b"Logged in" in out


def test_authenticate_plain_with_sasl_ir_and_continuation():
    env = Env()
    s = env.session()
    s.take()
    out = s.cmd("a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==")
    assert out.startswith(b"a OK [CAPABILITY")
    s2 = env.session()
    s2.take()
    assert s2.cmd("b AUTHENTICATE PLAIN") == b"+ \r\n"
    assert s2.cmd("AGFsaWNlAHNlY3JldA==").startswith(b"b OK")
    s3 = env.session()
    s3.take()
    assert s3.cmd("c AUTHENTICATE PLAIN") == b"+ \r\n"
    assert s3.cmd("*") == b"c BAD AUTHENTICATE cancelled\r\n"


def test_select_responses():
    env = Env()
    env.deliver(message(1), flags={"\\Seen"})
    env.deliver(message(2))
    s = env.session()
    s.login()
    out = s.cmd("s SELECT INBOX")
    assert out == (
        b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n"
        b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] "
        b"Flags permitted\r\n"
        b"* 2 EXISTS\r\n"
        b"* 2 RECENT\r\n"
        b"* OK [UNSEEN 2] First unseen\r\n"
        b"* OK [UIDVALIDITY 1000] UIDs valid\r\n"
        b"* OK [UIDNEXT 3] Predicted next UID\r\n"
        b"* OK [HIGHESTMODSEQ 3] Highest\r\n"
        b"s OK [READ-WRITE] SELECT completed\r\n"
    )
    out = s.cmd("e EXAMINE INBOX")
    assert b"* 0 RECENT" in out and b"[PERMANENTFLAGS ()]" in out
    assert out.endswith(b"e OK [READ-ONLY] EXAMINE completed\r\n")


def test_select_missing_mailbox():
    s = Env().session()
    s.login()
    assert s.cmd("s SELECT nope") == b"s NO [NONEXISTENT] No such mailbox\r\n"
    assert s.server.state == "auth"


def test_partial_fetch_returns_exactly_those_bytes():
    """Defect 9: BODY[]<0.10> must not return the whole message."""
    _env, s = selected(1)
    data = message(1)
    out = s.cmd("f FETCH 1 (BODY.PEEK[]<0.10>)")
    assert out == b"* 1 FETCH (BODY[]<0> {10}\r\n" + data[:10] + b")\r\nf OK FETCH completed\r\n"
    out = s.cmd("g FETCH 1 (BODY.PEEK[]<5.7>)")
    assert out == b"* 1 FETCH (BODY[]<5> {7}\r\n" + data[5:12] + b")\r\ng OK FETCH completed\r\n"
    out = s.cmd("h FETCH 1 (BODY.PEEK[]<100000.7>)")
    assert out == b"* 1 FETCH (BODY[]<100000> {0}\r\n)\r\nh OK FETCH completed\r\n"


def test_fetch_body_sets_seen_and_peek_does_not():
    _env, s = selected(1)
    message(1)
    out = s.cmd("a FETCH 1 (BODY.PEEK[TEXT])")
    assert out == b"* 1 FETCH (BODY[TEXT] {11}\r\nbody text\r\n)\r\na OK FETCH completed\r\n"
    out = s.cmd("b UID FETCH 1 (BODY[TEXT])")
    assert out == (
        b"* 1 FETCH (UID 1 BODY[TEXT] {11}\r\nbody text\r\n FLAGS (\\Recent \\Seen))\r\n"
        b"b OK FETCH completed\r\n"
    )


def test_fetch_envelope_and_bodystructure():
    _env, s = selected(1)
    out = s.cmd("a FETCH 1 (ENVELOPE BODYSTRUCTURE RFC822.SIZE)")
    assert out == (
        b'* 1 FETCH (ENVELOPE ("Mon, 7 Feb 1994 21:52:25 -0800" "hello" '
        b'(("Sender 1" NIL "sender1" "example.org")) (("Sender 1" NIL "sender1" "example.org")) '
        b'(("Sender 1" NIL "sender1" "example.org")) ((NIL NIL "alice" "example.test")) '
        b'NIL NIL NIL "<m1@example.org>") '
        b'BODYSTRUCTURE ("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 11 1 '
        b"NIL NIL NIL NIL) "
        b"RFC822.SIZE %d)\r\na OK FETCH completed\r\n" % len(message(1))
    )


def test_multipart_sections():
    raw = (
        b"From: a@example.org\r\nSubject: mp\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n'
        b"preamble\r\n--XX\r\nContent-Type: text/plain; charset=utf-8\r\n\r\npart one\r\n"
        b"--XX\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        b"aGVsbG8=\r\n--XX--\r\n"
    )
    env = Env()
    env.deliver(raw)
    s = env.selected_session()
    out = s.cmd("a FETCH 1 (BODY.PEEK[1] BODY.PEEK[2.MIME] BINARY.PEEK[2] BODYSTRUCTURE)")
    assert b"BODY[1] {8}\r\npart one" in out
    assert (
        b"BODY[2.MIME] {77}\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" in out
    )
    assert b"BINARY[2] {5}\r\nhello" in out
    assert (
        b'BODYSTRUCTURE (("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" 8 1 NIL NIL NIL NIL)'
        b'("APPLICATION" "OCTET-STREAM" NIL NIL NIL "BASE64" 8 NIL NIL NIL NIL) "MIXED" '
        b'("BOUNDARY" "XX") NIL NIL NIL)' in out
    )


def test_header_fields():
    _env, s = selected(1)
    out = s.cmd("a FETCH 1 (BODY.PEEK[HEADER.FIELDS (Subject FROM)])")
    assert out == (
        b"* 1 FETCH (BODY[HEADER.FIELDS (SUBJECT FROM)] {56}\r\n"
        b"From: Sender 1 <sender1@example.org>\r\nSubject: hello\r\n\r\n)\r\n"
        b"a OK FETCH completed\r\n"
    )


def test_append_without_flags_and_trycreate():
    """Defect 9: APPEND without a flag list works; a missing mailbox gives NO [TRYCREATE]."""
    env = Env()
    s = env.session()
    s.login()
    assert s.cmd("a APPEND INBOX {5}") == b"+ Ready for literal data\r\n"
    assert s.cmd("hello") == b"a OK [APPENDUID 1000 1] APPEND completed\r\n"
    out = s.cmd('b APPEND INBOX (\\Seen $Label) "07-Feb-1994 21:52:25 -0800" {5+}\r\nhowdy')
    assert out == b"b OK [APPENDUID 1000 2] APPEND completed\r\n"
    info = env.store.account("alice").folders["INBOX"].info(2)
    assert info.flags == {"\\Seen"} and info.keywords == {"$Label"}
    assert info.internal_date == 760686745.0
    assert s.cmd("c APPEND Nope {5+}\r\nhello") == b"c NO [TRYCREATE] No such mailbox\r\n"


def test_append_size_limits():
    from mailserv.imap.server import Settings

    env = Env(Settings(max_append=100))
    s = env.session()
    s.login()
    assert s.cmd("a APPEND INBOX {101}") == b"a NO [TOOBIG] Message too large\r\n"
    # a non-synchronising literal over APPENDLIMIT is refused and skipped, in sync
    out = s.send(b"b APPEND INBOX {5000+}\r\n" + b"x" * 5000 + b"\r\nc NOOP\r\n")
    assert out == b"b NO [TOOBIG] Message too large\r\nc OK NOOP completed\r\n"


def test_nonsync_literal_limit_for_other_commands():
    """With LITERAL- (RFC 7888 section 5) the 4096-octet bound holds after login too;
    the default LITERAL+ is tested in test_literals.py."""
    from mailserv.imap.server import Settings

    env = Env(Settings(literal_plus=False))
    s = env.session()
    s.login()
    out = s.send(b"a CREATE {5000+}\r\n" + b"x" * 5000 + b"\r\nb NOOP\r\n")
    assert out == (b"a BAD [TOOBIG] Non-synchronising literal too large\r\nb OK NOOP completed\r\n")


def test_line_too_long_stays_in_sync_and_bounded():
    env = Env()
    s = env.session()
    s.take()
    out = s.send(b"a LOGIN " + b"x" * 9000)
    assert out == b"* BAD Command line too long\r\n"
    assert len(s.server.buffer) == 0
    out = s.send(b"y" * 100000 + b"\r\nb NOOP\r\n")
    assert out == b"b OK NOOP completed\r\n"


def test_deeply_nested_list_is_refused():
    """Defect 9: no RecursionError, a BAD."""
    env = Env()
    s = env.session()
    s.login()
    out = s.cmd("a ID " + "(" * 5000 + ")" * 5000)
    assert out == b"* BAD Command line too long\r\n" or out == b"a BAD too deeply nested\r\n"
    out = s.cmd("b ID " + "(" * 100 + ")" * 100)
    assert out == b"b BAD too deeply nested\r\n"


def test_bad_commands_disconnect_before_login():
    s = Env().session()
    s.take()
    s.cmd("a FOO")
    s.cmd("b FOO")
    out = s.cmd("c FOO")
    assert out == b"c BAD Unknown command\r\n* BYE Too many invalid commands\r\n"
    assert s.transport.disconnecting


def test_login_timeout():
    env = Env()
    s = env.session()
    s.take()
    env.clock.advance(61)
    assert s.take() == b"* BYE Autologout; idle for too long\r\n"
    assert s.transport.disconnecting


def test_store_and_expunge_in_order():
    _env, s = selected(5)
    out = s.cmd("a STORE 2,4:5 +FLAGS (\\Deleted)")
    assert out == (
        b"* 2 FETCH (FLAGS (\\Deleted \\Recent))\r\n"
        b"* 4 FETCH (FLAGS (\\Deleted \\Recent))\r\n"
        b"* 5 FETCH (FLAGS (\\Deleted \\Recent))\r\n"
        b"a OK STORE completed\r\n"
    )
    out = s.cmd("b EXPUNGE")
    assert out == b"* 5 EXPUNGE\r\n* 4 EXPUNGE\r\n* 2 EXPUNGE\r\nb OK EXPUNGE completed\r\n"
    out = s.cmd("c UID SEARCH ALL")
    assert out == b"* SEARCH 1 3\r\nc OK SEARCH completed\r\n"


def test_store_silent_and_uid_store():
    _env, s = selected(1)
    assert s.cmd("a STORE 1 +FLAGS.SILENT (\\Seen)") == b"a OK STORE completed\r\n"
    out = s.cmd("b UID STORE 1 -FLAGS (\\Seen)")
    assert out == b"* 1 FETCH (UID 1 FLAGS (\\Recent))\r\nb OK STORE completed\r\n"
    assert s.cmd("c STORE 9 +FLAGS (\\Seen)") == b"c BAD Invalid message sequence number\r\n"


def test_copy_move_uidplus_trycreate():
    _env, s = selected(3)
    assert s.cmd("a COPY 1:2 Trash") == b"a OK [COPYUID 1003 1:2 1:2] COPY completed\r\n"
    assert s.cmd("b COPY 1 Nope") == b"b NO [TRYCREATE] No such mailbox\r\n"
    out = s.cmd("c UID MOVE 2 Archive")
    assert out == (b"* OK [COPYUID 1005 2 1] Moved\r\n* 2 EXPUNGE\r\nc OK MOVE completed\r\n")


def test_list_lsub_special_use_children():
    env = Env()
    s = env.session()
    s.login()
    assert s.cmd("a CREATE Work/Projects/2024") == b"a OK CREATE completed\r\n"
    out = s.cmd('b LIST "" "*"')
    assert out == (
        b'* LIST (\\HasNoChildren) "/" "INBOX"\r\n'
        b'* LIST (\\HasNoChildren \\Archive) "/" "Archive"\r\n'
        b'* LIST (\\HasNoChildren \\Drafts) "/" "Drafts"\r\n'
        b'* LIST (\\HasNoChildren \\Junk) "/" "Junk"\r\n'
        b'* LIST (\\HasNoChildren \\Sent) "/" "Sent"\r\n'
        b'* LIST (\\HasNoChildren \\Trash) "/" "Trash"\r\n'
        b'* LIST (\\Noselect \\HasChildren) "/" "Work"\r\n'
        b'* LIST (\\Noselect \\HasChildren) "/" "Work/Projects"\r\n'
        b'* LIST (\\HasNoChildren) "/" "Work/Projects/2024"\r\n'
        b"b OK LIST completed\r\n"
    )
    out = s.cmd('c LIST "" %')
    assert b'"Work/Projects"' not in out and b'"Work"' in out
    assert s.cmd('d LIST "" ""') == b'* LIST (\\Noselect) "/" ""\r\nd OK LIST completed\r\n'
    assert s.cmd('e LSUB "" *') == b'* LSUB () "/" "INBOX"\r\ne OK LSUB completed\r\n'
    out = s.cmd('f LIST (SPECIAL-USE) "" * RETURN (STATUS (MESSAGES UIDNEXT))')
    assert out.startswith(
        b'* LIST (\\HasNoChildren \\Archive) "/" "Archive"\r\n'
        b'* STATUS "Archive" (MESSAGES 0 UIDNEXT 1)\r\n'
    )
    assert b"INBOX" not in out


def test_list_many_wildcards_is_linear():
    """Defect 9: a pattern of many wildcards must not backtrack."""
    import time

    env = Env()
    s = env.session()
    s.login()
    s.cmd("a CREATE " + "a" * 200)
    start = time.monotonic()
    out = s.cmd('b LIST "" "' + "*a" * 400 + 'b"')
    assert time.monotonic() - start < 2
    assert out == b"b OK LIST completed\r\n"


def test_mailbox_name_safety():
    s = Env().session()
    s.login()
    for bad in ["../etc", "/etc/passwd", "~root", "a/../b", '"a\\x01b"', "&Jjo"]:
        out = s.cmd(f"x CREATE {bad}")
        assert out.startswith(b"x NO [CANNOT]") or out.startswith(b"x BAD"), (bad, out)
    assert s.cmd('y CREATE "a\x01b"').startswith(b"y NO [CANNOT]")


def test_modified_utf7_names():
    env = Env()
    s = env.session()
    s.login()
    assert s.cmd("a CREATE Entw&APw-rfe") == b"a OK CREATE completed\r\n"
    assert "Entwürfe" in env.store.account("alice").folders
    out = s.cmd('b LIST "" Entw*')
    assert out == b'* LIST (\\HasNoChildren) "/" "Entw&APw-rfe"\r\nb OK LIST completed\r\n'


def test_status_and_namespace_id_enable():
    env = Env()
    env.deliver(message(1))
    s = env.session()
    s.login()
    out = s.cmd("a STATUS INBOX (MESSAGES UNSEEN UIDNEXT UIDVALIDITY HIGHESTMODSEQ)")
    assert out == (
        b'* STATUS "INBOX" (MESSAGES 1 UNSEEN 1 UIDNEXT 2 UIDVALIDITY 1000 HIGHESTMODSEQ 2)\r\n'
        b"a OK STATUS completed\r\n"
    )
    assert s.cmd("b NAMESPACE") == b'* NAMESPACE (("" "/")) NIL NIL\r\nb OK NAMESPACE completed\r\n'
    out = s.cmd('c ID ("name" "test")')
    assert out == b'* ID ("name" "mailserv" "vendor" "mailserv")\r\nc OK ID completed\r\n'
    out = s.cmd("d ENABLE CONDSTORE QRESYNC")
    assert out == b"* ENABLED CONDSTORE QRESYNC\r\nd OK ENABLE completed\r\n"


def test_close_expunges_silently_and_unselect():
    env = Env()
    env.deliver(message(1), flags={"\\Deleted"})
    env.deliver(message(2))
    s = env.selected_session()
    assert s.cmd("a CLOSE") == b"a OK CLOSE completed\r\n"
    assert sorted(env.store.account("alice").folders["INBOX"].messages) == [2]
    assert s.cmd("b FETCH 1 FLAGS") == b"b BAD FETCH not allowed now\r\n"


def test_logout():
    s = Env().session()
    s.take()
    assert s.cmd("a LOGOUT") == b"* BYE Logging out\r\na OK LOGOUT completed\r\n"
    assert s.transport.disconnecting


def test_store_calls_are_asynchronous():
    """Defect 9: Twisted's IMAP4Server calls the account synchronously on the reactor.
    Here every store call goes to ``ctx.run`` (the disk pool) and the reply waits for it."""
    from twisted.internet import defer

    env = Env()
    env.deliver(message(1))
    pending: list[tuple[defer.Deferred, object, tuple]] = []

    def deferred_run(fn, *args):  # type: ignore[no-untyped-def]
        d: defer.Deferred = defer.Deferred()
        pending.append((d, fn, args))
        return d

    def finish_all() -> None:
        while pending:
            d, fn, args = pending.pop(0)
            d.callback(fn(*args))

    env.ctx.run = deferred_run
    s = env.session()
    s.take()
    assert s.cmd("a LOGIN alice secret") == b""  # the account is being opened in the pool
    finish_all()
    assert s.take().startswith(b"a OK")
    assert s.cmd("b SELECT INBOX") == b""
    finish_all()
    assert s.take().endswith(b"b OK [READ-WRITE] SELECT completed\r\n")
    assert s.cmd("c FETCH 1 (BODY.PEEK[])") == b""
    finish_all()
    assert s.take().endswith(b"c OK FETCH completed\r\n")


def test_examine_does_not_take_recent():
    """RFC 3501 section 6.3.2: EXAMINE must not make messages lose \\Recent."""
    env = Env()
    env.deliver(message(1))
    a = env.session()
    a.login()
    assert b"* 1 RECENT" in a.cmd("e EXAMINE INBOX")
    b = env.session()
    b.login()
    assert b"* 1 RECENT" in b.cmd("s SELECT INBOX")
    c = env.session()
    c.login()
    assert b"* 0 RECENT" in c.cmd("s SELECT INBOX")


def test_nested_message_rfc822_sections():
    """RFC 3501 section 6.4.5 example: parts inside an attached message are numbered within it."""
    inner = (
        b"From: inner@example.org\r\nSubject: inner\r\n"
        b'Content-Type: multipart/alternative; boundary="in"\r\n\r\n'
        b"--in\r\nContent-Type: text/plain\r\n\r\nplain inner\r\n"
        b"--in\r\nContent-Type: text/html\r\n\r\n<p>html inner</p>\r\n--in--\r\n"
    )
    raw = (
        b"From: outer@example.org\r\nSubject: outer\r\n"
        b'Content-Type: multipart/mixed; boundary="out"\r\n\r\n'
        b"--out\r\nContent-Type: text/plain\r\n\r\nouter text\r\n"
        b"--out\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--out--\r\n"
    )
    env = Env()
    env.deliver(raw)
    s = env.selected_session()
    out = s.cmd(
        "a FETCH 1 (BODY.PEEK[2.HEADER.FIELDS (SUBJECT)] BODY.PEEK[2.1] BODY.PEEK[2.2.MIME] "
        "BODY.PEEK[2.TEXT]<0.4> BODY.PEEK[3])"
    )
    assert b"BODY[2.HEADER.FIELDS (SUBJECT)] {18}\r\nSubject: inner\r\n\r\n" in out
    assert b"BODY[2.1] {11}\r\nplain inner" in out
    assert b"BODY[2.2.MIME] {27}\r\nContent-Type: text/html\r\n\r\n" in out
    assert b"BODY[2.TEXT]<0> {4}\r\n--in" in out
    assert b"BODY[3] {0}\r\n" in out
    out = s.cmd("b FETCH 1 (BODYSTRUCTURE)")
    assert b'"MESSAGE" "RFC822" NIL NIL NIL "7BIT"' in out
    assert b'("TEXT" "HTML" NIL NIL NIL "7BIT" 17 1 ' in out
