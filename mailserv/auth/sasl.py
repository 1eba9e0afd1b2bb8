"""Server-side SASL for SMTP AUTH (RFC 4954), IMAP AUTHENTICATE (RFC 3501) and POP3 AUTH (RFC 5034).

Mechanisms: PLAIN (RFC 4616), LOGIN (draft-murchison-sasl-login, with the
exact ``Username:``/``Password:`` prompts, base64 ``VXNlcm5hbWU6`` and
``UGFzc3dvcmQ6``, that Outlook expects), CRAM-MD5 (RFC 2195), SCRAM-SHA-1
(RFC 5802) and SCRAM-SHA-256 (RFC 7677).  APOP (RFC 1939 §7) is POP3's own
and has helpers at the end.

How a protocol uses it::

    names = mechanisms_for(portal, secure)            # what to advertise
    mech = new_mechanism(name, hostname, portal)       # on AUTH <name> [initial]
    d = mech.start(decode_response(initial) if initial else None)
    # d fires with Challenge(data): send base64(data) ("334 ..." / "+ ...") and
    # feed the decoded client line to mech.step(...) -> Deferred, again and again;
    # or with credentials: throttle.login(portal, creds, ip, IMailUser).
    # SASLError (bad base64, malformed message, "*") -> 501 5.5.2 / BAD / -ERR;
    # SASLCancelled for "*": 501 5.0.0 (RFC 4954 §4).

Challenges and nonces come from ``secrets``.  Nothing here logs a payload.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.internet import defer
from zope.interface import implementer

from mailserv.auth import schemes
from mailserv.auth.credentials import (
    APOPCredentials,
    CramMD5Credentials,
    ScramCredentials,
    make_challenge,
    scram_secret,
    verify_client_proof,
)
from mailserv.auth.usernames import InvalidUsername, normalize_username
from mailserv.errors import TemporaryFailure
from mailserv.interfaces import IAPOPCredentials, ICramMD5Credentials, IScramCredentials

LOGIN_USERNAME_PROMPT = b"Username:"  # base64: VXNlcm5hbWU6
LOGIN_PASSWORD_PROMPT = b"Password:"  # base64: UGFzc3dvcmQ6
CLEARTEXT = ("PLAIN", "LOGIN")
ORDER = ("SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN")


class SASLError(Exception):
    """The client broke the exchange (bad base64, malformed message): a syntax error reply."""


class SASLCancelled(SASLError):
    """The client sent ``*`` (RFC 4954 §4): ``501 5.0.0``."""


@dataclass(frozen=True)
class Challenge:
    """Data for the client (raw bytes; the protocol base64-encodes it)."""

    data: bytes


def decode_response(line: bytes | str) -> bytes:
    """A client's base64 SASL line as bytes; ``=`` is the empty response (RFC 4954 §4)."""
    if isinstance(line, str):
        line = line.encode("ascii", "replace")
    line = line.strip()
    if line == b"*":
        raise SASLCancelled("authentication cancelled")
    if line == b"=":
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise SASLError("invalid base64") from None


def encode_challenge(data: bytes) -> bytes:
    """A challenge as it goes on the wire (no line breaks)."""
    return base64.b64encode(data)


@implementer(IUsernamePassword)
class PlainCredentials(UsernamePassword):
    """RFC 4616 credentials; ``authzid`` must be empty or the authenticating user."""

    def __init__(self, username: bytes, password: bytes, authzid: bytes = b"") -> None:
        super().__init__(username, password)
        self.authzid = authzid


# --------------------------------------------------------------------------
# What to advertise


def secret_kinds(portal: Any) -> frozenset[str]:
    """The challenge mechanisms some backend of ``portal`` can verify now."""
    checker = getattr(portal, "checker", None)
    if checker is not None and hasattr(checker, "secret_kinds"):
        return frozenset(checker.secret_kinds())
    ifaces = portal.listCredentialsInterfaces()
    kinds: set[str] = set()
    if ICramMD5Credentials in ifaces:
        kinds.add("CRAM-MD5")
    if IAPOPCredentials in ifaces:
        kinds.add("APOP")
    if IScramCredentials in ifaces:
        kinds |= set(schemes.SCRAM_HASHES)
    return frozenset(kinds)


def mechanisms_for(portal: Any, secure: bool) -> list[str]:
    """SASL mechanisms to advertise, strongest first.

    ``secure`` is True when cleartext passwords may be sent (TLS is on, or the
    listener's ``allow_plaintext_auth`` permits this peer).  Challenge
    mechanisms are listed only if a backend holds plaintext-equivalent
    secrets for them (a passwd-file of ARGON2ID hashes offers PLAIN and
    LOGIN only).
    """
    kinds = secret_kinds(portal)
    out = [m for m in ORDER if m in kinds]
    if secure and IUsernamePassword in portal.listCredentialsInterfaces():
        out += list(CLEARTEXT)
    return out


