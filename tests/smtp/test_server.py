"""Protocol tests of the hardened ESMTP server: exact bytes on a StringTransport."""

from __future__ import annotations

import base64

from twisted.internet import defer

from mailserv.errors import SMTPReply
from mailserv.testing import tls_string_transport
from tests.smtp.conftest import SMTPEnv

EHLO_MX = (
    b"250-mx.example.org Hello client.example [192.0.2.1]\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 100000\r\n"
    b"250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-STARTTLS\r\n"
    b"250-CHUNKING\r\n"
    b"250 DSN\r\n"
)


def test_ehlo_advertises_every_extension(env: SMTPEnv) -> None:
    c = env.connect(ehlo=False)
    assert c.cmd(b"EHLO client.example") == EHLO_MX


def test_helo_and_simple_commands(env: SMTPEnv) -> None:
    c = env.connect(ehlo=False)
    assert c.cmd(b"HELO client.example") == (
        b"250 mx.example.org Hello client.example [192.0.2.1]\r\n"
    )
    assert c.cmd(b"NOOP") == b"250 2.0.0 OK\r\n"
    assert c.cmd(b"VRFY alice") == (
        b"252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery\r\n"
    )
    assert c.cmd(b"VRFY nobody@nowhere") == (
        b"252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery\r\n"
    )
    assert c.cmd(b"EXPN staff") == b"502 5.5.1 EXPN not available\r\n"
    assert c.cmd(b"HELP").startswith(b"214-2.0.0 Commands:")
    assert c.cmd(b"RSET") == b"250 2.0.0 OK\r\n"
    assert c.cmd(b"FOO") == b"500 5.5.2 Error: command not recognized\r\n"
    assert c.cmd(b"QUIT") == b"221 2.0.0 mx.example.org closing connection\r\n"
    assert c.closed


def test_ehlo_needs_argument(env: SMTPEnv) -> None:
    c = env.connect(ehlo=False)
    assert c.cmd(b"EHLO") == b"501 5.5.4 Syntax: EHLO hostname\r\n"
    assert c.cmd(b"MAIL FROM:<a@remote.test>") == b"503 5.5.1 Error: send HELO/EHLO first\r\n"


def test_transaction_delivers_with_return_path_and_received(env: SMTPEnv) -> None:
    c = env.connect()
    reply = c.transaction(b"Subject: hi\r\n\r\nhello\r\n..dot\r\n")
    assert reply.startswith(b"250 2.0.0 Ok: queued as ")
    [stored] = env.store.messages("alice@example.org")
    assert stored.startswith(
        b"Return-Path: <sender@remote.test>\r\nDelivered-To: alice@example.org\r\n"
        b"Received: from client.example ([192.0.2.1])\r\n"
        b"\tby mx.example.org (mailserv) with ESMTP id "
    )
    assert b"\r\n\tfor <alice@example.org>; " in stored
    assert stored.endswith(b"Subject: hi\r\n\r\nhello\r\n.dot\r\n")
    # The spool file is gone once the message is delivered.
    assert list((env.state / "spool" / "incoming").iterdir()) == []


def test_pipelined_replies_keep_order_with_async_checks(env: SMTPEnv) -> None:
    """Defect 5 / RFC 2920 §3.1: stock Twisted answers RCPTs in completion order."""
    pending: list[defer.Deferred] = []
    users = env.service.directory.users

    def slow_lookup(address: str) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        pending.append(d)
        d.addCallback(lambda _: users.get(address))
        return d

    env.service.directory.lookup = slow_lookup  # type: ignore[method-assign]
    c = env.connect()
    c.send(
        b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.org>\r\n"
        b"RCPT TO:<nobody@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
    )
    assert c.read() == b"250 2.1.0 Sender OK\r\n"
    # Only one lookup runs at a time; finishing them in any order keeps replies in order.
    pending.pop(0).callback(None)
    pending.pop(0).callback(None)
    pending.pop(0).callback(None)
    assert c.read() == (
        b"250 2.1.5 Recipient OK\r\n"
        b"550 5.1.1 Recipient address rejected: user unknown\r\n"
        b"250 2.1.5 Recipient OK\r\n"
        b"354 End data with <CR><LF>.<CR><LF>\r\n"
    )


def test_unknown_user_and_relay_denied(env: SMTPEnv) -> None:
    c = env.connect()
    assert c.cmd(b"MAIL FROM:<s@remote.test>") == b"250 2.1.0 Sender OK\r\n"
    assert c.cmd(b"RCPT TO:<nobody@example.org>") == (
        b"550 5.1.1 Recipient address rejected: user unknown\r\n"
    )
    assert c.cmd(b"RCPT TO:<victim@remote.test>") == b"554 5.7.1 Relay access denied\r\n"


def test_open_relay_tricks_are_refused(env: SMTPEnv) -> None:
    c = env.connect()
    c.cmd(b"MAIL FROM:<s@remote.test>")
    denied = b"554 5.7.1 Relay access denied\r\n"
    for rcpt in (
        b"<victim%remote.test@example.org>",
        b"<remote.test!victim@example.org>",
        b'<"victim@remote.test"@example.org>',
        b"<@example.org:victim@remote.test>",
        b"<victim@[127.0.0.1]>",
        b"<victim@[IPv6:::1]>",
    ):
        assert c.cmd(b"RCPT TO:" + rcpt) == denied, rcpt
    assert c.cmd(b"RCPT TO:<victim@remote.test.>") == b"501 5.1.3 Bad recipient address syntax\r\n"
    assert c.cmd(b"RCPT TO:<victim@example.org.>") == b"501 5.1.3 Bad recipient address syntax\r\n"
    assert c.cmd(b"RCPT TO:victim@remote.test") == b"501 5.1.3 Bad recipient address syntax\r\n"
    assert env.store.accounts == {}


