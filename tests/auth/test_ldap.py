"""LDAP against slapd: failover, ldaps:// and StartTLS with certificate checks, escaping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin

from mailserv.auth import build_portal
from mailserv.auth.ldap import user_dn, user_filter
from mailserv.errors import TemporaryFailure
from mailserv.interfaces import IMailUser
from tests.auth.conftest import ALICE_PASSWORD, Slapd

pytestmark = pytest.mark.integration


def section(server: Slapd, **extra: Any) -> dict[str, Any]:
    return {
        "type": "ldap",
        "urls": [server.url],
        "base_dn": "dc=example,dc=org",
        "bind_dn": server.reader_dn,
        "bind_password_file": server.reader_password_file,
        "timeout": "2s",
        **extra,
    }


def login(portal: Any, user: str = "alice@example.org", pw: str = ALICE_PASSWORD) -> Any:
    return portal.login(UsernamePassword(user.encode(), pw.encode()), None, IMailUser)


def other_ca(tmp_path: Path) -> str:
    from cryptography.hazmat.primitives import serialization

    from mailserv.tls import generate_certificate

    cert, _ = generate_certificate("some other CA", is_ca=True)
    path = tmp_path / "other-ca.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def test_escaping() -> None:
    """RFC 4515 §3 for filters, RFC 4514 §2.4 for DNs."""
    assert user_filter("(uid={user})", "*)(uid=*") == r"(uid=\2a\29\28uid=\2a)"
    assert user_filter("(uid={user})", "a\\b\0") == r"(uid=a\5cb\00)"
    assert user_dn("uid={user},dc=x", "a,b+c=d") == r"uid=a\,b\+c\=d,dc=x"
    assert user_dn("uid={user},dc=x", " lead") == r"uid=\ lead,dc=x"
    assert user_dn("uid={user},dc=x", "#lead") == r"uid=\#lead,dc=x"


@pytest_twisted.inlineCallbacks
def test_failover_to_the_next_server(
    slapd: Slapd, make_service: Any, closed_port: int, blackhole: Any
) -> Any:
    urls = [f"ldap://127.0.0.1:{closed_port}", f"ldap://127.0.0.1:{blackhole.port}", slapd.url]
    portal = build_portal(make_service({"l": section(slapd, urls=urls, timeout="1s")}))
    _, avatar, _ = yield login(portal)
    assert avatar.user.name == "alice@example.org"
    # The server that answered is tried first from now on.
    assert portal.checker.backends[0]._preferred == 2


@pytest_twisted.inlineCallbacks
def test_ldaps_with_the_right_ca(slapd: Slapd, make_service: Any) -> Any:
    portal = build_portal(
        make_service({"l": section(slapd, urls=[slapd.ldaps_url], ca_file=slapd.ca_file)})
    )
    _, avatar, _ = yield login(portal)
    assert avatar.user.name == "alice@example.org"
    with pytest.raises(UnauthorizedLogin):
        yield login(portal, pw="wrong")


@pytest_twisted.inlineCallbacks
def test_starttls_with_the_right_ca(slapd: Slapd, make_service: Any) -> Any:
    portal = build_portal(
        make_service({"l": section(slapd, start_tls=True, ca_file=slapd.ca_file)})
    )
    _, avatar, _ = yield login(portal)
    assert avatar.user.name == "alice@example.org"


@pytest.mark.parametrize("mode", ["ldaps", "starttls"])
@pytest_twisted.inlineCallbacks
def test_untrusted_certificate_is_a_temporary_failure(
    slapd: Slapd, make_service: Any, tmp_path: Path, mode: str
) -> Any:
    extra: dict[str, Any] = {"ca_file": other_ca(tmp_path)}
    if mode == "ldaps":
        extra["urls"] = [slapd.ldaps_url]
    else:
        extra["start_tls"] = True
    portal = build_portal(make_service({"l": section(slapd, **extra)}))
    with pytest.raises(TemporaryFailure):
        yield login(portal)


@pytest_twisted.inlineCallbacks
def test_wrong_service_password_is_a_temporary_failure(
    slapd: Slapd, make_service: Any, tmp_path: Path
) -> Any:
    bad = tmp_path / "bad.pw"
    bad.write_text("not-the-password\n")
    portal = build_portal(make_service({"l": section(slapd, bind_password_file=str(bad))}))
    with pytest.raises(TemporaryFailure):
        yield login(portal)


@pytest_twisted.inlineCallbacks
def test_ambiguous_search_is_refused(slapd: Slapd, make_service: Any) -> Any:
    """A filter that matches more than one entry never logs anyone in."""
    loose = "(|(uid={user})(objectClass=inetOrgPerson))"
    portal = build_portal(make_service({"l": section(slapd, user_filter=loose)}))
    with pytest.raises(UnauthorizedLogin):
        yield login(portal, user="alice")


@pytest.mark.parametrize("mode", ["search", "bind"])
@pytest_twisted.inlineCallbacks
def test_user_bind_connections_are_reused(slapd: Slapd, make_service: Any, mode: str) -> Any:
    extra = {"bind_dn_template": "uid={user},ou=people,dc=example,dc=org"} if mode == "bind" else {}
    portal = build_portal(make_service({"l": section(slapd, **extra)}))
    backend = portal.checker.backends[0]
    user = "alice" if mode == "bind" else "alice@example.org"
    for password in (ALICE_PASSWORD, "wrong", ALICE_PASSWORD, "wrong", ALICE_PASSWORD):
        if password == "wrong":
            with pytest.raises(UnauthorizedLogin):
                yield login(portal, user, password)
        else:
            _, avatar, _ = yield login(portal, user, password)
            assert avatar.user.name == "alice@example.org"
        assert backend._bind_pool.qsize() == 1  # one connection, rebound every time
    # Even below the portal, an empty password never turns into an anonymous bind.
    assert (yield backend.verify_password(user, b"")) is None


@pytest_twisted.inlineCallbacks
def test_attribute_mapping(slapd: Slapd, make_service: Any) -> Any:
    """mail, aliases, quota and mailbox path come from the configured attributes."""
    from mailserv.auth import build_directory

    ldap = section(slapd, quota_attribute="mailQuota", mailbox_attribute="description")
    directory = build_directory(make_service({"l": ldap}))
    user = yield directory.lookup("a.l+news@example.net")
    assert user.name == "alice@example.org"
    assert user.mailbox == "/srv/mail/alice/Maildir"
    assert user.quota_bytes == 100_000_000
    assert set(user.addresses) == {"alice@example.org", "ali@example.org", "a.l@example.net"}
    assert user.extra["dn"] == "uid=alice,ou=people,dc=example,dc=org"
