"""``mailserv dkim keygen DOMAIN``: create DKIM keys and print the DNS records to publish.

One RSA-2048 key (RFC 6376) and one Ed25519 key (RFC 8463) are written to
``<state_dir>/dkim/<DOMAIN>/<selector>.key`` (mode 0600); the queue signs
mail from DOMAIN with both from then on.  ``mailserv dkim records DOMAIN``
prints the records of the keys already there.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from mailserv.config import default_config, load_config
from mailserv.config.schema import Invalid, hostname
from mailserv.errors import MailservError
from mailserv.queue.dkimsign import generate, records_for, txt_strings


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dkim", help="manage DKIM signing keys", description="Manage DKIM signing keys."
    )
    parser.add_argument("--config", metavar="FILE", help="configuration file")
    sub = parser.add_subparsers(dest="dkim_command", metavar="ACTION")
    sub.required = True
    keygen = sub.add_parser("keygen", help="create an RSA and an Ed25519 key for DOMAIN")
    keygen.add_argument("domain")
    keygen.add_argument(
        "--selector", metavar="PREFIX", help="selector prefix (default: YYYYMM of today)"
    )
    keygen.set_defaults(func=run_keygen)
    records = sub.add_parser("records", help="print the TXT records of DOMAIN's keys")
    records.add_argument("domain")
    records.set_defaults(func=run_records)


def key_dir(config: Any) -> str:
    return os.path.join(config.state_dir, config.dkim.key_dir or "dkim")


def _setup(args: argparse.Namespace) -> tuple[Any, str]:
    path = args.config or os.environ.get("MAILSERV_CONFIG")
    config = load_config(path) if path else default_config()
    try:
        domain = hostname(args.domain, None, "domain")  # type: ignore[arg-type]
    except Invalid as exc:
        raise MailservError(str(exc)) from None
    return config, domain


def print_records(records: list[tuple[str, str]]) -> None:
    for name, value in records:
        print(f"{name}. IN TXT {txt_strings(value)}")


def run_keygen(args: argparse.Namespace) -> int:
    config, domain = _setup(args)
    selector = args.selector
    if selector is not None and not all(c.isalnum() or c in "-_" for c in selector):
        raise MailservError(f"bad selector prefix {selector!r}")
    try:
        records = generate(key_dir(config), domain, selector)
    except FileExistsError as exc:
        raise MailservError(f"a key with that selector exists already: {exc.filename}") from None
    print(f"; DKIM keys for {domain} in {os.path.join(key_dir(config), domain)}")
    print("; publish these records, then mail from this domain is signed with both keys:")
    print_records(records)
    return 0


def run_records(args: argparse.Namespace) -> int:
    config, domain = _setup(args)
    records = records_for(key_dir(config), domain)
    if not records:
        raise MailservError(f"no DKIM keys for {domain}; run: mailserv dkim keygen {domain}")
    print_records(records)
    return 0
