"""Password schemes in Dovecot's ``{SCHEME}data`` notation.

``hash_password(password, scheme)`` makes a new stored password (ARGON2ID by
default); ``verify(stored, password)`` checks one in constant time.  Both are
CPU-bound (argon2, bcrypt and SHA-crypt deliberately so): callers on the
reactor run them in the ``auth`` thread pool.

Verified schemes: ARGON2ID, ARGON2I, BLF-CRYPT, SHA512-CRYPT, SHA256-CRYPT,
MD5-CRYPT, SSHA512, SSHA256, SSHA, SHA512, SHA256, SHA (SHA-1), PLAIN, CLEAR,
CRAM-MD5 (the HMAC-MD5 context of RFC 2195 servers), SCRAM-SHA-1 and
SCRAM-SHA-256 (RFC 5802 stored keys).  The ``.HEX`` suffix of the plain
digest schemes (``{SHA256.HEX}``) is understood as Dovecot writes it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass

import argon2
import bcrypt
from passlib.hash import md5_crypt, sha256_crypt, sha512_crypt

from mailserv.auth import libcrypt, md5state
from mailserv.auth.saslprep import normalize_password

SCHEMES = (
    "ARGON2ID",
    "ARGON2I",
    "BLF-CRYPT",
    "SHA512-CRYPT",
    "SHA256-CRYPT",
    "MD5-CRYPT",
    "SSHA512",
    "SSHA256",
    "SSHA",
    "SHA512",
    "SHA256",
    "SHA",
    "PLAIN",
    "CLEAR",
    "CRAM-MD5",
    "SCRAM-SHA-1",
    "SCRAM-SHA-256",
)
DEFAULT_SCHEME = "ARGON2ID"

# Schemes from which the plaintext password itself can be recovered.
PLAINTEXT_SCHEMES = frozenset({"PLAIN", "CLEAR"})

_DIGESTS = {"SHA512": "sha512", "SHA256": "sha256", "SHA": "sha1"}
_SALTED = {"SSHA512": "sha512", "SSHA256": "sha256", "SSHA": "sha1"}
_CRYPT = {"SHA512-CRYPT": sha512_crypt, "SHA256-CRYPT": sha256_crypt, "MD5-CRYPT": md5_crypt}
SCRAM_HASHES = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}
SCRAM_ITERATIONS = 4096  # RFC 7677 §4: at least 4096
BCRYPT_MAX = 72  # bcrypt only ever looked at the first 72 bytes


class UnknownScheme(ValueError):
    """A stored password names a scheme mailserv does not know."""


def _bytes(password: str | bytes) -> bytes:
    return password.encode("utf-8") if isinstance(password, str) else password


def split(stored: str, default_scheme: str = "PLAIN") -> tuple[str, str]:
    """Split ``{SCHEME}data`` into (SCHEME, data); a bare value has ``default_scheme``."""
    if stored.startswith("{"):
        end = stored.find("}")
        if end > 1:
            return stored[1:end].upper(), stored[end + 1 :]
    return default_scheme.upper(), stored


def _argon2(kind: argon2.Type) -> argon2.PasswordHasher:
    """Dovecot 2.3's parameters: one lane per hash, so that concurrent logins share the CPUs."""
    if kind == argon2.Type.I:
        return argon2.PasswordHasher(time_cost=4, memory_cost=32768, parallelism=1, type=kind)
    return argon2.PasswordHasher(time_cost=3, memory_cost=65536, parallelism=1, type=kind)


