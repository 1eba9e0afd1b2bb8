"""PortalBackend: the POP3 server's view of mailserv.auth (throttled login, SASL, APOP)."""

from __future__ import annotations

from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer

from mailserv.auth.portal import MailUser
from mailserv.directory import User
from mailserv.interfaces import IAPOPCredentials, IMailUser
from mailserv.pop3 import PortalBackend


class Throttle:
    def __init__(self, result: Any) -> None:
        self.result = result
        self.calls: list[tuple[Any, str, tuple[Any, ...]]] = []

    def login(self, portal: Any, creds: Any, ip: str, *ifaces: Any) -> defer.Deferred[Any]:
        self.calls.append((creds, ip, ifaces))
        if isinstance(self.result, Exception):
            return defer.fail(self.result)
        return defer.succeed(self.result)


class Recorder:
    def __init__(self) -> None:
        self.recorded: list[str] = []

    def record(self, address: str) -> defer.Deferred[None]:
        self.recorded.append(address)
        return defer.succeed(None)


class Portal:
    def __init__(self, kinds: frozenset[str]) -> None:
        self.checker = type("Checker", (), {"secret_kinds": lambda self: kinds})()

    def listCredentialsInterfaces(self) -> list[Any]:
        from twisted.cred.credentials import IUsernamePassword

        return [IUsernamePassword]


def test_login_returns_the_user_and_records_pop_before_smtp():
    user = User(name="alice@example.test", mailbox="/m")
    logged_out = []
    throttle = Throttle((IMailUser, MailUser(user), lambda: logged_out.append(True)))
    recorder = Recorder()
    backend = PortalBackend(Portal(frozenset()), throttle, "mail.example.test", recorder)
    got = []
    backend.login("creds", "192.0.2.1").addCallback(got.append)
    assert got == [user]
    assert throttle.calls == [("creds", "192.0.2.1", (IMailUser,))]
    assert recorder.recorded == ["192.0.2.1"]
    assert logged_out == [True]


def test_failed_login_records_nothing():
    recorder = Recorder()
    backend = PortalBackend(Portal(frozenset()), Throttle(UnauthorizedLogin()), "h", recorder)
    failures = []
    backend.login("creds", "192.0.2.1").addErrback(failures.append)
    assert failures[0].check(UnauthorizedLogin)
    assert recorder.recorded == []


def test_apop_and_mechanisms_follow_the_backends_secrets():
    hashed = PortalBackend(Portal(frozenset()), None, "h")
    assert not hashed.apop_enabled()
    assert hashed.mechanisms(secure=False) == []
    assert hashed.mechanisms(secure=True) == ["PLAIN", "LOGIN"]
    plain = PortalBackend(Portal(frozenset({"APOP", "CRAM-MD5"})), None, "h")
    assert plain.apop_enabled()
    assert plain.mechanisms(secure=False) == ["CRAM-MD5"]
    creds = plain.apop_credentials(b"alice", b"<1.2@h>", b"0" * 32)
    assert IAPOPCredentials.providedBy(creds) and creds.username == "alice"
    assert plain.start_sasl("CRAM-MD5").name == "CRAM-MD5"


def test_build_factory_from_a_listener_section(tmp_path):
    from twisted.internet.task import Clock

    from mailserv.config import from_dict
    from mailserv.pop3 import build_factory

    config = from_dict(
        {
            "config_version": 1,
            "hostname": "mail.example.test",
            "domains": ["example.test"],
            "state_dir": str(tmp_path),
            "listeners": {
                "pop3": {
                    "protocol": "pop3",
                    "endpoints": ["tcp:0:interface=127.0.0.1"],
                    "login_delay": "5m",
                    "allow_plaintext_auth": "never",
                    "max_connections_per_ip": 7,
                    "idle_timeout": "20m",
                },
                "pop3s": {
                    "protocol": "pop3",
                    "endpoints": ["tcp:0:interface=127.0.0.1"],
                    "tls": "implicit",
                },
            },
            "store": {"path": str(tmp_path / "mail/{user}")},
        }
    )

    class Service:
        reactor = Clock()
        threads = None
        portal = Portal(frozenset())

        def __init__(self) -> None:
            self.config = config

        def tls_options(self) -> str:
            return "tls"

    service = Service()
    f = build_factory(service, "pop3", config.listeners["pop3"])
    assert f.login_delay == 300 and f.allow_plaintext_auth == "never"
    assert f.max_connections_per_ip == 7 and f.idle_timeout == 1200
    assert f.tls_options is not None and f.tls_options() == "tls"
    implicit = build_factory(service, "pop3s", config.listeners["pop3s"])
    assert implicit.tls_options is None  # the service wraps it in TLS: no STLS
    assert implicit.idle_timeout == 600 and implicit.login_delay == 0
    assert implicit.last_login is f.last_login  # one LOGIN-DELAY record per service
