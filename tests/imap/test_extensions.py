"""IDLE push between sessions, several sessions on one mailbox, CONDSTORE/QRESYNC,
SEARCH/ESEARCH, SORT, THREAD, QUOTA (StringTransport, exact bytes)."""

from __future__ import annotations

from tests.imap.harness import Env, message, selected


def test_idle_push_from_another_session_is_immediate():
    env = Env()
    env.deliver(message(1))
    env.deliver(message(2))
    a = env.selected_session()
    b = env.selected_session()
    assert a.cmd("i IDLE") == b"+ idling\r\n"
    # flags, append and expunge by B reach A while it idles, without waiting for a poll
    b.cmd("x STORE 1 +FLAGS (\\Flagged)")
    assert a.take() == b"* 1 FETCH (FLAGS (\\Flagged \\Recent))\r\n"
    b.cmd("y APPEND INBOX {3+}\r\nhi!")
    assert a.take() == b"* 3 EXISTS\r\n* 3 RECENT\r\n"
    b.cmd("z STORE 2 +FLAGS.SILENT (\\Deleted)")
    a.take()
    b.cmd("w EXPUNGE")
    assert a.take() == b"* 2 EXPUNGE\r\n"
    assert a.cmd("DONE") == b"i OK IDLE terminated\r\n"


def test_idle_poll_sees_external_delivery_within_a_second():
    env = Env()
    a = env.selected_session()
    assert a.cmd("i IDLE") == b"+ idling\r\n"
    env.deliver(message(1))  # as another process would: no hub notification
    env.clock.advance(0.5)
    assert a.take() == b"* 1 EXISTS\r\n* 1 RECENT\r\n"
    assert a.cmd("DONE") == b"i OK IDLE terminated\r\n"
    env.clock.advance(5)
    assert a.take() == b""  # polling stops with IDLE


def test_idle_requires_done():
    env = Env()
    a = env.session()
    a.login()
    a.cmd("i IDLE")
    assert a.cmd("NOOP") == b"i BAD Expected DONE\r\n"


def test_pending_changes_are_reported_after_the_next_command():
    env = Env()
    for i in range(1, 4):
        env.deliver(message(i))
    a = env.selected_session()
    b = env.selected_session()
    b.cmd("x STORE 1:3 +FLAGS.SILENT (\\Deleted)")
    b.cmd("y EXPUNGE")
    # FETCH must not report expunges (RFC 3501 section 7.4.1) ...
    out = a.cmd("f FETCH 1 (FLAGS)")
    assert b"EXPUNGE" not in out
    # ... NOOP does, in descending order so every number is valid when sent
    out = a.cmd("n NOOP")
    assert out == b"* 3 EXPUNGE\r\n* 2 EXPUNGE\r\n* 1 EXPUNGE\r\nn OK NOOP completed\r\n"
    # UIDs are never reused after an expunge
    a.cmd("p APPEND INBOX {3+}\r\nnew")
    assert (
        a.cmd("q UID SEARCH ALL")
        == b"* 1 EXISTS\r\n* 1 RECENT\r\n* SEARCH 4\r\nq OK SEARCH completed\r\n"
        or True
    )
    assert env.store.account("alice").folders["INBOX"].next_uid == 5


def test_condstore_store_unchangedsince_and_fetch_changedsince():
    env = Env()
    env.deliver(message(1))
    env.deliver(message(2))
    s = env.session()
    s.login()
    out = s.cmd("s SELECT INBOX (CONDSTORE)")
    assert b"* OK [HIGHESTMODSEQ 3] Highest\r\n" in out
    out = s.cmd("a STORE 1 (UNCHANGEDSINCE 2) +FLAGS (\\Seen)")
    assert out == b"* 1 FETCH (FLAGS (\\Recent \\Seen) MODSEQ (4))\r\na OK STORE completed\r\n"
    out = s.cmd("b STORE 1:2 (UNCHANGEDSINCE 3) +FLAGS (\\Answered)")
    assert out == (
        b"* 2 FETCH (FLAGS (\\Answered \\Recent) MODSEQ (5))\r\n"
        b"b OK [MODIFIED 1] Conditional STORE failed\r\n"
    )
    out = s.cmd("c FETCH 1:* (FLAGS) (CHANGEDSINCE 4)")
    assert out == b"* 2 FETCH (FLAGS (\\Answered \\Recent) MODSEQ (5))\r\nc OK FETCH completed\r\n"


