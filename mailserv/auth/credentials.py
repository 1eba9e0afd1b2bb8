"""Challenge-response credentials: CRAM-MD5 (RFC 2195), APOP (RFC 1939 §7), SCRAM (RFC 5802).

Each checks a stored ``{SCHEME}data`` in constant time (hmac.compare_digest):
Twisted's own CramMD5Credentials compares with ``==`` (ARCHITECTURE.md
defect 10).  Challenges are made with ``secrets``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from zope.interface import implementer

from mailserv.auth import schemes
from mailserv.interfaces import IAPOPCredentials, ICramMD5Credentials, IScramCredentials


def make_challenge(hostname: str) -> bytes:
    """An RFC 1939/2195 style ``<random.time@host>`` challenge from ``secrets``."""
    return f"<{secrets.randbelow(2**63)}.{os.getpid()}@{hostname}>".encode("ascii")


@implementer(ICramMD5Credentials)
class CramMD5Credentials:
    """``username`` sent HMAC-MD5(password, challenge) in hex (RFC 2195 §2)."""

    def __init__(self, username: str, challenge: bytes, response: bytes) -> None:
        self.username = username
        self.challenge = challenge
        self.response = response.lower()

    def check_secret(self, stored: str) -> bool:
        scheme, data = schemes.split(stored)
        if scheme in schemes.PLAINTEXT_SCHEMES:
            want = hmac.new(data.encode("utf-8"), self.challenge, "md5").hexdigest()
        elif scheme == "CRAM-MD5":
            try:
                want = schemes.cram_md5_digest(bytes.fromhex(data), self.challenge)
            except ValueError:
                return False
        else:
            return False
        return hmac.compare_digest(want.encode("ascii"), self.response)


@implementer(IAPOPCredentials)
class APOPCredentials:
    """``APOP name digest``: MD5(timestamp + password) in hex (RFC 1939 §7)."""

    def __init__(self, username: str, timestamp: bytes, digest: bytes) -> None:
        self.username = username
        self.timestamp = timestamp
        self.digest = digest.lower()

    def check_secret(self, stored: str) -> bool:
        password = schemes.plaintext_of(stored)
        if password is None:
            return False
        want = hashlib.md5(self.timestamp + password).hexdigest()  # noqa: S324 - APOP is MD5
        return hmac.compare_digest(want.encode("ascii"), self.digest)


@implementer(IScramCredentials)
class ScramCredentials:
    """The end of a SCRAM exchange: ClientProof over AuthMessage (RFC 5802 §3)."""

    def __init__(
        self,
        username: str,
        mechanism: str,
        auth_message: bytes,
        proof: bytes,
        salt: bytes,
        iterations: int,
    ) -> None:
        self.username = username
        self.mechanism = mechanism
        self.auth_message = auth_message
        self.proof = proof
        # What the server announced (s=, i=); used when the secret is derived from plaintext.
        self.salt = salt
        self.iterations = iterations

    def check_secret(self, stored: str) -> bool:
        secret = scram_secret(stored, self.mechanism, self.salt, self.iterations)
        if secret is None:
            return False
        return verify_client_proof(secret, self.auth_message, self.proof)


def scram_secret(
    stored: str,
    mechanism: str,
    salt: bytes | None = None,
    iterations: int = schemes.SCRAM_ITERATIONS,
) -> schemes.ScramSecret | None:
    """The SCRAM secret of a stored password: stored SCRAM keys, or derived from plaintext.

    Deriving from plaintext needs the salt and iteration count the SASL
    mechanism announced in its server-first-message.
    """
    scheme, data = schemes.split(stored)
    try:
        if scheme == mechanism:
            return schemes.ScramSecret.parse(data, mechanism)
    except (ValueError, TypeError):
        return None
    plain = schemes.plaintext_of(stored)
    if plain is not None and salt is not None:
        return schemes.ScramSecret.derive(plain, mechanism, salt, iterations)
    return None


def verify_client_proof(secret: schemes.ScramSecret, auth_message: bytes, proof: bytes) -> bool:
    """ClientKey := ClientProof XOR ClientSignature; H(ClientKey) == StoredKey (RFC 5802 §3)."""
    name = secret.hash_name
    signature = hmac.new(secret.stored_key, auth_message, name).digest()
    if len(proof) != len(signature):
        return False
    client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
    return hmac.compare_digest(hashlib.new(name, client_key).digest(), secret.stored_key)
