"""SASL mechanisms against the RFC test vectors, and whole exchanges through the portal."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin

from mailserv.auth import build_portal, sasl, schemes
from mailserv.auth.credentials import APOPCredentials, CramMD5Credentials
from mailserv.interfaces import IMailUser

RFC2195_CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"


def result_of(d: Any) -> Any:
    """The result of an already fired Deferred (the mechanisms answer synchronously)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def passwd_portal(make_service: Any, tmp_path: Path, lines: list[str]) -> Any:
    path = tmp_path / "users.passwd"
    path.write_text("".join(line + "\n" for line in lines))
    return build_portal(make_service({"local": {"type": "passwd-file", "path": str(path)}}))


# --------------------------------------------------------------------------
# What is advertised


def test_argon2_passwd_file_advertises_no_challenge_mechanisms(
    make_service: Any, tmp_path: Path
) -> None:
    portal = passwd_portal(make_service, tmp_path, [f"alice:{schemes.hash_password('x')}"])
    assert sasl.mechanisms_for(portal, secure=True) == ["PLAIN", "LOGIN"]
    assert sasl.mechanisms_for(portal, secure=False) == []
    assert not sasl.apop_available(portal)
    assert portal.listCredentialsInterfaces() == [IUsernamePassword]


def test_plaintext_passwd_file_advertises_everything(make_service: Any, tmp_path: Path) -> None:
    portal = passwd_portal(make_service, tmp_path, ["alice:{PLAIN}x", "bob:{SHA512-CRYPT}$6$x$y"])
    assert sasl.mechanisms_for(portal, secure=True) == [
        "SCRAM-SHA-256",
        "SCRAM-SHA-1",
        "CRAM-MD5",
        "PLAIN",
        "LOGIN",
    ]
    assert sasl.mechanisms_for(portal, secure=False) == ["SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5"]
    assert sasl.apop_available(portal)


def test_stored_scram_keys_advertise_only_that_mechanism(make_service: Any, tmp_path: Path) -> None:
    stored = schemes.hash_password("pencil", "SCRAM-SHA-256")
    portal = passwd_portal(make_service, tmp_path, [f"user:{stored}"])
    assert sasl.mechanisms_for(portal, secure=True) == ["SCRAM-SHA-256", "PLAIN", "LOGIN"]
    assert not sasl.apop_available(portal)


def test_advertising_follows_the_file(make_service: Any, tmp_path: Path) -> None:
    portal = passwd_portal(make_service, tmp_path, ["alice:{CRAM-MD5}" + "00" * 32])
    assert "CRAM-MD5" in sasl.mechanisms_for(portal, secure=False)
    backend = portal.checker.backends[0]
    path = Path(backend.section.path)
    path.write_text(f"alice:{schemes.hash_password('x', 'SHA256-CRYPT')}::::::\n")
    backend.file.entries()  # what the next lookup does in the auth pool
    assert sasl.mechanisms_for(portal, secure=False) == []


# --------------------------------------------------------------------------
# Wire helpers


def test_decode_response() -> None:
    assert sasl.decode_response(b"=") == b""
    assert sasl.decode_response(b"dGVzdA==") == b"test"
    with pytest.raises(sasl.SASLCancelled):
        sasl.decode_response(b"*")
    with pytest.raises(sasl.SASLError):
        sasl.decode_response(b"not base64!")
    assert sasl.encode_challenge(b"Username:") == b"VXNlcm5hbWU6"
    assert sasl.encode_challenge(b"Password:") == b"UGFzc3dvcmQ6"


# --------------------------------------------------------------------------
# PLAIN and LOGIN (RFC 4616, draft-murchison-sasl-login)


def test_plain_with_initial_response() -> None:
    creds = result_of(sasl.new_mechanism("PLAIN", "h").start(b"\0tim\0tanstaaf"))
    assert IUsernamePassword.providedBy(creds)
    assert (creds.username, creds.password, creds.authzid) == (b"tim", b"tanstaaf", b"")


def test_plain_without_initial_response_and_with_authzid() -> None:
    mech = sasl.new_mechanism("plain", "h")
    assert result_of(mech.start(None)) == sasl.Challenge(b"")
    creds = result_of(mech.step(b"tim\0tim\0tanstaaf"))
    assert creds.authzid == b"tim"


