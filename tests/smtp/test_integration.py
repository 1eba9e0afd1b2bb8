"""SMTP over real sockets: twistd mailserv with the real auth, router and maildir store.

Peers: Python's smtplib, swaks (Debian package), raw sockets for pipelining
and smuggling attempts, and a crash test (SIGKILL during a stream of deliveries).
"""

from __future__ import annotations

import email
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mailserv.auth import schemes
from mailserv.queue import spool as qspool
from tests.support.process import test_config

pytestmark = pytest.mark.integration

PASSWORD = "correct horse"


def _setup(state: Path, test_ca: Any, **extra: Any) -> dict[str, Any]:
    secret = schemes.hash_password(PASSWORD, "PLAIN")
    (state / "users.passwd").write_text(
        f"alice@example.test:{secret}::::::aliases=al@example.test\n"
        f"bob@example.test:{secret}::::::\n"
    )
    # Remote mail waits in the queue: its smarthost refuses connections (a temporary failure),
    # so a test reading the queue never races its first delivery attempt or a bounce.
    extra.setdefault("queue", {"relay_host": "127.0.0.1:1"})
    return test_config(
        state,
        {"mx": {}, "submission": {}},
        tls=(test_ca.cert_file, test_ca.key_file),
        **extra,
    )


def _maildir(state: Path, local: str, folder: str = "") -> list[bytes]:
    base = state / "mail" / "example.test" / local / "Maildir"
    if folder:
        base = base / f".{folder}"
    out = []
    for sub in ("new", "cur"):
        d = base / sub
        if d.is_dir():
            out += [p.read_bytes() for p in sorted(d.iterdir())]
    return out


@pytest.fixture
def server(mailserv: Any, state_dir: Path, test_ca: Any) -> Any:
    proc = mailserv.start(_setup(state_dir, test_ca))
    proc.state = state_dir
    proc.ca = test_ca
    return proc


def _tls_context(ca: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca.ca_file)
    ctx.check_hostname = False
    return ctx


def test_smtplib_mx_delivery(server: Any) -> None:
    with smtplib.SMTP("127.0.0.1", server.port("mx"), timeout=10) as s:
        code, _text = s.ehlo("client.example")
        assert code == 250
        for ext in (
            "pipelining",
            "size",
            "8bitmime",
            "smtputf8",
            "enhancedstatuscodes",
            "starttls",
            "chunking",
            "dsn",
        ):
            assert s.has_extn(ext), ext
        s.starttls(context=_tls_context(server.ca))
        s.ehlo("client.example")
        refused = s.sendmail(
            "sender@remote.test",
            ["alice@example.test", "al@example.test"],
            b"Subject: integration\r\n\r\nHello\r\n.. a dot line\r\n",
        )
        assert refused == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused) as err:
            s.sendmail("sender@remote.test", ["nobody@example.test"], b"Subject: x\r\n\r\nx\r\n")
        assert err.value.recipients["nobody@example.test"][0] == 550
        with pytest.raises(smtplib.SMTPRecipientsRefused) as err:
            s.sendmail("sender@remote.test", ["victim@remote.test"], b"Subject: x\r\n\r\nx\r\n")
        assert err.value.recipients["victim@remote.test"][0] == 554
    [stored] = _maildir(server.state, "alice")
    msg = email.message_from_bytes(stored)
    assert msg["Return-Path"] == "<sender@remote.test>"
    assert msg["Delivered-To"] == "alice@example.test"
    assert "using TLSv1." in msg["Received"] and "with ESMTPS" in msg["Received"]
    assert stored.endswith(b"Subject: integration\r\n\r\nHello\r\n.. a dot line\r\n")


