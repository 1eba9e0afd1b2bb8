"""DANE-TA and DANE-EE certificate checks (RFC 7672 §3.1): what is and is not checked."""

from __future__ import annotations

import datetime
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from mailserv.queue import dane
from mailserv.tls import generate_certificate, generate_key

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


def spki_sha256(cert: x509.Certificate) -> bytes:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def signed(
    name: str,
    issuer: tuple[x509.Certificate, object],
    before: datetime.datetime,
    after: datetime.datetime,
    ca: bool = False,
) -> tuple[x509.Certificate, object]:
    key = generate_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(before)
        .not_valid_after(after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False
        )
    return builder.sign(issuer[1], hashes.SHA256()), key  # type: ignore[arg-type]


CA = generate_certificate("DANE test TA", is_ca=True)
TA_RECORD = [(2, 1, 1, spki_sha256(CA[0]))]
NAMES = ["mx1.remote.test", "remote.test"]


def test_dane_ta_valid_chain_matches() -> None:
    leaf, _ = signed("mx1.remote.test", CA, NOW - DAY, NOW + DAY)
    assert dane.match(TA_RECORD, [leaf, CA[0]], NAMES) is None


def test_dane_ta_expired_server_certificate_is_refused() -> None:
    leaf, _ = signed("mx1.remote.test", CA, NOW - 10 * DAY, NOW - DAY)
    problem = dane.match(TA_RECORD, [leaf, CA[0]], NAMES)
    assert problem is not None and "expired" in problem


def test_dane_ta_not_yet_valid_server_certificate_is_refused() -> None:
    leaf, _ = signed("mx1.remote.test", CA, NOW + DAY, NOW + 10 * DAY)
    problem = dane.match(TA_RECORD, [leaf, CA[0]], NAMES)
    assert problem is not None and "not valid before" in problem


def test_dane_ta_expired_intermediate_is_refused() -> None:
    inter = signed("DANE intermediate", CA, NOW - 10 * DAY, NOW - DAY, ca=True)
    leaf, _ = signed("mx1.remote.test", inter, NOW - DAY, NOW + DAY)
    problem = dane.match(TA_RECORD, [leaf, inter[0], CA[0]], NAMES)
    assert problem is not None and "expired" in problem


def test_dane_ee_ignores_expiry_and_names() -> None:
    """§3.1.1: with DANE-EE(3) neither the dates nor the names of the leaf matter."""
    leaf, _ = signed("other.name.test", CA, NOW - 10 * DAY, NOW - DAY)
    assert dane.match([(3, 1, 1, spki_sha256(leaf))], [leaf, CA[0]], NAMES) is None