@pytest.mark.parametrize("message", [b"", b"tim", b"\0\0pw", b"a\0b\0c\0d", b"\0\xff\xfe\0pw"])
def test_plain_malformed(message: bytes) -> None:
    with pytest.raises(sasl.SASLError):
        result_of(sasl.new_mechanism("PLAIN", "h").start(message))


def test_login_prompts() -> None:
    mech = sasl.new_mechanism("LOGIN", "h")
    challenge = result_of(mech.start(None))
    assert base64.b64encode(challenge.data) == b"VXNlcm5hbWU6"
    challenge = result_of(mech.step(b"tim"))
    assert base64.b64encode(challenge.data) == b"UGFzc3dvcmQ6"
    creds = result_of(mech.step(b"tanstaaf"))
    assert (creds.username, creds.password) == (b"tim", b"tanstaaf")


def test_login_with_initial_username() -> None:
    mech = sasl.new_mechanism("LOGIN", "h")
    assert result_of(mech.start(b"tim")).data == b"Password:"


def test_unknown_mechanism() -> None:
    with pytest.raises(KeyError):
        sasl.new_mechanism("GSSAPI", "h")


# --------------------------------------------------------------------------
# CRAM-MD5 (RFC 2195 §2) and APOP (RFC 1939 §7)


def test_cram_md5_rfc2195_vector() -> None:
    creds = CramMD5Credentials("tim", RFC2195_CHALLENGE, b"b913a602c7eda7a495b4e6e7334d3890")
    assert creds.check_secret("{PLAIN}tanstaaftanstaaf")
    assert creds.check_secret(schemes.hash_password("tanstaaftanstaaf", "CRAM-MD5"))
    assert not creds.check_secret("{PLAIN}tanstaaf")
    assert not creds.check_secret(schemes.hash_password("tanstaaftanstaaf", "SSHA"))


def test_cram_md5_challenge_is_random_and_well_formed() -> None:
    first = result_of(sasl.new_mechanism("CRAM-MD5", "mail.example.org").start(None)).data
    second = result_of(sasl.new_mechanism("CRAM-MD5", "mail.example.org").start(None)).data
    assert first != second
    assert first.startswith(b"<") and first.endswith(b"@mail.example.org>")


def test_cram_md5_malformed() -> None:
    mech = sasl.new_mechanism("CRAM-MD5", "h")
    result_of(mech.start(None))
    with pytest.raises(sasl.SASLError):
        result_of(mech.step(b"no-digest"))
    with pytest.raises(sasl.SASLError):
        result_of(sasl.new_mechanism("CRAM-MD5", "h").start(b"unexpected"))


def test_apop_rfc1939_vector() -> None:
    creds = sasl.apop_credentials(
        "mrose", b"<1896.697170952@dbc.mtview.ca.us>", "c4c9334bac560ecc979e58001b3e22fb"
    )
    assert isinstance(creds, APOPCredentials)
    assert creds.check_secret("{PLAIN}tanstaaf")
    assert creds.check_secret("{CLEAR}tanstaaf")
    assert not creds.check_secret("{PLAIN}tanstaa")
    assert not creds.check_secret(schemes.hash_password("tanstaaf", "CRAM-MD5"))


# --------------------------------------------------------------------------
# SCRAM (RFC 5802 §5, RFC 7677 §3)

RFC5802 = {
    "mechanism": "SCRAM-SHA-1",
    "client_first": "n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
    "server_nonce": "3rfcNHYJY1ZVvWVs7j",
    "salt": "QSXCR+Q6sek8bf92",
    "server_first": "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
    "client_final": "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,"
    "p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
    "server_final": "v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
}
RFC7677 = {
    "mechanism": "SCRAM-SHA-256",
    "client_first": "n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
    "server_nonce": "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
    "salt": "W22ZaJ0SNY7soEsUEjb6gQ==",
    "server_first": "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    "s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
    "client_final": "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
    "server_final": "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
}


