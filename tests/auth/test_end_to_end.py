"""The whole server (twistd -n mailserv) logging users in over SMTP submission, IMAP and POP3.

Users come from a passwd-file made with ``mailserv user add``, or from LDAP (slapd): one portal
for every protocol, and the failure penalty counted per client address across protocols.
"""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.auth.conftest import ALICE_PASSWORD, Slapd
from tests.support.process import test_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LISTENERS = {"submission": {}, "imap": {}, "pop3": {}}


def add_user(config: Path, name: str, password: str, scheme: str) -> None:
    """``mailserv user add`` (in this process: the console script is tested in test_cli_users)."""
    import io

    from mailserv.cli.main import main

    stdin, sys.stdin = sys.stdin, io.StringIO(password + "\n")
    try:
        args = ["user", "--config", str(config), "add", name, "--stdin", "--scheme", scheme]
        assert main(args) == 0
    finally:
        sys.stdin = stdin


def smtp_auth(port: int, user: str, password: str) -> tuple[int, list[str]]:
    client = smtplib.SMTP("127.0.0.1", port, timeout=20)
    try:
        client.ehlo("client.example")
        mechanisms = client.esmtp_features.get("auth", "").split()
        try:
            code, _ = client.login(user, password)
        except smtplib.SMTPAuthenticationError as exc:
            code = exc.smtp_code
        return code, mechanisms
    finally:
        client.close()


def imap_login(port: int, user: str, password: str, cram: bool = False) -> str:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=20)
    try:
        if cram:
            typ, _ = client.login_cram_md5(user, password)
        else:
            typ, _ = client.login(user, password)
        return typ
    except imaplib.IMAP4.error as exc:
        return f"NO {exc}"
    finally:
        client.shutdown()


def pop_login(port: int, user: str, password: str, apop: bool = False) -> bytes:
    client = poplib.POP3("127.0.0.1", port, timeout=20)
    try:
        if apop:
            return client.apop(user, password)
        client.user(user)
        return client.pass_(password)
    except poplib.error_proto as exc:
        return exc.args[0]
    finally:
        client.close()


def test_passwd_file_users_on_every_protocol(mailserv: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = test_config(state, LISTENERS, auth={"failure_delay": "0.5s", "max_penalty": "1s"})
    config_file = mailserv.write_config(config)
    add_user(config_file, "alice@example.test", "wonder land", "PLAIN")
    add_user(config_file, "bob@example.test", "builder", "SHA512-CRYPT")
    server = mailserv.start(config)

    code, mechanisms = smtp_auth(server.port("submission"), "alice@example.test", "wonder land")
    assert code == 235
    assert mechanisms[:3] == ["SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5"]
    assert smtp_auth(server.port("submission"), "bob@example.test", "builder")[0] == 235
    assert imap_login(server.port("imap"), "alice@example.test", "wonder land") == "OK"
    assert imap_login(server.port("imap"), "alice@example.test", "wonder land", cram=True) == "OK"
    assert imap_login(server.port("imap"), "Bob@Example.test", "builder") == "OK"
    assert pop_login(server.port("pop3"), "alice@example.test", "wonder land").startswith(b"+OK")
    assert pop_login(
        server.port("pop3"), "alice@example.test", "wonder land", apop=True
    ).startswith(b"+OK")

    started = time.monotonic()
    assert smtp_auth(server.port("submission"), "bob@example.test", "wrong")[0] == 535
    assert time.monotonic() - started >= 0.5  # the failure delay
    assert imap_login(server.port("imap"), "bob@example.test", "").startswith("NO")
    assert not pop_login(server.port("pop3"), "nobody@example.test", "x").startswith(b"+OK")


def test_ldap_users_on_every_protocol(mailserv: Any, tmp_path: Path, slapd: Slapd) -> None:
    ldap = {
        "type": "ldap",
        "urls": [slapd.url],
        "base_dn": "dc=example,dc=org",
        "bind_dn": slapd.reader_dn,
        "bind_password_file": slapd.reader_password_file,
        "start_tls": True,
        "ca_file": slapd.ca_file,
    }
    config = test_config(
        tmp_path / "state",
        LISTENERS,
        domains=("example.org",),
        auth={"backends": ["corp"], "backend": {"corp": ldap}},
    )
    server = mailserv.start(config)
    assert smtp_auth(server.port("submission"), "alice@example.org", ALICE_PASSWORD)[0] == 235
    assert smtp_auth(server.port("submission"), "alice@example.org", ALICE_PASSWORD)[1] == [
        "PLAIN",
        "LOGIN",
    ]
    assert imap_login(server.port("imap"), "ALICE@example.org", ALICE_PASSWORD) == "OK"
    assert pop_login(server.port("pop3"), "alice", ALICE_PASSWORD).startswith(b"+OK")
    assert imap_login(server.port("imap"), "alice@example.org", "wrong").startswith("NO")


def test_backend_down_is_a_temporary_failure_on_every_protocol(
    mailserv: Any, tmp_path: Path, closed_port: int
) -> None:
    """454 4.7.0 / NO [UNAVAILABLE] / -ERR [SYS/TEMP], never "wrong password"."""
    ldap = {
        "type": "ldap",
        "urls": [f"ldap://127.0.0.1:{closed_port}"],
        "base_dn": "dc=example,dc=org",
        "timeout": "1s",
    }
    config = test_config(
        tmp_path / "state", LISTENERS, auth={"backends": ["corp"], "backend": {"corp": ldap}}
    )
    server = mailserv.start(config)
    assert smtp_auth(server.port("submission"), "alice@example.test", "pw")[0] == 454
    imap = imap_login(server.port("imap"), "alice@example.test", "pw")
    assert imap.startswith("NO") and "[UNAVAILABLE]" in imap
    pop = pop_login(server.port("pop3"), "alice@example.test", "pw")
    assert pop.startswith(b"-ERR [SYS/TEMP]")