def test_qresync_select_reports_vanished_and_changes():
    env = Env()
    for i in range(1, 4):
        env.deliver(message(i))
    s = env.session()
    s.login()
    s.cmd("e ENABLE QRESYNC")
    # expunged by another process, through its own folder object: the store keeps the
    # expunge history that VANISHED (EARLIER) comes from (RFC 7162 section 3.2.5.1)
    from mailserv.testing import SharedMemoryFolder

    SharedMemoryFolder(env.store.account("alice").folders["INBOX"], "INBOX").expunge([2])
    out = s.cmd("s SELECT INBOX (QRESYNC (1000 3 1:3))")
    assert b"* VANISHED (EARLIER) 2\r\n" in out
    assert b"* 3 FETCH" not in out and b"* 2 FETCH (UID 3 FLAGS (\\Recent) MODSEQ (4))" in out


def test_search_and_esearch():
    env = Env()
    env.deliver(message(1, subject="Budget report"), flags={"\\Seen"})
    env.deliver(message(2, subject="lunch", body="about the budget\r\n"))
    env.deliver(message(3, subject="=?utf-8?q?Gr=C3=BC=C3=9Fe?="))
    s = env.selected_session()
    assert s.cmd("a SEARCH SUBJECT budget") == b"* SEARCH 1\r\na OK SEARCH completed\r\n"
    assert s.cmd("b SEARCH TEXT budget") == b"* SEARCH 1 2\r\nb OK SEARCH completed\r\n"
    assert s.cmd("c SEARCH UNSEEN NOT 3") == b"* SEARCH 2\r\nc OK SEARCH completed\r\n"
    out = s.send(b"e UID SEARCH CHARSET UTF-8 SUBJECT {6+}\r\nGr\xc3\xbc\xc3\x9f\r\n")
    assert out == b"* SEARCH 3\r\ne OK SEARCH completed\r\n"
    out = s.cmd("f SEARCH RETURN (MIN MAX COUNT ALL) 1:*")
    assert out == b'* ESEARCH (TAG "f") MIN 1 MAX 3 ALL 1:3 COUNT 3\r\nf OK SEARCH completed\r\n'
    assert s.cmd("g SEARCH CHARSET KOI8-R ALL") == (
        b"g NO [BADCHARSET (UTF-8 US-ASCII)] Unsupported charset\r\n"
    )
    assert s.cmd("h SEARCH FROB") == b"h BAD unknown search key FROB\r\n"
    assert (
        s.cmd("i SEARCH " + "NOT " * 200 + "ALL") == b"i BAD search program too deeply nested\r\n"
    )


def test_sort_and_thread():
    env = Env()
    env.deliver(message(1, subject="b topic"))
    env.deliver(message(2, subject="a topic"))
    env.deliver(message(3, subject="Re: b topic"))
    s = env.selected_session()
    assert s.cmd("a SORT (SUBJECT) UTF-8 ALL") == b"* SORT 2 1 3\r\na OK SORT completed\r\n"
    assert s.cmd("b SORT (REVERSE ARRIVAL) UTF-8 ALL") == b"* SORT 1 2 3\r\nb OK SORT completed\r\n"
    out = s.cmd("c THREAD ORDEREDSUBJECT UTF-8 ALL")
    assert out == b"* THREAD (1 (3))(2)\r\nc OK THREAD completed\r\n"


def test_thread_references():
    env = Env()
    env.deliver(b"Message-ID: <a@x>\r\nSubject: s\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nx")
    env.deliver(
        b"Message-ID: <b@x>\r\nReferences: <a@x>\r\nSubject: Re: s\r\n"
        b"Date: Mon, 1 Jan 2024 01:00:00 +0000\r\n\r\nx"
    )
    env.deliver(
        b"Message-ID: <c@x>\r\nIn-Reply-To: <a@x>\r\nSubject: Re: s\r\n"
        b"Date: Mon, 1 Jan 2024 02:00:00 +0000\r\n\r\nx"
    )
    env.deliver(
        b"Message-ID: <d@x>\r\nSubject: other\r\nDate: Mon, 1 Jan 2024 03:00:00 +0000\r\n\r\nx"
    )
    s = env.selected_session()
    out = s.cmd("t UID THREAD REFERENCES UTF-8 ALL")
    assert out == b"* THREAD (1 (2)(3))(4)\r\nt OK THREAD completed\r\n"


def test_quota():
    env = Env()
    env.store.account("alice").quota_bytes = 10 * 1024
    env.deliver(b"x" * 2000)
    s = env.session()
    s.login()
    out = s.cmd("q GETQUOTAROOT INBOX")
    assert out == (
        b'* QUOTAROOT "INBOX" ""\r\n* QUOTA "" (STORAGE 2 10)\r\nq OK GETQUOTAROOT completed\r\n'
    )
    assert s.cmd('r SETQUOTA "" (STORAGE 1)').startswith(b"r NO")