@pytest.mark.parametrize("vector", [RFC5802, RFC7677], ids=["rfc5802", "rfc7677"])
@pytest_twisted.inlineCallbacks
def test_scram_rfc_vectors(make_service: Any, tmp_path: Path, vector: dict[str, str]) -> Any:
    mechanism = vector["mechanism"]
    secret = schemes.ScramSecret.derive(b"pencil", mechanism, base64.b64decode(vector["salt"]))
    portal = passwd_portal(make_service, tmp_path, [f"user:{{{mechanism}}}{secret.encode()}"])
    mech = sasl.new_mechanism(mechanism, "h", portal, nonce=lambda: vector["server_nonce"])
    challenge = yield mech.start(vector["client_first"].encode())
    assert challenge.data.decode() == vector["server_first"]
    challenge = yield mech.step(vector["client_final"].encode())
    assert challenge.data.decode() == vector["server_final"]
    creds = yield mech.step(b"")
    _, avatar, _ = yield portal.login(creds, None, IMailUser)
    assert avatar.user.name == "user"


class ScramClient:
    """A minimal RFC 5802 client, to run exchanges with random nonces and salts."""

    def __init__(self, mechanism: str, username: str, password: bytes) -> None:
        self.hash = schemes.SCRAM_HASHES[mechanism]
        self.username, self.password = username, password
        self.nonce = base64.b64encode(b"client-nonce-123").decode()
        self.bare = f"n={username},r={self.nonce}"

    def first(self) -> bytes:
        return f"n,,{self.bare}".encode()

    def final(self, server_first: bytes) -> bytes:
        attrs = dict(part.split("=", 1) for part in server_first.decode().split(","))
        salted = hashlib.pbkdf2_hmac(
            self.hash, self.password, base64.b64decode(attrs["s"]), int(attrs["i"])
        )
        client_key = hmac.new(salted, b"Client Key", self.hash).digest()
        stored = hashlib.new(self.hash, client_key).digest()
        without_proof = f"c=biws,r={attrs['r']}"
        auth_message = f"{self.bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.new(stored, auth_message, self.hash).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.new(salted, b"Server Key", self.hash).digest()
        self.expected_server = hmac.new(server_key, auth_message, self.hash).digest()
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-1", "SCRAM-SHA-256"])
@pytest_twisted.inlineCallbacks
def test_scram_with_plaintext_secret(make_service: Any, tmp_path: Path, mechanism: str) -> Any:
    portal = passwd_portal(make_service, tmp_path, ["alice@example.org:{PLAIN}wonder land"])
    client = ScramClient(mechanism, "alice@example.org", b"wonder land")
    mech = sasl.new_mechanism(mechanism, "h", portal)
    assert (yield mech.start(None)) == sasl.Challenge(b"")
    server_first = (yield mech.step(client.first())).data
    assert server_first.startswith(f"r={client.nonce}".encode())
    server_final = (yield mech.step(client.final(server_first))).data
    assert server_final == b"v=" + base64.b64encode(client.expected_server)
    creds = yield mech.step(b"")
    _, avatar, _ = yield portal.login(creds, None, IMailUser)
    assert avatar.user.name == "alice@example.org"


@pytest.mark.parametrize("username", ["alice@example.org", "nobody", "bad,name"])
@pytest_twisted.inlineCallbacks
def test_scram_wrong_password_or_unknown_user(
    make_service: Any, tmp_path: Path, username: str
) -> Any:
    """No server signature, and credentials the portal refuses; unknown users look the same."""
    portal = passwd_portal(make_service, tmp_path, ["alice@example.org:{PLAIN}wonder land"])
    client = ScramClient("SCRAM-SHA-256", username.replace(",", "=2C"), b"wrong")
    mech = sasl.new_mechanism("SCRAM-SHA-256", "h", portal)
    server_first = (yield mech.start(client.first())).data
    assert b",s=" in server_first and server_first.endswith(b",i=4096")
    creds = yield mech.step(client.final(server_first))
    assert not isinstance(creds, sasl.Challenge)
    with pytest.raises(UnauthorizedLogin):
        yield portal.login(creds, None, IMailUser)


