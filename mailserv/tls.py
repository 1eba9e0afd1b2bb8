"""TLS for every listener: the server context, its reload on SIGHUP, and the self-signed default.

``ServerTLS`` is both an old-style context factory (``getContext()``, what
``transport.startTLS`` takes for STARTTLS/STLS) and an
``IOpenSSLServerConnectionCreator`` (what ``TLSMemoryBIOFactory`` takes for
implicit TLS).  ``reload()`` builds a new context from the files; connections
already established keep the old one, new ones get the new one.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import ssl as tssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from mailserv.durable import write_atomic
from mailserv.errors import ConfigError, ConfigProblem

log = Logger()

_VERSIONS = {"TLSv1.2": tssl.TLSVersion.TLSv1_2, "TLSv1.3": tssl.TLSVersion.TLSv1_3}


def generate_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def generate_certificate(
    common_name: str,
    names: Sequence[str] = (),
    *,
    key: rsa.RSAPrivateKey | None = None,
    issuer_cert: x509.Certificate | None = None,
    issuer_key: rsa.RSAPrivateKey | None = None,
    is_ca: bool = False,
    days: int = 825,
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A certificate for ``common_name`` with ``names`` as subjectAltNames.

    Self-signed unless ``issuer_cert``/``issuer_key`` are given (the test CA).
    IP addresses among ``names`` become IP SANs.
    """
    key = key or generate_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = []
    for name in dict.fromkeys([common_name, *names]):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if not is_ca:
                sans.append(x509.DNSName(name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return cert, key


def write_pem(
    cert: x509.Certificate, key: rsa.RSAPrivateKey, cert_file: str, key_file: str
) -> None:
    """Write a certificate and its key (mode 0600), each atomically."""
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomic(key_file, key_pem, mode=0o600)
    write_atomic(cert_file, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def ensure_self_signed(state_dir: str, hostname: str, names: Sequence[str]) -> tuple[str, str]:
    """Create ``state_dir/tls/selfsigned.{crt,key}`` on first start; return their paths."""
    directory = os.path.join(state_dir, "tls")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    cert_file = os.path.join(directory, "selfsigned.crt")
    key_file = os.path.join(directory, "selfsigned.key")
    if not (os.path.exists(cert_file) and os.path.exists(key_file)):
        cert, key = generate_certificate(hostname, names)
        write_pem(cert, key, cert_file, key_file)
        log.info(
            "created a self-signed certificate for {hostname} in {path}",
            hostname=hostname,
            path=cert_file,
        )
    return cert_file, key_file


def _load(
    cert_file: str, key_file: str, min_version: str, key: str
) -> tuple[SSL.Context, x509.Certificate]:
    """A server context and its leaf certificate from PEM files; ConfigError names the key."""
    problems = []
    try:
        with open(cert_file, "rb") as f:
            certs = x509.load_pem_x509_certificates(f.read())
    except (OSError, ValueError) as exc:
        problems.append(ConfigProblem(cert_file, f"{key}.cert_file", f"cannot load: {exc}"))
        certs = []
    try:
        with open(key_file, "rb") as f:
            private_key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        problems.append(ConfigProblem(key_file, f"{key}.key_file", f"cannot load: {exc}"))
    if problems:
        raise ConfigError(problems)
    try:
        # pyOpenSSL takes cryptography objects directly (its own wrappers are deprecated).
        options = tssl.CertificateOptions(
            privateKey=cast(Any, private_key),
            certificate=cast(Any, certs[0]),
            extraCertChain=cast(Any, certs[1:]),
            raiseMinimumTo=_VERSIONS[min_version],
        )
        return options.getContext(), certs[0]
    except (SSL.Error, ValueError) as exc:
        raise ConfigError(
            [ConfigProblem(cert_file, key, f"certificate and key do not match: {exc}")]
        ) from None


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The DNS names a certificate serves: its subjectAltName DNS entries, else its CN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [str(n).lower().rstrip(".") for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = [
            str(a.value).lower().rstrip(".")
            for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    return names


def _expiry(cert: x509.Certificate) -> tuple[str, float]:
    """(first DNS name, notAfter as Unix time) of a certificate, for metrics."""
    names = certificate_names(cert) or ["-"]
    return names[0], cert.not_valid_after_utc.timestamp()


class _SNIMap:
    """Server name → context, from the names in each extra certificate (``*.`` wildcards too)."""

    def __init__(self) -> None:
        self.exact: dict[str, SSL.Context] = {}
        self.wildcard: dict[str, SSL.Context] = {}

    def add(self, cert: x509.Certificate, context: SSL.Context) -> None:
        for name in certificate_names(cert):
            if name.startswith("*."):
                self.wildcard.setdefault(name[2:], context)
            else:
                self.exact.setdefault(name, context)

    def find(self, server_name: bytes | None) -> SSL.Context | None:
        if not server_name:
            return None
        try:
            name = server_name.decode("ascii").lower().rstrip(".")
        except UnicodeDecodeError:
            return None
        found = self.exact.get(name)
        if found is None and "." in name:
            # A wildcard covers exactly one leftmost label (RFC 6125 section 6.4.3).
            found = self.wildcard.get(name.split(".", 1)[1])
        return found


def build_server_context(
    cert_file: str, key_file: str, min_version: str, extra: Sequence[tuple[str, str]]
) -> tuple[SSL.Context, list[x509.Certificate]]:
    """The default context, choosing one of ``extra`` by SNI, and the certificates loaded
    (default first); every problem reported at once."""
    problems: list[ConfigProblem] = []
    default: SSL.Context | None = None
    certs: list[x509.Certificate] = []
    try:
        default, cert = _load(cert_file, key_file, min_version, "tls")
        certs.append(cert)
    except ConfigError as exc:
        problems.extend(exc.problems)
    sni = _SNIMap()
    for i, (extra_cert, extra_key) in enumerate(extra):
        try:
            context, cert = _load(extra_cert, extra_key, min_version, f"tls.certificates[{i}]")
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        sni.add(cert, context)
        certs.append(cert)
    if problems or default is None:
        raise ConfigError(problems)
    if sni.exact or sni.wildcard:

        def choose(connection: SSL.Connection) -> None:
            context = sni.find(connection.get_servername())
            if context is not None:
                connection.set_context(context)

        default.set_tlsext_servername_callback(choose)
    return default, certs


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The server's TLS contexts, reloadable.

    The default certificate (``[tls] cert_file``) answers every client; each of ``extra``
    (``[[tls.certificates]]``) answers the clients whose SNI server name is one of the DNS names
    in that certificate, so one listener can serve several domains under their own names.
    """

    def __init__(
        self,
        cert_file: str,
        key_file: str,
        min_version: str = "TLSv1.2",
        extra: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.min_version = min_version
        self.extra = list(extra)
        self._context, certs = build_server_context(cert_file, key_file, min_version, self.extra)
        self._expiries = [_expiry(c) for c in certs]

    def expiries(self) -> list[tuple[str, float]]:
        """(first DNS name, notAfter as Unix time) of the default and every SNI certificate."""
        return list(self._expiries)

    def getContext(self) -> SSL.Context:
        return self._context

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._context, None)

    def reload(
        self,
        cert_file: str | None = None,
        key_file: str | None = None,
        extra: Sequence[tuple[str, str]] | None = None,
    ) -> None:
        """Re-read every certificate and key (new files if given).

        On error nothing changes: the current files and contexts stay, and ConfigError is raised.
        """
        cert_file = cert_file or self.cert_file
        key_file = key_file or self.key_file
        extra = list(self.extra if extra is None else extra)
        self._context, certs = build_server_context(cert_file, key_file, self.min_version, extra)
        self.cert_file, self.key_file, self.extra = cert_file, key_file, extra
        self._expiries = [_expiry(c) for c in certs]
        log.info(
            "reloaded TLS certificate {cert} and {count} SNI certificate(s)",
            cert=self.cert_file,
            count=len(self.extra),
        )
