"""Transport security of outbound SMTP: the client TLS context, DANE (RFC 7672) and PKIX checks.

The handshake itself never fails on the certificate (opportunistic TLS, RFC
7435, must accept any certificate); the policy is checked right after the
handshake, before MAIL FROM, by ``Session._check_peer``:

- DANE (RFC 7672): the TLSA records of ``_PORT._tcp.MXHOST``, obtained from a
  DNSSEC-validating resolver (AD bit), must match the presented chain.
  DANE-EE(3) matches the leaf's certificate or public key and ignores names
  and dates (§3.1.1); DANE-TA(2) matches a certificate of the chain, which
  must then chain the leaf to it; the leaf must carry one of the reference
  names (§3.1.2), and the leaf and every certificate below the trust anchor
  must be within their validity periods (the anchor itself is vouched for by
  DNSSEC; one given by its public key alone has no dates to check).
  PKIX-TA(0) and PKIX-EE(1) are unusable for SMTP (§3.1.3).
- PKIX (MTA-STS enforce, RFC 8461 §4.2; a smarthost with verified TLS): the
  chain must verify against the trust roots and name the MX host.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

DANE_TA = 2
DANE_EE = 3


@implementer(IOpenSSLClientConnectionCreator)
class _HostConnectionCreator:
    def __init__(self, context: SSL.Context, host: str) -> None:
        self.context = context
        self.host = host

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        # RFC 7672 §8.1: send SNI (the MX host name); harmless elsewhere.
        if not _is_ip(self.host):
            connection.set_tlsext_host_name(self.host.encode("idna"))
        connection.set_connect_state()
        return connection


class ClientTLS:
    """The outbound TLS context: trust roots loaded, verification deferred to the policy.

    ``ca_file`` None: the system's trust roots.  ``for_host(name)`` gives the
    connection creator ``transport.startTLS`` takes.
    """

    def __init__(self, ca_file: str | None = None) -> None:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        # The verify result is computed and read after the handshake; the
        # handshake itself accepts any certificate (opportunistic TLS).
        context.set_verify(SSL.VERIFY_NONE)
        if ca_file:
            context.load_verify_locations(ca_file)
        else:
            context.set_default_verify_paths()
        self.context = context

    def for_host(self, host: str) -> _HostConnectionCreator:
        return _HostConnectionCreator(self.context, host)


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _association(cert: x509.Certificate, selector: int, mtype: int) -> bytes | None:
    """The data a TLSA record of (selector, matching type) compares (RFC 6698 §2.1.2-3)."""
    if selector == 0:
        data = cert.public_bytes(serialization.Encoding.DER)
    elif selector == 1:
        data = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        return None
    if mtype == 0:
        return data
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return None


def tlsa_fields(record: Any) -> tuple[int, int, int, bytes]:
    """(usage, selector, mtype, data) of a dnspython TLSA rdata or a plain tuple."""
    if isinstance(record, tuple):
        usage, selector, mtype, data = record
        return int(usage), int(selector), int(mtype), bytes(data)
    return int(record.usage), int(record.selector), int(record.mtype), bytes(record.cert)


def usable(records: Sequence[Any]) -> list[tuple[int, int, int, bytes]]:
    """The TLSA records SMTP can use: DANE-TA(2) and DANE-EE(3) (RFC 7672 §3.1.3)."""
    out = []
    for record in records:
        usage, selector, mtype, data = tlsa_fields(record)
        if usage in (DANE_TA, DANE_EE) and selector in (0, 1) and mtype in (0, 1, 2):
            out.append((usage, selector, mtype, data))
    return out


def _names_of(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        return [
            str(a.value).lower()
            for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        ]


def name_matches(pattern: str, host: str) -> bool:
    """RFC 6125 §6.4.3: exact, or "*." matching exactly one left-most label."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern == host:
        return True
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return False


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, Exception):
        return False
    return True


def _out_of_date(certs: Sequence[x509.Certificate], now: Any = None) -> str | None:
    """Why one of ``certs`` is not valid now (expired or not yet valid), or None."""
    import datetime

    now = now or datetime.datetime.now(datetime.UTC)
    for cert in certs:
        subject = cert.subject.rfc4514_string() or "the certificate"
        if cert.not_valid_after_utc < now:
            return f"{subject} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        if cert.not_valid_before_utc > now:
            return f"{subject} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    return None


def match(
    records: Sequence[Any], chain: Sequence[x509.Certificate], names: Sequence[str]
) -> str | None:
    """None when the chain satisfies the TLSA records, else the reason (RFC 7672 §3)."""
    records = usable(records)
    if not records:
        return "no usable TLSA records"
    if not chain:
        return "the server presented no certificate"
    leaf = chain[0]
    for usage, selector, mtype, data in records:
        if usage == DANE_EE and _association(leaf, selector, mtype) == data:
            return None  # §3.1.1: names and expiry are not checked for DANE-EE
    dated: str | None = None
    for usage, selector, mtype, data in records:
        if usage != DANE_TA:
            continue
        for i, cert in enumerate(chain):
            if _association(cert, selector, mtype) != data:
                continue
            # §3.1.2: the trust anchor must issue the chain down to the leaf,
            # and the leaf must name the MX host (or the next-hop domain).
            path_ok = all(_signed_by(chain[j], chain[j + 1]) for j in range(i))
            if i == 0:
                path_ok = False  # a TA that is the leaf itself is DANE-EE's job
            if path_ok and any(name_matches(p, n) for p in _names_of(leaf) for n in names):
                # §3.1.1/§3.1.2: with DANE-TA the server's chain is checked as
                # in PKIX, dates included, up to (not including) the anchor.
                dated = _out_of_date(chain[:i])
                if dated is None:
                    return None
    if dated is not None:
        return f"DANE-TA chain not valid now: {dated}"
    return "the certificate matches none of the TLSA records"


def verify_pkix(connection: SSL.Connection, names: Sequence[str]) -> str | None:
    """None when OpenSSL verified the chain and the leaf names one of ``names``."""
    # pyOpenSSL exposes no SSL_get_verify_result; its cffi binding does.
    from OpenSSL._util import ffi, lib

    result = lib.SSL_get_verify_result(connection._ssl)
    if result != 0:
        text = ffi.string(lib.X509_verify_cert_error_string(result)).decode()
        return f"verification failed: {text}"
    chain = connection.get_peer_cert_chain(as_cryptography=True) or []
    if not chain:
        return "the server presented no certificate"
    patterns = _names_of(chain[0])
    if not any(name_matches(p, n) for p in patterns for n in names):
        return f"the certificate names {', '.join(patterns) or 'nothing'}, not {names[0]}"
    return None