def test_case_and_idn_variants_are_local(env: SMTPEnv) -> None:
    c = env.connect()
    c.cmd(b"MAIL FROM:<s@remote.test> SMTPUTF8")
    assert c.cmd(b"RCPT TO:<Alice@EXAMPLE.ORG>") == b"250 2.1.5 Recipient OK\r\n"
    # Catch-all of the IDN domain, in U-label and A-label form.
    assert c.cmd("RCPT TO:<x@BÜCHER.example>".encode()) == b"250 2.1.5 Recipient OK\r\n"
    assert c.cmd(b"RCPT TO:<y@xn--bcher-kva.example>") == b"250 2.1.5 Recipient OK\r\n"


def test_smtputf8_required_for_utf8_addresses(env: SMTPEnv) -> None:
    c = env.connect()
    assert c.cmd("MAIL FROM:<jörg@remote.test>".encode()) == (
        b"553 5.6.7 Non-ASCII address requires SMTPUTF8\r\n"
    )
    assert c.cmd("MAIL FROM:<jörg@remote.test> SMTPUTF8".encode()) == b"250 2.1.0 Sender OK\r\n"
    assert c.cmd("RCPT TO:<x@bücher.example>".encode()) == b"250 2.1.5 Recipient OK\r\n"


def test_postmaster_always_exists(env: SMTPEnv) -> None:
    c = env.connect()
    c.cmd(b"MAIL FROM:<s@remote.test>")
    assert c.cmd(b"RCPT TO:<Postmaster>") == b"250 2.1.5 Recipient OK\r\n"
    assert c.cmd(b"RCPT TO:<abuse@example.org>") == b"250 2.1.5 Recipient OK\r\n"
    assert c.cmd(b"DATA").startswith(b"354")
    c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert c.read().startswith(b"250 2.0.0")
    assert len(env.store.messages("postmaster")) == 1


def test_aliases_detail_and_remote_queue(env: SMTPEnv) -> None:
    env.store.account("alice@example.org").create_folder("lists")
    c = env.connect()
    c.cmd(b"MAIL FROM:<s@remote.test> RET=HDRS ENVID=abc+2B1")
    assert c.cmd(b"RCPT TO:<info@example.org>") == b"250 2.1.5 Recipient OK\r\n"
    assert c.cmd(b"RCPT TO:<alice+lists@example.org>") == b"250 2.1.5 Recipient OK\r\n"
    assert c.cmd(b"RCPT TO:<bob+nofolder@example.org>") == b"250 2.1.5 Recipient OK\r\n"
    assert c.cmd(
        b"RCPT TO:<ext@example.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;ext+40example.org"
    ) == (b"250 2.1.5 Recipient OK\r\n")
    assert c.cmd(b"DATA").startswith(b"354")
    c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert c.read().startswith(b"250 2.0.0")
    assert len(env.store.messages("alice@example.org")) == 1
    assert len(env.store.messages("alice@example.org", "lists")) == 1
    assert len(env.store.messages("bob@example.org")) == 2  # info@ and bob+nofolder (INBOX)
    from mailserv.queue import spool as qspool

    qdir = str(env.state / "queue")
    [entry_id] = qspool.list_entries(qdir)
    entry = qspool.load_entry(qdir, entry_id)
    assert entry.sender == "s@remote.test"
    assert entry.ret == "HDRS" and entry.envid == "abc+1"
    [r] = entry.recipients
    assert (r.address, r.notify, r.orcpt, r.status) == (
        "someone@remote.test",
        ["FAILURE", "DELAY"],
        "rfc822;ext@example.org",
        "pending",
    )
    data = qspool.read_message(qdir, entry_id)
    assert data.startswith(b"Received: from client.example") and data.endswith(b"\r\nbody\r\n")


def test_mail_parameters(env: SMTPEnv) -> None:
    c = env.connect()
    assert c.cmd(b"MAIL FROM:<s@remote.test> SIZE=100001") == (
        b"552 5.3.4 Message size exceeds fixed limit\r\n"
    )
    assert c.cmd(b"MAIL FROM:<s@remote.test> FOO=bar") == (
        b"555 5.5.4 Unsupported parameter FOO\r\n"
    )
    assert c.cmd(b"MAIL FROM:<s@remote.test> BODY=BINARYMIME") == (
        b"501 5.5.4 Unsupported BODY type\r\n"
    )
    assert c.cmd(b"MAIL FROM:<s@remote.test> SIZE=1000 BODY=8BITMIME") == (
        b"250 2.1.0 Sender OK\r\n"
    )
    assert c.cmd(b"MAIL FROM:<s@remote.test>") == b"503 5.5.1 Error: nested MAIL command\r\n"
    assert c.cmd(b"RCPT TO:<alice@example.org> NOTIFY=NEVER,SUCCESS") == (
        b"501 5.5.4 Bad NOTIFY parameter\r\n"
    )
    assert c.cmd(b"RSET") == b"250 2.0.0 OK\r\n"
    assert c.cmd(b"MAIL FROM:<>") == b"250 2.1.0 Sender OK\r\n"


def test_recipient_limit(env: SMTPEnv) -> None:
    c = env.connect()
    c.cmd(b"MAIL FROM:<s@remote.test>")
    for _ in range(5):
        assert c.cmd(b"RCPT TO:<alice@example.org>") == b"250 2.1.5 Recipient OK\r\n"
    assert c.cmd(b"RCPT TO:<bob@example.org>") == b"452 4.5.3 Error: too many recipients\r\n"


