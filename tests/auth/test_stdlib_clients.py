"""SASL exchanges with Python's smtplib and imaplib clients over real loopback sockets."""

from __future__ import annotations

import hashlib
import hmac
import imaplib
import smtplib
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from mailserv.auth import build_portal
from mailserv.auth.ratelimit import AuthThrottle
from tests.auth.saslserver import SASLFactory

pytestmark = pytest.mark.integration


@pytest.fixture
def server(make_service: Any, tmp_path: Path) -> Any:
    from twisted.internet import reactor

    users = tmp_path / "users.passwd"
    users.write_text("alice@example.org:{PLAIN}wonder land\n")
    portal = build_portal(make_service({"f": {"type": "passwd-file", "path": str(users)}}))
    throttle = AuthThrottle(reactor, delay=0.05, max_penalty=0.1)
    ports = []

    def listen(imap: bool) -> tuple[Any, int]:
        factory = SASLFactory(portal, throttle, imap)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        return factory, port.getHost().port

    yield listen
    for port in ports:
        port.stopListening()


def smtp_login(port: int, mechanism: str, password: str) -> tuple[int, bytes]:
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    try:
        client.ehlo("client.example")
        client.user, client.password = "alice@example.org", password
        method = {
            "PLAIN": client.auth_plain,
            "LOGIN": client.auth_login,
            "CRAM-MD5": client.auth_cram_md5,
        }[mechanism]
        try:
            return client.auth(mechanism, method)
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code, exc.smtp_error
    finally:
        client.close()


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
@pytest_twisted.inlineCallbacks
def test_smtplib(server: Any, mechanism: str) -> Any:
    factory, port = server(False)
    code, _ = yield deferToThread(smtp_login, port, mechanism, "wonder land")
    assert code == 235
    assert factory.logins == ["alice@example.org"]
    code, _ = yield deferToThread(smtp_login, port, mechanism, "wrong")
    assert code == 535


@pytest_twisted.inlineCallbacks
def test_smtplib_login_picks_the_strongest(server: Any) -> Any:
    _, port = server(False)

    def run() -> Any:
        client = smtplib.SMTP("127.0.0.1", port, timeout=10)
        try:
            client.ehlo("client.example")
            assert client.esmtp_features["auth"].split()[:3] == [
                "SCRAM-SHA-256",
                "SCRAM-SHA-1",
                "CRAM-MD5",
            ]
            return client.login("alice@example.org", "wonder land")
        finally:
            client.close()

    code, _ = yield deferToThread(run)
    assert code == 235


def imap_session(port: int, how: str, password: str) -> str:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    try:
        if how == "LOGIN":
            typ, _ = client.login("alice@example.org", password)
        elif how == "CRAM-MD5":
            typ, _ = client.login_cram_md5("alice@example.org", password)
        else:  # PLAIN through AUTHENTICATE
            typ, _ = client.authenticate(
                "PLAIN", lambda _: f"\0alice@example.org\0{password}".encode()
            )
        return typ
    except imaplib.IMAP4.error as exc:
        return f"NO {exc}"
    finally:
        client.shutdown()


@pytest.mark.parametrize("how", ["LOGIN", "CRAM-MD5", "PLAIN"])
@pytest_twisted.inlineCallbacks
def test_imaplib(server: Any, how: str) -> Any:
    factory, port = server(True)
    assert (yield deferToThread(imap_session, port, how, "wonder land")) == "OK"
    assert factory.logins == ["alice@example.org"]
    assert (yield deferToThread(imap_session, port, how, "wrong")).startswith("NO")


def test_cram_md5_digest_is_what_smtplib_computes() -> None:
    """RFC 2195 §2 as smtplib implements it (hmac-md5, hex)."""
    challenge = b"<1896.697170952@postoffice.reston.mci.net>"
    digest = hmac.new(b"tanstaaftanstaaf", challenge, hashlib.md5).hexdigest()
    assert digest == "b913a602c7eda7a495b4e6e7334d3890"
