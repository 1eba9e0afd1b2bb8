"""``mailserv dns DOMAIN``: the DNS records DOMAIN should publish, checked against the resolver.

Records: MX (RFC 5321 §5.1), SPF (RFC 7208), DKIM (the keys of ``mailserv
dkim keygen``), DMARC (RFC 7489), MTA-STS (RFC 8461: the TXT record and the
policy file to serve), TLS-RPT (RFC 8460) and, when a certificate is
configured, TLSA for DANE (RFC 7672, "3 1 1": the SHA-256 of the public key).
Each is looked up through the configured resolver and marked ``ok``,
``MISSING`` or ``DIFFERS`` (with what is published today).
"""

from __future__ import annotations

import argparse
import hashlib
import os
from dataclasses import dataclass
from typing import Any

from mailserv.config import default_config, load_config
from mailserv.config.schema import Invalid, hostname
from mailserv.errors import MailservError, TemporaryFailure


@dataclass
class Wanted:
    name: str
    rdtype: str
    value: str
    # How to tell an existing record is "the same kind" (e.g. any v=spf1 TXT).
    prefix: str = ""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dns",
        help="print the DNS records a domain should publish and check them",
        description="Print the DNS records DOMAIN should publish and check what resolves today.",
    )
    parser.add_argument("domain")
    parser.add_argument("--config", metavar="FILE", help="configuration file")
    parser.add_argument("--no-check", action="store_true", help="do not query the resolver")
    parser.set_defaults(func=run)


def tlsa_value(cert_file: str) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    with open(cert_file, "rb") as f:
        cert = x509.load_pem_x509_certificates(f.read())[0]
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"3 1 1 {hashlib.sha256(spki).hexdigest()}"


def wanted_records(config: Any, domain: str) -> list[Wanted]:
    from mailserv.queue.dkimsign import records_for

    host = config.hostname
    out = [
        Wanted(domain, "MX", f"10 {host}."),
        Wanted(domain, "TXT", "v=spf1 mx -all", "v=spf1"),
    ]
    key_dir = os.path.join(config.state_dir, config.dkim.key_dir or "dkim")
    for name, value in records_for(key_dir, domain):
        out.append(Wanted(name, "TXT", value, "v=DKIM1"))
    out += [
        Wanted(
            f"_dmarc.{domain}",
            "TXT",
            f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}",
            "v=DMARC1",
        ),
        Wanted(f"_mta-sts.{domain}", "TXT", "v=STSv1; id=1", "v=STSv1"),
        Wanted(
            f"_smtp._tls.{domain}",
            "TXT",
            f"v=TLSRPTv1; rua=mailto:postmaster@{domain}",
            "v=TLSRPTv1",
        ),
    ]
    if config.tls.cert_file:
        # RFC 7672 §2.2: the TLSA of our MX host on port 25, where other MTAs connect.
        out.append(Wanted(f"_25._tcp.{host}", "TLSA", tlsa_value(config.tls.cert_file)))
    return out


def _text(record: Any, rdtype: str) -> str:
    if rdtype == "TXT":
        return b"".join(record.strings).decode("utf-8", "replace")
    if rdtype == "TLSA":
        return f"{record.usage} {record.selector} {record.mtype} {record.cert.hex()}"
    return str(record.to_text())


def check(resolver: Any, want: Wanted) -> tuple[str, list[str]]:
    """("ok" | "MISSING" | "DIFFERS" | "UNKNOWN", what is published)."""
    try:
        answer = resolver.lookup_blocking(want.name, want.rdtype)
    except TemporaryFailure as exc:
        return "UNKNOWN", [str(exc)]
    found = [_text(r, want.rdtype) for r in answer.records]
    if want.prefix:
        found = [f for f in found if f.startswith(want.prefix)]
    if not found:
        return "MISSING", []
    normal = " ".join(want.value.lower().split())
    if want.rdtype == "MX":
        targets = {f.split()[-1].lower().rstrip(".") for f in found}
        return ("ok" if want.value.split()[-1].rstrip(".") in targets else "DIFFERS"), found
    if want.prefix in ("v=STSv1",):
        return "ok", found  # any id is fine: it changes with every policy
    same = any(" ".join(f.lower().split()) == normal for f in found)
    return ("ok" if same else "DIFFERS"), found


def run(args: argparse.Namespace) -> int:
    path = args.config or os.environ.get("MAILSERV_CONFIG")
    config = load_config(path) if path else default_config()
    try:
        domain = hostname(args.domain, None, "domain")  # type: ignore[arg-type]
    except Invalid as exc:
        raise MailservError(str(exc)) from None
    resolver = None
    if not args.no_check:
        from mailserv.dns import DNSResolver

        resolver = DNSResolver(config.dns, None)
    problems = 0
    for want in wanted_records(config, domain):
        value = f'"{want.value}"' if want.rdtype == "TXT" else want.value
        line = f"{want.name}. IN {want.rdtype} {value}"
        if resolver is None:
            print(line)
            continue
        status, found = check(resolver, want)
        print(
            f"{line}\n    ; {status}"
            + (f": now {' | '.join(found)}" if found and status != "ok" else "")
        )
        problems += status != "ok"
    print(f"\n; the MTA-STS policy to serve at https://mta-sts.{domain}/.well-known/mta-sts.txt:")
    print(f";   version: STSv1\n;   mode: testing\n;   mx: {config.hostname}\n;   max_age: 604800")
    return 1 if problems and resolver is not None else 0