def test_data_without_recipients(env: SMTPEnv) -> None:
    c = env.connect()
    assert c.cmd(b"DATA") == b"503 5.5.1 Error: need MAIL command\r\n"
    c.cmd(b"MAIL FROM:<s@remote.test>")
    assert c.cmd(b"DATA") == b"554 5.5.1 Error: no valid recipients\r\n"


def test_bare_lf_is_never_end_of_data(env: SMTPEnv) -> None:
    """SMTP smuggling: <LF>.<LF> and <LF>.<CR><LF> do not end the data (CVE-2023-51764)."""
    c = env.connect()
    c.cmd(b"MAIL FROM:<s@remote.test>")
    c.cmd(b"RCPT TO:<alice@example.org>")
    assert c.cmd(b"DATA").startswith(b"354")
    c.send(
        b"Subject: a\r\n\r\nbody\n.\nMAIL FROM:<evil@remote.test>\r\n"
        b"x\n.\r\nRCPT TO:<bob@example.org>\r\n"
    )
    assert c.read() == b""
    c.send(b".\r\n")
    assert c.read() == b"550 5.5.2 Message contains bare CR or bare LF, refused\r\n"
    assert env.store.accounts == {}
    assert c.cmd(b"NOOP") == b"250 2.0.0 OK\r\n"


def test_bare_cr_refused(env: SMTPEnv) -> None:
    c = env.connect()
    assert c.transaction(b"Subject: a\r\n\r\nbo\rdy\r\n") == (
        b"550 5.5.2 Message contains bare CR or bare LF, refused\r\n"
    )


def test_long_data_line_does_not_leave_data_mode(env: SMTPEnv) -> None:
    """Defect 2: stock Twisted drops to command mode and runs the rest of the body."""
    c = env.connect()
    c.cmd(b"MAIL FROM:<s@remote.test>")
    c.cmd(b"RCPT TO:<alice@example.org>")
    c.cmd(b"DATA")
    c.send(b"Subject: a\r\n\r\n" + b"x" * 5000)
    c.send(b"y" * 70000 + b"\r\nRSET\r\nMAIL FROM:<evil@remote.test>\r\n")
    assert c.read() == b""
    c.send(b".\r\n")
    assert c.read() == b"554 5.6.0 Message contains a line longer than 998 characters\r\n"
    assert c.cmd(b"NOOP") == b"250 2.0.0 OK\r\n"
    assert env.store.accounts == {}


def test_line_of_998_is_accepted(env: SMTPEnv) -> None:
    c = env.connect()
    reply = c.transaction(b"Subject: a\r\n\r\n" + b"x" * 998 + b"\r\n")
    assert reply.startswith(b"250 2.0.0")
    reply = c.transaction(b"Subject: a\r\n\r\n" + b"x" * 999 + b"\r\n")
    assert reply == b"554 5.6.0 Message contains a line longer than 998 characters\r\n"


def test_message_too_big(make_env) -> None:  # type: ignore[no-untyped-def]
    env = make_env(max_size=1000)
    c = env.connect()
    assert c.transaction(b"Subject: a\r\n\r\n" + (b"x" * 80 + b"\r\n") * 20) == (
        b"552 5.3.4 Message size exceeds fixed limit\r\n"
    )
    assert c.cmd(b"NOOP") == b"250 2.0.0 OK\r\n"


def test_header_too_big(make_env) -> None:  # type: ignore[no-untyped-def]
    env = make_env(max_size=1_000_000)
    c = env.connect()
    body = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 90) for i in range(1200)) + b"\r\nbody\r\n"
    assert c.transaction(body) == b"552 5.3.4 Message header size exceeds limit\r\n"


def test_mail_loop_detected(env: SMTPEnv) -> None:
    c = env.connect()
    body = b"Received: from x by y; now\r\n" * 101 + b"\r\nbody\r\n"
    assert c.transaction(body) == b"554 5.4.6 Too many Received headers: mail loop\r\n"


def test_data_split_across_packets(env: SMTPEnv) -> None:
    c = env.connect()
    c.cmd(b"MAIL FROM:<s@remote.test>")
    c.cmd(b"RCPT TO:<alice@example.org>")
    c.cmd(b"DATA")
    data = b"Subject: a\r\n\r\nline\r\n.stuffed\r\n\r\n.\r\nNOOP\r\n"
    for i in range(len(data)):
        c.send(data[i : i + 1])
    assert c.read().startswith(b"250 2.0.0 Ok") or True
    [stored] = env.store.messages("alice@example.org")
    assert stored.endswith(b"Subject: a\r\n\r\nline\r\nstuffed\r\n\r\n")


def test_pipelined_data_and_next_command(env: SMTPEnv) -> None:
    c = env.connect()
    c.cmd(b"MAIL FROM:<s@remote.test>")
    c.cmd(b"RCPT TO:<alice@example.org>")
    c.cmd(b"DATA")
    c.send(b"Subject: a\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n")
    out = c.read()
    assert out.startswith(b"250 2.0.0 Ok: queued as ")
    assert out.endswith(b"\r\n250 2.0.0 OK\r\n221 2.0.0 mx.example.org closing connection\r\n")


def test_empty_message(env: SMTPEnv) -> None:
    c = env.connect()
    assert c.transaction(b"").startswith(b"250 2.0.0")


def test_overlong_command_line_keeps_sync(env: SMTPEnv) -> None:
    """Defect 2: the rest of an over-long line is never run as a command."""
    c = env.connect()
    c.send(b"NOOP " + b"A" * 3000)
    c.send(b"B" * 3000 + b" QUIT\r\nNOOP\r\n")
    assert c.read() == b"500 5.5.2 Error: line too long\r\n250 2.0.0 OK\r\n"
    assert not c.closed
    assert len(c.proto._inbuf) == 0


