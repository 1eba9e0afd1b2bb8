"""DKIM signing of outbound mail with dkimpy: RSA-SHA256 (RFC 6376) and Ed25519-SHA256 (RFC 8463).

Keys live in ``<state_dir>/dkim/<domain>/<selector>.key`` (PKCS#8 PEM, mode
0600), made by ``mailserv dkim keygen DOMAIN``.  A message is signed with
every key of the domain of its From header (RFC 6376 §6.1.1 recommends the
author's domain), so a domain with one RSA and one Ed25519 key gets two
signatures (RFC 8463 §4: verifiers that do not know Ed25519 still check RSA).
Mail whose From domain has no key goes out unsigned.  Signing reads the
whole message and runs in the "crypto" thread pool.

dkimpy computes RSA signatures in pure Python (two 1024-bit ``pow()`` per
signature, ~7 ms holding the GIL, which stalls the reactor); for our own keys
the RSA step is done by OpenSSL (``cryptography``, ~1 ms) with the key parsed
once when it is loaded.  RSASSA-PKCS1-v1_5 is deterministic, so the signature
is exactly dkimpy's; keys dkimpy is given by anyone else (ARC sealing, other
callers) still take its own path.
"""

from __future__ import annotations

import base64
import datetime
import os
from dataclasses import dataclass
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from mailserv.envelope import parse_header_section

MAX_SIGNED_SIZE = 64 * 1024 * 1024  # larger messages go out unsigned rather than in memory

# Our RSA keys, parsed, by modulus: what dkimpy's RSA step is replaced with.
_rsa_keys: dict[int, rsa.RSAPrivateKey] = {}
_python_rsa_sign = dkim.RSASSA_PKCS1_v1_5_sign
_HASHES: dict[str, hashes.HashAlgorithm] = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}  # noqa: S303


def _rsa_sign(digest: Any, private_key: dict[str, int]) -> bytes:
    """dkimpy's ``RSASSA_PKCS1_v1_5_sign(hash, pk)``, by OpenSSL for keys loaded here."""
    key = _rsa_keys.get(private_key.get("modulus", 0))
    algorithm = _HASHES.get(str(getattr(digest, "name", "")).lower())
    if key is None or algorithm is None:
        return _python_rsa_sign(digest, private_key)  # type: ignore[no-any-return]
    return key.sign(digest.digest(), padding.PKCS1v15(), Prehashed(algorithm))


dkim.RSASSA_PKCS1_v1_5_sign = _rsa_sign


@dataclass(frozen=True)
class DKIMKey:
    selector: str
    algorithm: bytes  # b"rsa-sha256" | b"ed25519-sha256"
    private: bytes  # what dkimpy takes: PEM for RSA, base64 seed for Ed25519


def load_key(path: str) -> DKIMKey:
    """Read one key file; the selector is the file name without ``.key``."""
    selector = os.path.basename(path)[: -len(".key")]
    with open(path, "rb") as f:
        pem = f.read()
    key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return DKIMKey(selector, b"ed25519-sha256", base64.b64encode(seed))
    if isinstance(key, rsa.RSAPrivateKey):
        _rsa_keys[key.private_numbers().public_numbers.n] = key
        traditional = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        return DKIMKey(selector, b"rsa-sha256", traditional)
    raise ValueError(f"{path}: not an RSA or Ed25519 key")


def author_domain(header_section: bytes) -> str | None:
    """The domain of the (first) From address, lower-case (RFC 5322 §3.6.2)."""
    from email.utils import getaddresses

    for name, value in parse_header_section(header_section):
        if name.lower() == "from":
            text = value.decode("utf-8", "replace").replace("\r\n", "")
            for _display, addr in getaddresses([text]):
                if "@" in addr:
                    return addr.rsplit("@", 1)[1].strip().rstrip(".").lower()
            return None
    return None