def apop_available(portal: Any) -> bool:
    """Whether POP3 may put an APOP timestamp in its greeting (RFC 1939 §7)."""
    return "APOP" in secret_kinds(portal)


def apop_challenge(hostname: str) -> bytes:
    """The ``<...@host>`` timestamp of a POP3 greeting, from ``secrets``."""
    return make_challenge(hostname)


def apop_credentials(username: str, timestamp: bytes, digest: str | bytes) -> APOPCredentials:
    """Credentials for ``APOP name digest``."""
    if isinstance(digest, str):
        digest = digest.encode("ascii", "replace")
    return APOPCredentials(username, timestamp, digest)


# --------------------------------------------------------------------------
# Mechanisms


class Mechanism:
    """One exchange; ``start`` and ``step`` return Deferred[Challenge | credentials]."""

    name = ""

    def start(self, initial_response: bytes | None) -> defer.Deferred[Any]:
        return self._safe(self._start, initial_response)

    def step(self, response: bytes) -> defer.Deferred[Any]:
        return self._safe(self._step, response)

    def _safe(self, fn: Callable[[Any], Any], arg: Any) -> defer.Deferred[Any]:
        try:
            return defer.maybeDeferred(fn, arg)
        except SASLError as exc:
            return defer.fail(exc)

    def _start(self, initial_response: bytes | None) -> Any:
        raise NotImplementedError

    def _step(self, response: bytes) -> Any:
        raise NotImplementedError


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError("not UTF-8") from None


class PlainMechanism(Mechanism):
    """RFC 4616: ``[authzid] NUL authcid NUL passwd`` in one message."""

    name = "PLAIN"

    def _start(self, initial_response: bytes | None) -> Any:
        if initial_response is None:
            return Challenge(b"")
        return self._step(initial_response)

    def _step(self, response: bytes) -> Any:
        parts = response.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            raise SASLError("malformed PLAIN message")
        authzid, authcid, passwd = parts
        _utf8(authzid)
        _utf8(authcid)
        return PlainCredentials(authcid, passwd, authzid)


class LoginMechanism(Mechanism):
    """The LOGIN mechanism: username and password as two answers."""

    name = "LOGIN"

    def __init__(self) -> None:
        self.username: bytes | None = None

    def _start(self, initial_response: bytes | None) -> Any:
        if initial_response is None:
            return Challenge(LOGIN_USERNAME_PROMPT)
        return self._step(initial_response)

    def _step(self, response: bytes) -> Any:
        if self.username is None:
            _utf8(response)
            self.username = response
            return Challenge(LOGIN_PASSWORD_PROMPT)
        return UsernamePassword(self.username, response)


class CramMD5Mechanism(Mechanism):
    """RFC 2195: challenge ``<random.pid@host>``, answer ``user SP hex-digest``."""

    name = "CRAM-MD5"

    def __init__(self, hostname: str) -> None:
        self.challenge = make_challenge(hostname)

    def _start(self, initial_response: bytes | None) -> Any:
        if initial_response:
            raise SASLError("CRAM-MD5 takes no initial response")
        return Challenge(self.challenge)

    def _step(self, response: bytes) -> Any:
        user, sep, digest = response.rpartition(b" ")
        if not sep or not user or len(digest) != 32:
            raise SASLError("malformed CRAM-MD5 response")
        return CramMD5Credentials(_utf8(user), self.challenge, digest)


_SALT_KEY = secrets.token_bytes(32)


def pseudo_salt(username: str) -> bytes:
    """A per-process stable salt for users without a stored one (plaintext secret, unknown).

    The same name always gets the same salt, so that salts do not tell
    unknown users from real ones (RFC 5802 §9).
    """
    return hmac.new(_SALT_KEY, username.encode("utf-8", "surrogateescape"), "sha256").digest()[:16]


def _scram_name(value: str) -> str:
    """saslname decoding: =2C is ',', =3D is '=' (RFC 5802 §5.1)."""
    if "=" in value.replace("=2C", "").replace("=3D", ""):
        raise SASLError("bad saslname")
    return value.replace("=2C", ",").replace("=3D", "=")


def _attributes(message: str) -> list[tuple[str, str]]:
    out = []
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=":
            raise SASLError("malformed SCRAM attribute")
        out.append((part[0], part[2:]))
    return out