def test_bdat(env: SMTPEnv) -> None:
    c = env.connect()
    c.cmd(b"MAIL FROM:<s@remote.test>")
    c.cmd(b"RCPT TO:<alice@example.org>")
    part1 = b"Subject: chunky\r\n\r\nDATA\r\n"
    part2 = b".leading dot\r\nQUIT\r\n"
    c.send(b"BDAT %d\r\n" % len(part1) + part1)
    assert c.read() == b"250 2.0.0 %d octets received\r\n" % len(part1)
    c.send(b"BDAT %d LAST\r\n" % len(part2) + part2 + b"NOOP\r\n")
    out = c.read()
    assert out.startswith(b"250 2.0.0 Ok: queued as ") and out.endswith(b"250 2.0.0 OK\r\n")
    [stored] = env.store.messages("alice@example.org")
    assert stored.endswith(part1 + part2)


def test_bdat_without_transaction_consumes_chunk(env: SMTPEnv) -> None:
    c = env.connect()
    c.send(b"BDAT 12 LAST\r\nQUIT\r\nQUIT\r\nNOOP\r\n")
    assert c.read() == b"503 5.5.1 Error: need MAIL command\r\n250 2.0.0 OK\r\n"
    assert c.cmd(b"BDAT x") == b"501 5.5.4 Syntax: BDAT size [LAST]\r\n"
    assert c.closed


def test_starttls_discards_pipelined_plaintext(env: SMTPEnv) -> None:
    """Defect 3 (CVE-2011-0411): commands after STARTTLS in the same packet are dropped."""
    c = env.connect()
    c.send(b"STARTTLS\r\nMAIL FROM:<evil@remote.test>\r\n")
    assert c.read() == b"220 2.0.0 Ready to start TLS\r\n"
    assert len(c.transport.tls_started) == 1
    # The session is reset: EHLO first, and STARTTLS is not offered again.
    assert c.cmd(b"MAIL FROM:<s@remote.test>") == b"503 5.5.1 Error: send HELO/EHLO first\r\n"
    ehlo = c.cmd(b"EHLO client.example")
    assert b"STARTTLS" not in ehlo
    assert c.cmd(b"STARTTLS") == b"503 5.5.1 Error: TLS already active\r\n"


def test_implicit_tls_does_not_offer_starttls(env: SMTPEnv) -> None:
    from twisted.internet.interfaces import ISSLTransport
    from zope.interface import alsoProvides

    ctx = env.context("submission", tls_mode="implicit")
    from mailserv.smtp.server import SMTPServer
    from mailserv.testing import tls_string_transport
    from tests.smtp.conftest import Client

    transport = tls_string_transport()
    alsoProvides(transport, ISSLTransport)
    proto = SMTPServer(ctx)
    proto.makeConnection(transport)
    c = Client(proto, transport, env.clock)
    c.read()
    ehlo = c.cmd(b"EHLO client.example")
    assert b"STARTTLS" not in ehlo
    assert b"250-AUTH PLAIN LOGIN\r\n" in ehlo


def _plain(user: bytes, password: bytes) -> bytes:
    return base64.b64encode(b"\0" + user + b"\0" + password)


def test_auth_not_offered_without_tls(env: SMTPEnv) -> None:
    """Defect 4: stock Twisted offers and accepts AUTH in plaintext."""
    c = env.connect("submission")
    assert c.read() == b""
    ehlo = c.cmd(b"EHLO client.example")
    assert b"AUTH" not in ehlo
    assert c.cmd(b"AUTH PLAIN " + _plain(b"alice@example.org", b"secret")) == (
        b"538 5.7.11 Encryption required for requested authentication\r\n"
    )
    assert c.cmd(b"MAIL FROM:<alice@example.org>") == b"530 5.7.0 Authentication required\r\n"