@pytest.mark.parametrize(
    "first, final",
    [
        (b"p=tls-unique,,n=user,r=abc", None),  # channel binding is not offered
        (b"n,,m=ext,n=user,r=abc", None),  # mandatory extension
        (b"n,,r=abc", None),
        (b"n,,n=us=er,r=abc", None),  # bad saslname escape
        (b"garbage", None),
        (b"n,,n=user,r=abc", b"c=biws,r=other-nonce,p=AAAA"),  # nonce mismatch
        (b"n,,n=user,r=abc", b"c=eSws,r={nonce},p=AAAA"),  # gs2 header mismatch
        (b"n,,n=user,r=abc", b"c=biws,r={nonce}"),  # no proof
        (b"n,,n=user,r=abc", b"c=biws,r={nonce},p=!!!"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_scram_malformed(
    make_service: Any, tmp_path: Path, first: bytes, final: bytes | None
) -> Any:
    portal = passwd_portal(make_service, tmp_path, ["user:{PLAIN}pencil"])
    mech = sasl.new_mechanism("SCRAM-SHA-1", "h", portal, nonce=lambda: "srv")
    if final is None:
        with pytest.raises(sasl.SASLError):
            yield mech.start(first)
        return
    yield mech.start(first)
    with pytest.raises(sasl.SASLError):
        yield mech.step(final.replace(b"{nonce}", b"abcsrv"))


# --------------------------------------------------------------------------
# Through the portal


@pytest_twisted.inlineCallbacks
def test_cram_md5_through_the_portal(make_service: Any, tmp_path: Path) -> Any:
    stored = schemes.hash_password("tanstaaftanstaaf", "CRAM-MD5")
    portal = passwd_portal(make_service, tmp_path, [f"tim@example.org:{stored}", "bob:{PLAIN}b"])
    mech = sasl.new_mechanism("CRAM-MD5", "mail.example.org", portal)
    challenge = (yield mech.start(None)).data
    digest = hmac.new(b"tanstaaftanstaaf", challenge, "md5").hexdigest()
    creds = yield mech.step(b"TIM@example.org " + digest.encode())
    _, avatar, _ = yield portal.login(creds, None, IMailUser)
    assert avatar.user.name == "tim@example.org"
    mech = sasl.new_mechanism("CRAM-MD5", "mail.example.org", portal)
    challenge = (yield mech.start(None)).data
    wrong = hmac.new(b"tanstaaf", challenge, "md5").hexdigest()
    creds = yield mech.step(b"tim@example.org " + wrong.encode())
    with pytest.raises(UnauthorizedLogin):
        yield portal.login(creds, None, IMailUser)


@pytest_twisted.inlineCallbacks
def test_apop_through_the_portal(make_service: Any, tmp_path: Path) -> Any:
    portal = passwd_portal(make_service, tmp_path, ["mrose:{PLAIN}tanstaaf"])
    timestamp = sasl.apop_challenge("mail.example.org")
    digest = hashlib.md5(timestamp + b"tanstaaf").hexdigest()
    _, avatar, _ = yield portal.login(
        sasl.apop_credentials("mrose", timestamp, digest), None, IMailUser
    )
    assert avatar.user.name == "mrose"
    with pytest.raises(UnauthorizedLogin):
        yield portal.login(sasl.apop_credentials("mrose", timestamp, "0" * 32), None, IMailUser)


@pytest_twisted.inlineCallbacks
def test_plain_authzid_must_be_the_user(make_service: Any, tmp_path: Path) -> Any:
    portal = passwd_portal(make_service, tmp_path, ["alice:{PLAIN}pw", "admin:{PLAIN}root"])
    creds = yield sasl.new_mechanism("PLAIN", "h").start(b"ALICE\0alice\0pw")
    _, avatar, _ = yield portal.login(creds, None, IMailUser)
    assert avatar.user.name == "alice"
    creds = yield sasl.new_mechanism("PLAIN", "h").start(b"admin\0alice\0pw")
    with pytest.raises(UnauthorizedLogin):
        yield portal.login(creds, None, IMailUser)


@pytest_twisted.inlineCallbacks
def test_scram_salts_do_not_reveal_unknown_users(make_service: Any, tmp_path: Path) -> Any:
    """RFC 5802 §9: the same salt every time, for real (plaintext) and unknown users alike."""
    portal = passwd_portal(make_service, tmp_path, ["alice@example.org:{PLAIN}wonder land"])

    def salt_of(user: str) -> Any:
        mech = sasl.new_mechanism("SCRAM-SHA-256", "h", portal)
        return mech.start(ScramClient("SCRAM-SHA-256", user, b"x").first()).addCallback(
            lambda c: c.data.split(b",s=")[1].split(b",")[0]
        )

    for user in ("alice@example.org", "nobody@example.org"):
        first = yield salt_of(user)
        second = yield salt_of(user)
        assert first == second and len(base64.b64decode(first)) == 16
    alice = yield salt_of("alice@example.org")
    nobody = yield salt_of("nobody@example.org")
    assert alice != nobody