def hash_password(password: str | bytes, scheme: str = DEFAULT_SCHEME) -> str:
    """A new ``{SCHEME}...`` stored password with a fresh random salt."""
    pw = _bytes(password)
    scheme = scheme.upper()
    if not pw:
        raise ValueError("empty passwords are refused")
    if scheme == "ARGON2ID":
        data = _argon2(argon2.Type.ID).hash(pw)
    elif scheme == "ARGON2I":
        data = _argon2(argon2.Type.I).hash(pw)
    elif scheme == "BLF-CRYPT":
        # Dovecot and crypt(3) write the $2y$ prefix; the algorithm is the same as $2b$.
        data = bcrypt.hashpw(pw[:BCRYPT_MAX], bcrypt.gensalt(10)).decode().replace("$2b$", "$2y$")
    elif scheme in _CRYPT:
        handler = _CRYPT[scheme]
        if scheme != "MD5-CRYPT":
            handler = handler.using(rounds=5000)  # the crypt(3) and Dovecot default
        data = handler.hash(pw)
    elif scheme in _SALTED:
        salt = secrets.token_bytes(8)
        digest = hashlib.new(_SALTED[scheme], pw + salt).digest()
        data = base64.b64encode(digest + salt).decode()
    elif scheme in _DIGESTS:
        data = base64.b64encode(hashlib.new(_DIGESTS[scheme], pw).digest()).decode()
    elif scheme in PLAINTEXT_SCHEMES:
        data = pw.decode("utf-8")
    elif scheme == "CRAM-MD5":
        data = cram_md5_context(pw).hex()
    elif scheme in SCRAM_HASHES:
        data = ScramSecret.derive(pw, scheme).encode()
    else:
        raise UnknownScheme(f"unknown password scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    return f"{{{scheme}}}{data}"


def verify(stored: str, password: str | bytes, default_scheme: str = "PLAIN") -> bool:
    """Is ``password`` the one ``stored`` was made from?  Constant-time comparisons.

    An empty password never matches.  A malformed or unknown stored value is
    False (never an exception), so a corrupt entry cannot be logged into.
    """
    pw = _bytes(password)
    if not pw:
        return False
    scheme, data = split(stored, default_scheme)
    try:
        return _verify(scheme, data, pw)
    except (ValueError, TypeError, binascii.Error, argon2.exceptions.VerificationError):
        return False
    except argon2.exceptions.InvalidHashError:
        return False


_CRYPT_PREFIXES = {
    "$6$": "SHA512-CRYPT",
    "$5$": "SHA256-CRYPT",
    "$1$": "MD5-CRYPT",
    "$2y$": "BLF-CRYPT",
    "$2b$": "BLF-CRYPT",
    "$2a$": "BLF-CRYPT",
    "$argon2id$": "ARGON2ID",
    "$argon2i$": "ARGON2I",
}


def _verify(scheme: str, data: str, pw: bytes) -> bool:
    if scheme == "CRYPT":  # crypt(3) strings without a {SCHEME} prefix (Dovecot's default)
        for prefix, name in _CRYPT_PREFIXES.items():
            if data.startswith(prefix):
                return _verify(name, data, pw)
        return False  # DES crypt is not supported: 8 significant characters
    if scheme in ("ARGON2ID", "ARGON2I"):
        # The type comes from the hash itself ($argon2id$ / $argon2i$).
        return _argon2(argon2.Type.ID).verify(data, pw)
    if scheme == "BLF-CRYPT":
        return bcrypt.checkpw(pw[:BCRYPT_MAX], data.encode())
    if scheme in _CRYPT:
        if libcrypt.available():  # releases the GIL (see libcrypt.py)
            hashed = libcrypt.crypt(pw, data)
            return hashed is not None and hmac.compare_digest(hashed.encode(), data.encode())
        return bool(_CRYPT[scheme].verify(pw, data))
    if scheme in _SALTED:
        raw = base64.b64decode(data, validate=True)
        size = hashlib.new(_SALTED[scheme]).digest_size
        if len(raw) <= size:
            return False
        digest, salt = raw[:size], raw[size:]
        return hmac.compare_digest(hashlib.new(_SALTED[scheme], pw + salt).digest(), digest)
    base, _, encoding = scheme.partition(".")
    if base in _DIGESTS:
        got = hashlib.new(_DIGESTS[base], pw).digest()
        want = bytes.fromhex(data) if encoding == "HEX" else base64.b64decode(data, validate=True)
        return hmac.compare_digest(got, want)
    if scheme in PLAINTEXT_SCHEMES:
        return hmac.compare_digest(data.encode("utf-8"), pw)
    if scheme == "CRAM-MD5":
        return hmac.compare_digest(cram_md5_context(pw).hex(), data.lower())
    if scheme in SCRAM_HASHES:
        secret = ScramSecret.parse(data, scheme)
        derived = ScramSecret.derive(pw, scheme, secret.salt, secret.iterations)
        return hmac.compare_digest(derived.stored_key, secret.stored_key)
    return False


# --------------------------------------------------------------------------
# Plaintext-equivalent secrets for challenge-response mechanisms


def cram_md5_context(password: bytes) -> bytes:
    """The 32-byte HMAC-MD5 context Dovecot stores as ``{CRAM-MD5}`` (RFC 2104, RFC 2195).

    The MD5 chaining values after the outer and the inner padded key block,
    each as four little-endian words, outer first.
    """
    if len(password) > 64:
        password = hashlib.md5(password).digest()  # noqa: S324 - HMAC-MD5 key reduction, RFC 2104
    key = password.ljust(64, b"\0")
    inner = md5state.compress(md5state.INITIAL, bytes(b ^ 0x36 for b in key))
    outer = md5state.compress(md5state.INITIAL, bytes(b ^ 0x5C for b in key))
    return struct.pack("<4I", *outer) + struct.pack("<4I", *inner)


def cram_md5_digest(context: bytes, challenge: bytes) -> str:
    """HMAC-MD5(password, challenge) in hex, from a stored context (RFC 2195 §2)."""
    if len(context) != 32:
        raise ValueError("a CRAM-MD5 context is 32 bytes")
    outer = struct.unpack("<4I", context[:16])
    inner = struct.unpack("<4I", context[16:])
    inner_digest = md5state.finish(inner, 64, challenge)
    return md5state.finish(outer, 64, inner_digest).hex()


@dataclass(frozen=True)
class ScramSecret:
    """What a SCRAM server stores for a user (RFC 5802 §3): salt, i, StoredKey, ServerKey."""

    mechanism: str
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    @property
    def hash_name(self) -> str:
        return SCRAM_HASHES[self.mechanism]

    @classmethod
    def derive(
        cls,
        password: bytes,
        mechanism: str,
        salt: bytes | None = None,
        iterations: int = SCRAM_ITERATIONS,
    ) -> ScramSecret:
        """SaltedPassword := Hi(Normalize(password), salt, i) (RFC 5802 §3)."""
        name = SCRAM_HASHES[mechanism]
        if salt is None:
            salt = secrets.token_bytes(16)
        password = normalize_password(password)  # Normalize() is SASLprep (RFC 5802 §2.2)
        salted = hashlib.pbkdf2_hmac(name, password, salt, iterations)
        client_key = hmac.new(salted, b"Client Key", name).digest()
        server_key = hmac.new(salted, b"Server Key", name).digest()
        stored_key = hashlib.new(name, client_key).digest()
        return cls(mechanism, salt, iterations, stored_key, server_key)

    @classmethod
    def parse(cls, data: str, mechanism: str) -> ScramSecret:
        """Dovecot's ``iterations,salt,StoredKey,ServerKey`` (base64 fields)."""
        iterations, salt, stored, server = data.split(",")
        b64 = base64.b64decode
        return cls(
            mechanism,
            b64(salt, validate=True),
            int(iterations),
            b64(stored, validate=True),
            b64(server, validate=True),
        )

    def encode(self) -> str:
        fields = [self.salt, self.stored_key, self.server_key]
        return ",".join([str(self.iterations), *(base64.b64encode(f).decode() for f in fields)])


def plaintext_of(stored: str, default_scheme: str = "PLAIN") -> bytes | None:
    """The password itself if ``stored`` keeps it in the clear, else None."""
    scheme, data = split(stored, default_scheme)
    return data.encode("utf-8") if scheme in PLAINTEXT_SCHEMES and data else None


def secret_kinds(stored: str, default_scheme: str = "PLAIN") -> frozenset[str]:
    """The challenge-response mechanisms ``stored`` can serve (CRAM-MD5, APOP, SCRAM-*)."""
    scheme, _ = split(stored, default_scheme)
    if scheme in PLAINTEXT_SCHEMES:
        return frozenset({"CRAM-MD5", "APOP", *SCRAM_HASHES})
    if scheme == "CRAM-MD5" or scheme in SCRAM_HASHES:
        return frozenset({scheme})
    return frozenset()