class ScramMechanism(Mechanism):
    """SCRAM-SHA-1 / SCRAM-SHA-256 without channel binding (RFC 5802 §5, RFC 7677).

    The server proves itself (``v=``) only after checking the client's proof
    against the secret it announced; a wrong proof ends the exchange with
    credentials that the portal refuses, so the failure delay applies.
    """

    def __init__(
        self,
        name: str,
        hostname: str,
        portal: Any,
        nonce: Callable[[], str] | None = None,
    ) -> None:
        self.name = name
        self.hash_name = schemes.SCRAM_HASHES[name]
        self.portal = portal
        self._nonce = nonce or (lambda: secrets.token_urlsafe(18))
        self.state = "start"
        self.credentials: ScramCredentials | None = None
        self.server_signature = b""
        self.authzid_ok = True

    def _start(self, initial_response: bytes | None) -> Any:
        if initial_response is None:
            return Challenge(b"")
        return self._step(initial_response)

    def _step(self, response: bytes) -> Any:
        if self.state == "start":
            return self._client_first(_utf8(response))
        if self.state == "first":
            return self._client_final(_utf8(response))
        if self.state == "verified" and response == b"":
            self.state = "done"
            return self.credentials
        raise SASLError("unexpected SCRAM message")

    @defer.inlineCallbacks
    def _client_first(self, message: str) -> Any:
        # gs2-header: gs2-cbind-flag "," [authzid] ","
        flag, _, rest = message.partition(",")
        authzid, _, bare = rest.partition(",")
        if flag not in ("n", "y") or not bare:
            raise SASLError(
                "channel binding is not supported"
                if flag.startswith("p")
                else "malformed client-first-message"
            )
        self.gs2_header = f"{flag},{authzid},"
        attrs = _attributes(bare)
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r" or not attrs[1][1]:
            if attrs and attrs[0][0] == "m":
                raise SASLError("unsupported SCRAM extension")
            raise SASLError("malformed client-first-message")
        self.username = _scram_name(attrs[0][1])
        if authzid:
            if not authzid.startswith("a=") or _scram_name(authzid[2:]) != self.username:
                self.authzid_ok = False
        self.client_first_bare = bare
        self.nonce = attrs[1][1] + self._nonce()
        self.secret = yield self._lookup_secret()
        salt, iterations = self.secret.salt, self.secret.iterations
        self.server_first = f"r={self.nonce},s={base64.b64encode(salt).decode()},i={iterations}"
        self.state = "first"
        return Challenge(self.server_first.encode())

    @defer.inlineCallbacks
    def _lookup_secret(self) -> Any:
        """The user's SCRAM secret, or a fake one (same shape) for an unknown user."""
        try:
            username = normalize_username(self.username)
        except InvalidUsername:
            username = None
        stored = None
        checker = getattr(self.portal, "checker", None)
        if username is not None and checker is not None:
            for backend in checker.backends:
                if self.name not in backend.secret_kinds():
                    continue
                try:
                    found = yield backend.secret(username)
                except TemporaryFailure:
                    continue
                if found is not None:
                    stored = found[1]
                    break
        secret = None
        if stored is not None:
            secret = scram_secret(stored, self.name, pseudo_salt(self.username))
        if secret is None:
            # RFC 5802 §9: an unknown user gets a salt as stable as a real one.
            secret = schemes.ScramSecret.derive(
                secrets.token_bytes(16), self.name, pseudo_salt(self.username)
            )
        return secret

    def _client_final(self, message: str) -> Any:
        without_proof, sep, proof_part = message.rpartition(",p=")
        if not sep:
            raise SASLError("client-final-message without proof")
        attrs = dict(_attributes(without_proof))
        expected_cb = base64.b64encode(self.gs2_header.encode()).decode()
        try:
            proof = base64.b64decode(proof_part, validate=True)
        except (binascii.Error, ValueError):
            raise SASLError("bad proof encoding") from None
        if attrs.get("c") != expected_cb or attrs.get("r") != self.nonce:
            raise SASLError("channel binding or nonce mismatch")
        auth_message = f"{self.client_first_bare},{self.server_first},{without_proof}".encode()
        self.credentials = ScramCredentials(
            self.username,
            self.name,
            auth_message,
            proof,
            self.secret.salt,
            self.secret.iterations,
        )
        if not self.authzid_ok or not verify_client_proof(self.secret, auth_message, proof):
            self.state = "done"
            self.credentials.proof = b""  # can never verify
            return self.credentials
        self.server_signature = hmac.new(
            self.secret.server_key, auth_message, self.hash_name
        ).digest()
        self.state = "verified"
        return Challenge(b"v=" + base64.b64encode(self.server_signature))


def new_mechanism(
    name: str, hostname: str, portal: Any = None, nonce: Callable[[], str] | None = None
) -> Mechanism:
    """A fresh exchange for mechanism ``name`` (KeyError if unknown)."""
    name = name.upper()
    if name == "PLAIN":
        return PlainMechanism()
    if name == "LOGIN":
        return LoginMechanism()
    if name == "CRAM-MD5":
        return CramMD5Mechanism(hostname)
    if name in schemes.SCRAM_HASHES:
        return ScramMechanism(name, hostname, portal, nonce)
    raise KeyError(name)


__all__ = [
    "LOGIN_PASSWORD_PROMPT",
    "LOGIN_USERNAME_PROMPT",
    "Challenge",
    "Mechanism",
    "PlainCredentials",
    "SASLCancelled",
    "SASLError",
    "apop_available",
    "apop_challenge",
    "apop_credentials",
    "decode_response",
    "encode_challenge",
    "mechanisms_for",
    "new_mechanism",
]