class Signer:
    """Signs with the keys under ``key_dir`` (re-read when a domain's directory changes)."""

    def __init__(self, key_dir: str) -> None:
        self.key_dir = key_dir
        self._cache: dict[str, tuple[float, list[DKIMKey]]] = {}
        self._any: tuple[float, bool] = (0.0, False)

    def has_keys(self) -> bool:
        """Whether any domain has keys (a stat every few seconds): else skip signing."""
        import time

        now = time.monotonic()
        if now - self._any[0] > 5.0:
            try:
                found = any(os.scandir(self.key_dir))
            except OSError:
                found = False
            self._any = (now, found)
        return self._any[1]

    def keys_for(self, domain: str) -> list[DKIMKey]:
        if not domain or "/" in domain or domain.startswith("."):
            return []
        directory = os.path.join(self.key_dir, domain)
        try:
            mtime = os.stat(directory).st_mtime
        except OSError:
            return []
        cached = self._cache.get(domain)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        keys = []
        for name in sorted(os.listdir(directory)):
            if name.endswith(".key"):
                keys.append(load_key(os.path.join(directory, name)))
        # Ed25519 first, so that the RSA signature is the outermost (first) header.
        keys.sort(key=lambda k: k.algorithm != b"ed25519-sha256")
        self._cache[domain] = (mtime, keys)
        return keys

    def sign(self, message: bytes) -> bytes:
        """The DKIM-Signature header lines to put in front of ``message`` (b"" if no key)."""
        end = message.find(b"\r\n\r\n")
        domain = author_domain(message[: end + 2] if end >= 0 else message)
        if domain is None:
            return b""
        out = b""
        for key in self.keys_for(domain):
            out = (
                dkim.sign(
                    message,
                    key.selector.encode(),
                    domain.encode(),
                    key.private,
                    canonicalize=(b"relaxed", b"relaxed"),
                    signature_algorithm=key.algorithm,
                    linesep=b"\r\n",
                )
                + out
            )
        return out

    def sign_file(self, path: str, offset: int = 0) -> bytes:
        """``sign`` for a message in a file from ``offset`` (blocking: the "crypto" pool).

        The header section is read first; the whole message only if its From
        domain has keys.
        """
        with open(path, "rb") as f:
            if offset:
                f.seek(offset)
            head = f.read(65536)
            end = head.find(b"\r\n\r\n")
            domain = author_domain(head[: end + 2] if end >= 0 else head)
            if domain is None or not self.keys_for(domain):
                return b""
            if os.fstat(f.fileno()).st_size - offset > MAX_SIGNED_SIZE:
                return b""
            return self.sign(head + f.read())


def txt_strings(value: str) -> str:
    """A TXT value split into quoted strings of at most 255 characters (RFC 1035 §3.3)."""
    return " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))


def generate(key_dir: str, domain: str, prefix: str | None = None) -> list[tuple[str, str]]:
    """Create an RSA-2048 and an Ed25519 key for ``domain``; return (record name, TXT value).

    Selectors are ``<prefix>-rsa`` and ``<prefix>-ed25519`` (prefix: YYYYMM by
    default, so keys can be rotated by month).  Existing files are never
    overwritten.
    """
    prefix = prefix or datetime.datetime.now(datetime.UTC).strftime("%Y%m")
    directory = os.path.join(key_dir, domain)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    records = []
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    for selector, key, tag in (
        (f"{prefix}-rsa", rsa_key, "rsa"),
        (f"{prefix}-ed25519", ed_key, "ed25519"),
    ):
        path = os.path.join(directory, f"{selector}.key")
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        records.append((f"{selector}._domainkey.{domain}", public_record(key, tag)))
    return records


def public_record(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey, tag: str) -> str:
    """The ``v=DKIM1`` TXT value of a key (RFC 6376 §3.6.1, RFC 8463 §4.2)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    else:
        raw = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return f"v=DKIM1; k={tag}; p={base64.b64encode(raw).decode()}"


def records_for(key_dir: str, domain: str) -> list[tuple[str, str]]:
    """(record name, TXT value) of every key of ``domain`` already on disk."""
    directory = os.path.join(key_dir, domain)
    out = []
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".key"))
    except OSError:
        return []
    for name in names:
        with open(os.path.join(directory, name), "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        tag = "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa"
        if isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
            out.append((f"{name[:-4]}._domainkey.{domain}", public_record(key, tag)))
    return out


__all__ = ["Signer", "generate", "records_for", "txt_strings"]