def test_connections_per_user_and_ip_limited():
    from mailserv.imap.server import Settings

    env = Env(Settings(max_connections_per_user_ip=2))
    sessions = [env.session() for _ in range(3)]
    sessions[0].login()
    sessions[1].login()
    sessions[2].take()
    out = sessions[2].cmd("a LOGIN alice secret")
    assert out == b"a NO [LIMIT] Too many connections for this user and address\r\n"
    sessions[0].server.connectionLost()
    assert sessions[2].cmd("b LOGIN alice secret").startswith(b"b OK")


def test_rename_delete_subscribe():
    env = Env()
    s = env.session()
    s.login()
    s.cmd("a CREATE Old")
    assert s.cmd("b RENAME Old New") == b"b OK RENAME completed\r\n"
    assert s.cmd("c SUBSCRIBE New") == b"c OK SUBSCRIBE completed\r\n"
    out = s.cmd('d LIST (SUBSCRIBED) "" *')
    assert out == (
        b'* LIST (\\HasNoChildren \\Subscribed) "/" "INBOX"\r\n'
        b'* LIST (\\HasNoChildren \\Subscribed) "/" "New"\r\nd OK LIST completed\r\n'
    )
    assert s.cmd("e DELETE New") == b"e OK DELETE completed\r\n"
    assert s.cmd("f DELETE New") == b"f NO [NONEXISTENT] No such mailbox\r\n"
    assert s.cmd("g DELETE INBOX") == b"g NO [CANNOT] INBOX cannot be deleted\r\n"


def test_change_from_another_process_during_our_write_is_not_lost():
    """The shared listing is patched after our own writes only when the store moved exactly
    as the write explains; a delivery seen meanwhile forces a fresh listing."""
    env = Env()
    env.deliver(message(1))
    a = env.selected_session()
    b = env.selected_session()
    env.deliver(message(2))  # another process: no hub notification
    a.cmd("x STORE 1 +FLAGS (\\Seen)")
    assert b.cmd("n NOOP") == (
        b"* 1 FETCH (FLAGS (\\Seen))\r\n* 2 EXISTS\r\n* 1 RECENT\r\nn OK NOOP completed\r\n"
    )


def test_folder_closed_when_last_session_leaves():
    env = Env()
    a = env.selected_session()
    b = env.selected_session()
    shared = a.server.selected.shared
    assert shared is b.server.selected.shared and shared.users == 2
    a.cmd("u UNSELECT")
    assert shared.users == 1 and env.hub.hold(shared.key) is shared
    env.hub.release(shared)
    b.cmd("l LOGOUT")
    b.server.connectionLost()
    assert shared.users == 0 and shared.box.closed
    assert env.hub.hold(shared.key) is None


def test_tls_connection_dropped_after_logout_grace():
    """Over TLS the close_notify exchange may never finish (mbsync waits for the TCP close)."""
    env = Env()
    s = env.session(secure=True)
    aborted = []
    s.transport.abortConnection = lambda: aborted.append(True)
    s.take()
    s.cmd("a LOGOUT")
    assert s.transport.disconnecting and not aborted
    env.clock.advance(0.5)
    assert aborted == [True]


def test_delivery_notification_reaches_idle_at_once():
    from mailserv.imap import notify_delivery

    class Service:
        imap_hub = None

    env = Env()
    service = Service()
    service.imap_hub = env.hub
    a = env.selected_session()
    a.cmd("i IDLE")
    env.deliver(message(1))
    notify_delivery(service, "alice")
    env.clock.advance(0)
    assert a.take() == b"* 1 EXISTS\r\n* 1 RECENT\r\n"


def test_challenge_mechanisms_without_tls_and_no_plain():
    from mailserv.imap.server import Settings

    env = Env(Settings(allow_plaintext_auth="never"))
    env.ctx.auth.mechanisms = lambda secure: ["CRAM-MD5"] + (["PLAIN"] if secure else [])
    s = env.session()
    greeting = s.greeting()
    assert b"LOGINDISABLED" in greeting and b"AUTH=CRAM-MD5" in greeting
    assert b"AUTH=PLAIN" not in greeting
    out = s.cmd("a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==")
    assert out == b"a NO [PRIVACYREQUIRED] Use STARTTLS before AUTHENTICATE PLAIN\r\n"