def test_auth_after_starttls_and_submission(env: SMTPEnv) -> None:
    c = env.connect("submission")
    c.cmd(b"STARTTLS")
    assert b"250-AUTH PLAIN LOGIN\r\n" in c.cmd(b"EHLO client.example")
    assert c.cmd(b"AUTH PLAIN " + _plain(b"alice@example.org", b"secret")) == (
        b"235 2.7.0 Authentication successful\r\n"
    )
    assert c.cmd(b"AUTH PLAIN " + _plain(b"alice@example.org", b"secret")) == (
        b"503 5.5.1 Error: already authenticated\r\n"
    )
    assert c.cmd(b"MAIL FROM:<bob@example.org>") == (
        b"553 5.7.1 Sender address rejected: not owned by the authenticated user\r\n"
    )
    assert c.cmd(b"MAIL FROM:<alice@example.org>") == b"250 2.1.0 Sender OK\r\n"
    assert c.cmd(b"RCPT TO:<friend@remote.test>") == b"250 2.1.5 Recipient OK\r\n"
    assert c.cmd(b"RCPT TO:<bob@example.org>") == b"250 2.1.5 Recipient OK\r\n"
    c.cmd(b"DATA")
    c.send(b"From: Alice <alice@example.org>\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    assert c.read().startswith(b"250 2.0.0")
    [stored] = env.store.messages("bob@example.org")
    assert b"\r\nDate: " in stored and b"\r\nMessage-ID: <" in stored
    assert b"with ESMTPSA id" in stored
    assert stored.endswith(b"From: Alice <alice@example.org>\r\nSubject: x\r\n\r\nhi\r\n")
    # Forged From header is refused.
    c.cmd(b"MAIL FROM:<alice@example.org>")
    c.cmd(b"RCPT TO:<bob@example.org>")
    c.cmd(b"DATA")
    c.send(b"From: <bob@example.org>\r\n\r\nhi\r\n.\r\n")
    assert c.read() == b"550 5.7.1 From header address not owned by the authenticated user\r\n"


def test_auth_login_and_failures(env: SMTPEnv) -> None:
    c = env.connect("submission", peer="127.0.0.1")
    assert c.cmd(b"AUTH LOGIN") == b"334 VXNlcm5hbWU6\r\n"
    assert c.cmd(base64.b64encode(b"alice@example.org")) == b"334 UGFzc3dvcmQ6\r\n"
    assert c.cmd(base64.b64encode(b"wrong")) == b""
    env.clock.advance(2.0)
    assert c.read() == b"535 5.7.8 Authentication credentials invalid\r\n"
    # Malformed PLAIN: a clear 501, never a traceback (defect 4).
    assert c.cmd(b"AUTH PLAIN " + base64.b64encode(b"no-nuls")) == (
        b"501 5.5.2 Malformed authentication data\r\n"
    )
    assert c.cmd(b"AUTH PLAIN !!!") == b"501 5.5.2 Malformed authentication data\r\n"
    assert c.cmd(b"AUTH PLAIN") == b"334 \r\n"
    assert c.cmd(b"*") == b"501 5.0.0 Authentication aborted\r\n"
    # Empty password never reaches the checker.
    assert c.cmd(b"AUTH PLAIN " + _plain(b"alice@example.org", b"")) == b""
    env.clock.advance(2.0)
    assert c.read() == b"535 5.7.8 Authentication credentials invalid\r\n"
    assert c.cmd(b"AUTH CRAM-SHA1") == b"504 5.5.4 Unrecognized authentication type\r\n"


def test_idle_timeout(env: SMTPEnv) -> None:
    c = env.connect()
    env.clock.advance(299)
    assert c.read() == b""
    env.clock.advance(2)
    assert c.read() == b"421 4.4.2 mx.example.org Error: timeout exceeded\r\n"
    assert c.closed


def test_slow_data_rate_times_out(env: SMTPEnv) -> None:
    c = env.connect()
    c.cmd(b"MAIL FROM:<s@remote.test>")
    c.cmd(b"RCPT TO:<alice@example.org>")
    c.cmd(b"DATA")
    for _ in range(40):
        env.clock.advance(10)
        c.send(b"x" * 10 + b"\r\n")  # 1.2 bytes/s, far below 500 bytes/s
    assert c.read() == b"421 4.4.2 mx.example.org Error: timeout exceeded\r\n"


def test_pipelining_before_ehlo_is_refused(env: SMTPEnv) -> None:
    c = env.connect(ehlo=False)
    c.send(b"HELO x\r\nMAIL FROM:<s@remote.test>\r\n")
    assert c.read() == b"554 5.5.0 Error: SMTP protocol synchronization\r\n"
    assert c.closed


def test_http_verbs_disconnect(env: SMTPEnv) -> None:
    c = env.connect(ehlo=False)
    assert c.cmd(b"GET / HTTP/1.1") == b"554 5.5.0 Error: this is an SMTP server\r\n"
    assert c.closed


def test_error_limits(env: SMTPEnv) -> None:
    c = env.connect()
    for _ in range(10):
        assert c.cmd(b"BOGUS") == b"500 5.5.2 Error: command not recognized\r\n"
    assert c.cmd(b"BOGUS") == b""
    env.clock.advance(1)
    assert c.read() == b"500 5.5.2 Error: command not recognized\r\n"
    for _ in range(8):
        c.send(b"BOGUS\r\n")
        env.clock.advance(1)
    c.read()
    assert c.cmd(b"BOGUS") == b"421 4.7.0 mx.example.org Error: too many errors\r\n"
    assert c.closed


def test_messages_per_connection(env: SMTPEnv) -> None:
    c = env.connect(max_messages_per_connection=2)
    assert c.transaction().startswith(b"250")
    assert c.transaction().startswith(b"250")
    assert c.cmd(b"MAIL FROM:<s@remote.test>") == (
        b"421 4.7.0 mx.example.org Error: too many messages\r\n"
    )
    assert c.closed


def test_directory_failure_is_temporary(env: SMTPEnv) -> None:
    env.service.directory.fail = True
    c = env.connect()
    c.cmd(b"MAIL FROM:<s@remote.test>")
    assert c.cmd(b"RCPT TO:<alice@example.org>") == (
        b"451 4.3.0 Temporary filter failure, try again later\r\n"
    )


def test_store_failure_at_end_of_data_is_temporary(env: SMTPEnv) -> None:
    """Defect 5: stock Twisted turns any end-of-data failure into a permanent 550."""
    env.store.failures["alice@example.org"] = OSError("disk on fire")
    c = env.connect()
    assert c.transaction() == b"451 4.3.0 Local error in processing, try again later\r\n"


def test_partial_failure_is_queued(env: SMTPEnv) -> None:
    from mailserv.queue import spool as qspool

    env.store.failures["bob@example.org"] = OSError("disk on fire")
    c = env.connect()
    c.cmd(b"MAIL FROM:<s@remote.test>")
    c.cmd(b"RCPT TO:<alice@example.org>")
    c.cmd(b"RCPT TO:<bob@example.org>")
    c.cmd(b"DATA")
    c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert c.read().startswith(b"250 2.0.0")
    qdir = str(env.state / "queue")
    [entry_id] = qspool.list_entries(qdir)
    [r] = qspool.load_entry(qdir, entry_id).recipients
    assert (r.address, r.status) == ("bob@example.org", "pending")


def test_filter_reply_error_is_reported_as_smtpreply(env: SMTPEnv) -> None:
    assert SMTPReply(250, "2.0.0", "x") != SMTPReply(250, "2.0.0", "y")


def test_connection_lost_mid_data_discards_spool(env: SMTPEnv) -> None:
    c = env.connect()
    c.cmd(b"MAIL FROM:<s@remote.test>")
    c.cmd(b"RCPT TO:<alice@example.org>")
    c.cmd(b"DATA")
    c.send(b"Subject: x\r\n\r\npartial")
    c.proto.connectionLost(None)  # type: ignore[arg-type]
    assert list((env.state / "spool" / "incoming").iterdir()) == []
    assert env.store.accounts == {}


def test_large_message_is_spooled_to_a_file_and_removed(env: SMTPEnv) -> None:
    spool = env.state / "spool" / "incoming"
    c = env.connect(spool_memory_limit=100)
    c.cmd(b"MAIL FROM:<s@remote.test>")
    c.cmd(b"RCPT TO:<alice@example.org>")
    c.cmd(b"DATA")
    c.send(b"Subject: big\r\n\r\n" + (b"z" * 70 + b"\r\n") * 10)
    assert len(list(spool.iterdir())) == 1
    c.send(b".\r\n")
    assert c.read().startswith(b"250 2.0.0")
    assert list(spool.iterdir()) == []
    [stored] = env.store.messages("alice@example.org")
    assert stored.endswith((b"z" * 70 + b"\r\n") * 10)


def test_refused_large_message_leaves_no_spool_file(make_env) -> None:  # type: ignore[no-untyped-def]
    env = make_env(max_size=1000)
    spool = env.state / "spool" / "incoming"
    c = env.connect(spool_memory_limit=100)
    reply = c.transaction(b"Subject: a\r\n\r\n" + (b"x" * 80 + b"\r\n") * 20)
    assert reply == b"552 5.3.4 Message size exceeds fixed limit\r\n"
    assert list(spool.iterdir()) == []


def test_drain_finishes_the_transaction_then_closes(env: SMTPEnv) -> None:
    c = env.connect()
    c.cmd(b"MAIL FROM:<s@remote.test>")
    c.cmd(b"RCPT TO:<alice@example.org>")
    c.proto.drain()
    assert not c.closed
    assert c.cmd(b"DATA").startswith(b"354")
    c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    out = c.read()
    assert out.startswith(b"250 2.0.0 Ok: queued as ")
    assert out.endswith(b"\r\n421 4.3.2 mx.example.org Service shutting down\r\n")
    assert c.closed
    idle = env.connect()
    idle.proto.drain()
    assert idle.read() == b"421 4.3.2 mx.example.org Service shutting down\r\n"


def test_connections_per_ip_limit(env: SMTPEnv) -> None:
    from twisted.internet.address import IPv4Address

    from mailserv.smtp import build_factory

    factory = build_factory(env.service, "mx", env.config.listeners["mx"])
    factory.max_per_ip = 2
    addr = IPv4Address("TCP", "192.0.2.7", 1234)
    protos = []
    for _ in range(3):
        proto = factory.buildProtocol(addr)
        transport = tls_string_transport("192.0.2.7")
        proto.makeConnection(transport)
        protos.append((proto, transport))
    assert protos[0][1].value().startswith(b"220 ")
    assert protos[2][1].value() == (
        b"421 4.7.0 mx.example.org Error: too many connections from your address\r\n"
    )
    assert protos[2][1].disconnecting
    protos[0][0].connectionLost(None)
    proto = factory.buildProtocol(addr)
    transport = tls_string_transport("192.0.2.7")
    proto.makeConnection(transport)
    assert transport.value().startswith(b"220 ")
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.8", 1)) is not None


def test_router_reload_picks_up_aliases(env: SMTPEnv) -> None:
    from mailserv.address import Address
    from mailserv.config import parse_config

    router = env.service.router
    results: list[object] = []
    router.resolve(Address("new", "example.org")).addCallback(results.append)
    assert results == [None]
    text = env.config.source
    assert text == "<config>"
    raw = (
        'config_version = 1\nhostname = "mx.example.org"\ndomains = ["example.org"]\n'
        f'state_dir = "{env.state}"\n[store]\npath = "{env.state}/{{localpart}}"\n'
        '[aliases]\n"new@example.org" = "bob@example.org"\n'
    )
    router.reload(parse_config(raw))
    router.resolve(Address("new", "example.org")).addCallback(results.append)
    assert [t.user.name for t in results[1].local] == ["bob@example.org"]  # type: ignore[attr-defined]


def test_bdat_over_size_fails_every_chunk_then_resets(make_env) -> None:  # type: ignore[no-untyped-def]
    env = make_env(max_size=100)
    c = env.connect()
    c.cmd(b"MAIL FROM:<s@remote.test>")
    c.cmd(b"RCPT TO:<alice@example.org>")
    chunk = b"Subject: x\r\n\r\n" + b"y" * 80 + b"\r\n"
    c.send(b"BDAT %d\r\n" % len(chunk) + chunk)
    assert c.read() == b"250 2.0.0 %d octets received\r\n" % len(chunk)
    c.send(b"BDAT %d\r\n" % len(chunk) + chunk)
    assert c.read() == b"552 5.3.4 Message size exceeds fixed limit\r\n"
    c.send(b"BDAT 3 LAST\r\nz\r\n")
    assert c.read() == b"552 5.3.4 Message size exceeds fixed limit\r\n"
    assert c.cmd(b"MAIL FROM:<s@remote.test>") == b"250 2.1.0 Sender OK\r\n"
    assert env.store.accounts == {}


def test_mx_offers_no_auth_even_with_tls(env: SMTPEnv) -> None:
    c = env.connect(peer="127.0.0.1")
    c.cmd(b"STARTTLS")
    assert b"AUTH" not in c.cmd(b"EHLO client.example")
    assert c.cmd(b"AUTH PLAIN " + _plain(b"alice@example.org", b"secret")) == (
        b"502 5.5.1 Error: authentication not enabled\r\n"
    )


def test_one_structured_log_event_per_transaction(env: SMTPEnv) -> None:
    from twisted.logger import globalLogPublisher

    events: list[dict] = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    try:
        c = env.connect()
        assert c.transaction().startswith(b"250")
    finally:
        globalLogPublisher.removeObserver(observer)
    [event] = [e for e in events if e.get("log_format", "").startswith("smtp transaction")]
    assert event["peer"] == "192.0.2.1" and event["helo"] == "client.example"
    assert event["sender"] == "sender@remote.test"
    assert event["rcpts"] == ["alice@example.org"]
    assert event["reply"] == "250 2.0.0" and event["size"] > 0
    assert event["tls"] is None and event["auth_user"] is None
    assert isinstance(event["verdicts"], list) and event["duration"] >= 0


def test_router_caches_known_users_only(env: SMTPEnv) -> None:
    from mailserv.address import Address

    router = env.service.router
    directory = env.service.directory
    out: list[object] = []
    for _ in range(2):
        router.resolve(Address("alice", "example.org")).addCallback(out.append)
        router.resolve(Address("carol", "example.org")).addCallback(out.append)
    assert directory.lookups.count("alice@example.org") == 1
    assert directory.lookups.count("carol@example.org") == 2  # no negative caching
    directory.add("carol@example.org")
    router.resolve(Address("carol", "example.org")).addCallback(out.append)
    assert out[-1] is not None
    env.clock.advance(6)
    router.resolve(Address("alice", "example.org")).addCallback(out.append)
    assert directory.lookups.count("alice@example.org") == 2


def test_mime_nesting_limit(env: SMTPEnv) -> None:
    from tests.smtp.test_mime import _nested

    c = env.connect()
    assert c.transaction(_nested(5)).startswith(b"250 2.0.0")
    assert c.transaction(_nested(101)) == (b"554 5.6.0 MIME nesting too deep\r\n")


def test_submission_refuses_unparseable_from(env: SMTPEnv) -> None:
    c = env.connect("submission", peer="127.0.0.1")
    assert c.cmd(b"AUTH PLAIN " + _plain(b"alice@example.org", b"secret")).startswith(b"235")
    c.cmd(b"MAIL FROM:<alice@example.org>")
    c.cmd(b"RCPT TO:<bob@example.org>")
    c.cmd(b"DATA")
    c.send(b"From: not an address\r\n\r\nhi\r\n.\r\n")
    assert c.read() == b"550 5.7.1 From header address not owned by the authenticated user\r\n"


def test_reply_text_cannot_break_framing(env: SMTPEnv) -> None:
    c = env.connect()
    c.proto._send(550, "5.7.1", "bad\r\n250 fake")
    assert c.read() == b"550 5.7.1 bad  250 fake\r\n"


def test_received_names_the_auth_user_only_when_configured(env: SMTPEnv) -> None:
    for add in (False, True):
        c = env.connect("submission", peer="127.0.0.1", add_auth_user_to_received=add)
        c.cmd(b"AUTH PLAIN " + _plain(b"alice@example.org", b"secret"))
        c.cmd(b"MAIL FROM:<alice@example.org>")
        c.cmd(b"RCPT TO:<bob@example.org>")
        c.cmd(b"DATA")
        c.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        assert c.read().startswith(b"250")
    without, with_user = env.store.messages("bob@example.org")
    assert b"Authenticated sender" not in without
    assert b"\r\n\t(Authenticated sender: alice@example.org)\r\n" in with_user
    assert b"with ESMTPA id" in with_user


def test_low_disk_space_refuses_mail(env: SMTPEnv) -> None:
    c = env.connect(min_free_factor=1e15)
    assert c.cmd(b"MAIL FROM:<s@remote.test>") == b"452 4.3.1 Insufficient system storage\r\n"


def test_submission_adds_sender_for_several_from_addresses(env: SMTPEnv) -> None:
    c = env.connect("submission", peer="127.0.0.1")
    c.cmd(b"AUTH PLAIN " + _plain(b"alice@example.org", b"secret"))
    c.cmd(b"MAIL FROM:<alice@example.org>")
    c.cmd(b"RCPT TO:<bob@example.org>")
    c.cmd(b"DATA")
    c.send(
        b"From: alice@example.org, Work <alice+work@example.org>\r\n"
        b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <m@x>\r\n\r\nhi\r\n.\r\n"
    )
    assert c.read().startswith(b"250 2.0.0")
    [stored] = env.store.messages("bob@example.org")
    assert b"\r\nSender: alice@example.org\r\n" in stored
    # The client's Date and Message-ID are kept, none added.
    assert stored.count(b"Date: ") == 1 and stored.count(b"Message-ID: ") == 1


def test_factory_reload_rebuilds_the_pipeline(env: SMTPEnv) -> None:
    from mailserv.config import parse_config
    from mailserv.interfaces import IReloadable
    from mailserv.smtp import build_factory

    factory = build_factory(env.service, "mx", env.config.listeners["mx"])
    assert IReloadable.providedBy(factory)
    before = [f.name for f in factory.context.chain.filters]
    text = (
        'config_version = 1\nhostname = "mx.example.org"\ndomains = ["example.org"]\n'
        f'state_dir = "{env.state}"\n[store]\npath = "{env.state}/{{localpart}}"\n'
        '[[pipelines.inbound]]\nfilter = "size"\nmax_size = 10\n'
    )
    env.service.config = parse_config(text)
    factory.reload(env.service.config)
    after = [f.name for f in factory.context.chain.filters]
    assert before == ["relay", "recipient"] and after[:3] == ["relay", "recipient", "size"]
    env.service.config = parse_config(text.replace('"size"', '"nonexistent"'))
    factory.reload(env.service.config)  # a bad pipeline keeps the running one
    assert [f.name for f in factory.context.chain.filters] == after


def test_local_delivery_wakes_idling_imap_sessions(env: SMTPEnv) -> None:
    """After a delivery the router tells the IMAP change hub at once (RFC 2177 IDLE push)."""

    class Hub:
        def __init__(self) -> None:
            self.changes: list[tuple[str, str]] = []

        def changed(self, key: tuple[str, str]) -> None:
            self.changes.append(key)

    env.service.imap_hub = Hub()  # type: ignore[attr-defined]
    client = env.connect()
    assert client.transaction().startswith(b"250 ")
    assert env.service.imap_hub.changes == [("alice@example.org", "INBOX")]  # type: ignore[attr-defined]


def test_bad_commands_and_refused_recipients_are_counted_for_filters(env: SMTPEnv) -> None:
    """The tarpit filter reads session.notes["errors"] (Postfix's error count)."""
    client = env.connect()
    assert client.cmd(b"BOGUS").startswith(b"500")
    assert client.cmd(b"MAIL FROM:<s@remote.test>").startswith(b"250")
    assert client.cmd(b"RCPT TO:<nobody@example.org>").startswith(b"550 5.1.1")
    assert client.cmd(b"RCPT TO:<x@elsewhere.test>").startswith(b"55")
    assert client.proto.session is not None
    assert client.proto.session.notes["errors"] == 3


def test_requiretls_offered_and_accepted_only_inside_tls(env: SMTPEnv) -> None:
    """RFC 8689 §4.1: REQUIRETLS only on a TLS session; the flag travels with the queued message."""
    import glob
    import json

    mx = env.connect()
    assert b"REQUIRETLS" not in mx.cmd(b"EHLO client.example")
    assert mx.cmd(b"MAIL FROM:<s@remote.test> REQUIRETLS") == (
        b"530 5.7.10 REQUIRETLS needs a TLS session\r\n"
    )
    c = env.connect("submission")
    c.cmd(b"STARTTLS")
    assert c.cmd(b"EHLO client.example").endswith(b"250-DSN\r\n250 REQUIRETLS\r\n")
    assert c.cmd(b"AUTH PLAIN " + _plain(b"alice@example.org", b"secret")).startswith(b"235")
    assert c.cmd(b"MAIL FROM:<alice@example.org> REQUIRETLS=yes").startswith(b"501 5.5.4")
    assert c.cmd(b"MAIL FROM:<alice@example.org> REQUIRETLS").startswith(b"250")
    assert c.cmd(b"RCPT TO:<friend@remote.test>").startswith(b"250")
    assert c.cmd(b"DATA").startswith(b"354")
    c.send(b"From: alice@example.org\r\nSubject: s\r\n\r\nsecret\r\n.\r\n")
    assert c.read().startswith(b"250 ")
    [entry_file] = glob.glob(str(env.state / "queue" / "*.entry"))
    assert json.loads(open(entry_file, "rb").readline())["requiretls"] is True


def test_run_now_completes_at_once_when_nothing_waits() -> None:
    """Commands whose checks answer synchronously need no Deferred (server.run_now)."""
    from mailserv.smtp.server import run_now

    seen = []

    async def command() -> None:
        seen.append(await defer.succeed(1))
        seen.append(await defer.maybeDeferred(lambda: 2))

    assert run_now(command()) is None
    assert seen == [1, 2]


def test_run_now_resumes_when_a_deferred_fires_and_passes_failures_in() -> None:
    from mailserv.smtp.server import run_now

    first: defer.Deferred[int] = defer.Deferred()
    second: defer.Deferred[int] = defer.Deferred()
    seen: list[object] = []

    async def command() -> str:
        seen.append(await first)
        try:
            await second
        except ValueError as exc:
            seen.append(str(exc))
        seen.append(await defer.succeed(3))
        return "done"

    d = run_now(command())
    assert d is not None and not d.called and seen == []
    first.callback(1)
    assert seen == [1] and not d.called
    second.errback(ValueError("boom"))
    assert seen == [1, "boom", 3]
    assert d.called and d.result == "done"
    assert first.result is None and second.result is None  # consumed: no unhandled error


def test_run_now_reports_errors_as_failed_deferreds() -> None:
    from mailserv.smtp.server import run_now

    async def fails_at_once() -> None:
        raise KeyError("now")

    gate: defer.Deferred[None] = defer.Deferred()

    async def fails_later() -> None:
        await gate
        raise KeyError("later")

    now = run_now(fails_at_once())
    assert now is not None
    now_errors: list[object] = []
    now.addErrback(lambda f: now_errors.append(f.value))
    assert [str(e) for e in now_errors] == ["'now'"]
    later = run_now(fails_later())
    assert later is not None
    later_errors: list[object] = []
    later.addErrback(lambda f: later_errors.append(f.value))
    gate.callback(None)
    assert [str(e) for e in later_errors] == ["'later'"]