def test_smtplib_submission(server: Any) -> None:
    with smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10) as s:
        s.ehlo("laptop")
        # allow_plaintext_auth = "loopback" (the default): cleartext AUTH on 127.0.0.1 only.
        assert s.has_extn("auth")
    with smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10) as s:
        s.starttls(context=_tls_context(server.ca))
        s.ehlo("laptop")
        assert "PLAIN" in s.esmtp_features["auth"]
        s.login("alice@example.test", PASSWORD)
        s.sendmail(
            "al@example.test",
            ["bob@example.test", "friend@remote.test"],
            b"From: Alice <al@example.test>\r\nSubject: sub\r\n\r\nbody\r\n",
        )
        with pytest.raises(smtplib.SMTPSenderRefused):
            s.sendmail("bob@example.test", ["bob@example.test"], b"Subject: x\r\n\r\nx\r\n")
    [stored] = _maildir(server.state, "bob")
    msg = email.message_from_bytes(stored)
    assert msg["Message-ID"] and msg["Date"] and "with ESMTPSA" in msg["Received"]
    qdir = str(server.state / "queue")
    [entry_id] = qspool.list_entries(qdir)
    entry = qspool.load_entry(qdir, entry_id)
    assert [r.address for r in entry.recipients] == ["friend@remote.test"]
    assert entry.sender == "al@example.test"


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_swaks_auth_starttls_pipelining(server: Any, require_program: Any, mechanism: str) -> None:
    swaks = require_program("swaks")
    result = subprocess.run(
        [
            swaks,
            "--server",
            "127.0.0.1",
            "--port",
            str(server.port("submission")),
            "--tls",
            "--tls-ca-path",
            server.ca.ca_file,
            "--auth",
            mechanism,
            "--auth-user",
            "alice@example.test",
            "--auth-password",
            PASSWORD,
            "--from",
            "alice@example.test",
            "--to",
            "bob@example.test",
            "--pipeline",
            "--header",
            "Subject: swaks " + mechanism,
            "--body",
            "caf\xe9 8bit body",
            "--helo",
            "swaks.example",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Ok: queued as" in result.stdout
    [stored] = _maildir(server.state, "bob")
    assert b"Subject: swaks " + mechanism.encode() in stored


def _raw(port: int, data: bytes, wait_for: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        out = sock.recv(4096)
        sock.sendall(b"EHLO raw.example\r\n")
        while b"250 DSN" not in out:
            out += sock.recv(4096)
        out = b""
        sock.sendall(data)
        deadline = time.monotonic() + timeout
        while wait_for not in out and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


def test_raw_pipelining_order_and_bdat(server: Any) -> None:
    body = b"Subject: bdat\r\n\r\nchunked\r\n"
    out = _raw(
        server.port("mx"),
        b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<nobody@example.test>\r\n"
        b"RCPT TO:<alice@example.test>\r\nRCPT TO:<x@remote.test>\r\n"
        + b"BDAT %d LAST\r\n" % len(body)
        + body
        + b"QUIT\r\n",
        b"221 ",
    )
    lines = out.split(b"\r\n")
    assert lines[0] == b"250 2.1.0 Sender OK"
    assert lines[1].startswith(b"550 5.1.1")
    assert lines[2] == b"250 2.1.5 Recipient OK"
    assert lines[3].startswith(b"554 5.7.1")
    assert lines[4].startswith(b"250 2.0.0 Ok: queued as")
    assert lines[5].startswith(b"221 2.0.0")
    [stored] = _maildir(server.state, "alice")
    assert stored.endswith(body)


def test_raw_smuggling_attempt(server: Any) -> None:
    out = _raw(
        server.port("mx"),
        b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
        b"Subject: outer\r\n\r\nhello\n.\nMAIL FROM:<evil@remote.test>\r\n"
        b"RCPT TO:<bob@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\nQUIT\r\n",
        b"221 ",
    )
    assert b"550 5.5.2 Message contains bare CR or bare LF" in out
    assert _maildir(server.state, "alice") == [] and _maildir(server.state, "bob") == []


@pytest.mark.slow
def test_crash_loses_no_acknowledged_message(mailserv: Any, state_dir: Path, test_ca: Any) -> None:
    """SIGKILL during a stream of deliveries: every 250-acknowledged message survives."""
    config = _setup(state_dir, test_ca)
    proc = mailserv.start(config)
    acked: list[str] = []
    stop = threading.Event()

    def sender(n: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", proc.port("mx"), timeout=5) as s:
                    while not stop.is_set():
                        mid = f"<crash-{n}-{i}@test>"
                        i += 1
                        body = (
                            f"Message-ID: {mid}\r\nSubject: c\r\n\r\n".encode()
                            + (b"x" * 70 + b"\r\n") * 45
                        )
                        s.sendmail("s@remote.test", ["alice@example.test"], body)
                        acked.append(mid)
            except (OSError, smtplib.SMTPException):
                return

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    os.killpg(proc.proc.pid, signal.SIGKILL)
    proc.proc.wait(10)
    stop.set()
    for t in threads:
        t.join(10)
    assert len(acked) > 20, "too few messages were sent before the crash"
    print(f"{len(acked)} messages acknowledged before SIGKILL")
    proc2 = mailserv.start(config)
    proc2.stop()
    stored = b"\n".join(_maildir(state_dir, "alice"))
    missing = [m for m in acked if m.encode() not in stored]
    assert missing == []


def test_implicit_tls_submission_and_ipv6_mx(mailserv: Any, state_dir: Path, test_ca: Any) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    config = _setup(state_dir, test_ca)
    config["listeners"]["submissions"] = {
        "protocol": "submission",
        "endpoints": ["tcp:0:interface=127.0.0.1"],
        "tls": "implicit",
    }
    config["listeners"]["mx6"] = {
        "protocol": "smtp",
        "endpoints": ["tcp6:0:interface=\\:\\:1"],
        "tls": "starttls",
    }
    proc = mailserv.start(config)
    with smtplib.SMTP_SSL(
        "127.0.0.1", proc.port("submissions"), context=_tls_context(test_ca), timeout=10
    ) as s:
        s.ehlo("laptop")
        assert not s.has_extn("starttls")
        s.login("bob@example.test", PASSWORD)
        s.sendmail("bob@example.test", ["alice@example.test"], b"Subject: 465\r\n\r\nx\r\n")
    with smtplib.SMTP("::1", proc.port("mx6"), timeout=10) as s:
        s.sendmail("v6@remote.test", ["bob@example.test"], b"Subject: v6\r\n\r\nx\r\n")
    [stored] = _maildir(state_dir, "alice")
    assert b"with ESMTPSA" in stored
    [stored6] = _maildir(state_dir, "bob")
    assert b"([IPv6:::1])" in stored6


def test_detail_into_existing_folder_with_the_real_store(server: Any) -> None:
    from mailserv.config import parse_config
    from mailserv.directory import User
    from mailserv.store import store_for
    from tests.support.process import render_toml

    config = parse_config(render_toml(_setup(server.state, server.ca)))
    user = User(
        name="alice@example.test",
        mailbox=str(server.state / "mail" / "example.test" / "alice" / "Maildir"),
    )
    store_for(user, config.store).open(user).create_folder("lists")
    with smtplib.SMTP("127.0.0.1", server.port("mx"), timeout=10) as s:
        s.sendmail("s@remote.test", ["alice+lists@example.test"], b"Subject: l\r\n\r\nx\r\n")
        s.sendmail("s@remote.test", ["alice+other@example.test"], b"Subject: o\r\n\r\nx\r\n")
    [in_folder] = _maildir(server.state, "alice", "lists")
    assert b"Delivered-To: alice+lists@example.test" in in_folder
    [in_inbox] = _maildir(server.state, "alice")
    assert b"Subject: o" in in_inbox


def test_postmaster_without_a_user_goes_to_the_builtin_mailbox(server: Any) -> None:
    with smtplib.SMTP("127.0.0.1", server.port("mx"), timeout=10) as s:
        s.sendmail("s@remote.test", ["postmaster@example.test"], b"Subject: pm\r\n\r\nx\r\n")
        s.sendmail("s@remote.test", ["Abuse@EXAMPLE.test"], b"Subject: ab\r\n\r\nx\r\n")
    new = server.state / "postmaster" / "Maildir" / "new"
    stored = sorted(p.read_bytes() for p in new.iterdir())
    assert len(stored) == 2
    assert any(b"Subject: ab" in m for m in stored)