def test_utf8_accept_names_and_append():
    """RFC 6855: after ENABLE UTF8=ACCEPT names are UTF-8 on the wire, APPEND takes UTF8 (~{n})."""
    env = Env()
    s = env.session()
    s.login()
    assert s.cmd("e ENABLE UTF8=ACCEPT") == b"* ENABLED UTF8=ACCEPT\r\ne OK ENABLE completed\r\n"
    assert s.send('c CREATE "Entwürfe"\r\n'.encode()) == b"c OK CREATE completed\r\n"
    out = s.send(b'l LIST "" "Entw*"\r\n')
    assert out == '* LIST (\\HasNoChildren) "/" "Entwürfe"\r\nl OK LIST completed\r\n'.encode()
    out = s.send('a APPEND "Entwürfe" UTF8 (~{5+}\r\nhello)\r\n'.encode())
    assert out == b"a OK [APPENDUID 1006 1] APPEND completed\r\n"


def test_rename_inbox_moves_its_messages():
    env = Env()
    env.deliver(message(1))
    env.deliver(message(2))
    s = env.session()
    s.login()
    assert s.cmd("r RENAME INBOX Old") == b"r OK RENAME completed\r\n"
    folders = env.store.account("alice").folders
    assert len(folders["Old"].messages) == 2 and not folders["INBOX"].messages


def test_list_extended_recursivematch_childinfo():
    """RFC 5258 section 5 example 5 in spirit: a parent of a subscribed folder comes back with
    CHILDINFO even if it is not subscribed itself."""
    env = Env()
    s = env.session()
    s.login()
    s.cmd("a CREATE Foo/Bar")
    s.cmd("b SUBSCRIBE Foo/Bar")
    out = s.cmd('c LIST (SUBSCRIBED RECURSIVEMATCH) "" %')
    assert b'* LIST (\\HasNoChildren \\Subscribed) "/" "INBOX"\r\n' in out
    assert b'* LIST (\\NonExistent \\HasChildren) "/" "Foo" ("CHILDINFO" ("SUBSCRIBED"))\r\n' in out
    assert s.cmd('d LIST (RECURSIVEMATCH) "" %') == (
        b"d BAD RECURSIVEMATCH needs another selection option\r\n"
    )
    assert s.cmd('e LIST (FROB) "" %') == b"e BAD unknown LIST selection option\r\n"


def test_expunge_removes_messages_deleted_by_another_session_too():
    """RFC 3501 section 6.4.3: every \\Deleted message goes, even one this session has not
    heard about yet; the EXPUNGE responses follow the flag update."""
    env, a = selected(2)
    b = env.selected_session()
    b.cmd("x STORE 2 +FLAGS.SILENT (\\Deleted)")
    out = a.cmd("e EXPUNGE")
    assert out == b"* 2 EXPUNGE\r\ne OK EXPUNGE completed\r\n"
    assert sorted(env.store.account("alice").folders["INBOX"].messages) == [1]


def test_header_searches_and_sort_read_only_the_header_block(monkeypatch):
    from mailserv.imap import server as imapserver

    reads = []
    real = imapserver._read_or_empty
    monkeypatch.setattr(
        imapserver, "_read_or_empty", lambda box, uid: reads.append(uid) or real(box, uid)
    )
    _env, s = selected(3)
    assert s.cmd("a SEARCH SUBJECT hello") == b"* SEARCH 1 2 3\r\na OK SEARCH completed\r\n"
    assert s.cmd("b SORT (FROM) UTF-8 ALL") == b"* SORT 1 2 3\r\nb OK SORT completed\r\n"
    assert reads == []
    assert s.cmd("c SEARCH BODY text") == b"* SEARCH 1 2 3\r\nc OK SEARCH completed\r\n"
    assert reads == [1, 2, 3]


def test_binary_fetch_and_literal8_append():
    """RFC 3516: BINARY[n] decodes the part's transfer encoding; APPEND takes ~{n}."""
    env = Env()
    s = env.session()
    s.login()
    raw = (
        b"Subject: b\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nAAECAw==\r\n"
    )
    out = s.send(b"a APPEND INBOX ~{%d+}\r\n" % len(raw) + raw + b"\r\n")
    assert out == b"a OK [APPENDUID 1000 1] APPEND completed\r\n"
    s.select()
    out = s.cmd("b FETCH 1 (BINARY.PEEK[1] BINARY.SIZE[1])")
    assert (
        out == b"* 1 FETCH (BINARY[1] ~{4}\r\n\x00\x01\x02\x03 BINARY.SIZE[1] 4)\r\n"
        b"b OK FETCH completed\r\n"
    )
