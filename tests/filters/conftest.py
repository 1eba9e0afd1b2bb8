"""Fixtures of the filter tests: a service with a real resolver pointed at the loopback DNS server.

``filter_env`` gives ``env.service`` (config, threads, dns), ``env.session(peer, helo)``,
``env.envelope(sender, *rcpts)``, ``env.message(raw_bytes)`` (a spooled Message on disk)
and ``env.build(name, **options)`` (through the registry, as a pipeline entry is built).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailserv.address import parse_mailbox
from mailserv.config import parse_config
from mailserv.dns import DNSResolver
from mailserv.envelope import Envelope, Message, Recipient, Session, parse_header_section
from mailserv.filters.registry import build_filter
from mailserv.threads import ThreadPools

CONFIG = """
config_version = 1
hostname = "mx.example.org"
domains = ["example.org"]
state_dir = "{state}"
[store]
path = "{state}/mail/{{localpart}}"
[dns]
nameservers = ["127.0.0.1:{port}"]
timeout = "1s"
"""

_ids = itertools.count(1)


_pools: list[ThreadPools] = []


def shared_pools(reactor: Any) -> ThreadPools:
    """One set of pools for the whole test session, stopped when the reactor shuts down."""
    if not _pools:
        _pools.append(ThreadPools(reactor, {"dns": 4, "disk": 2, "crypto": 2}))
    return _pools[0]


class FakeService:
    def __init__(self, config: Any, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.threads = shared_pools(reactor)
        self.dns = DNSResolver(config.dns, self.threads)


class FilterEnv:
    def __init__(self, tmp_path: Path, port: int) -> None:
        from twisted.internet import reactor

        state = tmp_path / "state"
        state.mkdir(exist_ok=True)
        self.tmp_path = tmp_path
        self.config = parse_config(CONFIG.format(state=state, port=port))
        self.service = FakeService(self.config, reactor)

    def build(self, name: str, **options: Any) -> Any:
        return build_filter(name, options, self.service, "pipelines.inbound[0]")

    def session(self, peer: str = "192.0.2.1", helo: str | None = "client.example.net") -> Session:
        return Session(
            id=f"s{next(_ids)}", listener="mx", protocol="smtp", peer_host=peer, helo=helo
        )

    def envelope(self, sender: str | None, *rcpts: str) -> Envelope:
        return Envelope(
            id=f"e{next(_ids)}",
            mail_from=parse_mailbox(sender) if sender else None,
            recipients=[Recipient(parse_mailbox(r)) for r in rcpts],
        )

    def message(self, raw: bytes, memory: bool = False) -> Message:
        """A received message: spooled to a file, or held in memory as small ones are."""
        head = raw.split(b"\r\n\r\n", 1)[0]
        headers = parse_header_section(head + b"\r\n")
        if memory:
            if "data" not in Message.__dataclass_fields__:
                pytest.skip("this Message has no in-memory form")
            return Message(None, len(raw), headers, data=raw)  # type: ignore[arg-type, call-arg]
        path = self.tmp_path / f"msg{next(_ids)}.eml"
        path.write_bytes(raw)
        return Message(str(path), len(raw), headers)


@pytest.fixture(scope="session")
def _shared_dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.conftest import DNSServer

    server = DNSServer(tmp_path_factory.mktemp("filters-dns"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dns_server(_shared_dns_server: Any) -> Any:
    """The suite's ``dns_server``, started once for the filter tests and emptied for each test."""
    _shared_dns_server.set({})
    return _shared_dns_server


@pytest.fixture
def filter_env(tmp_path: Path, dns_server: Any) -> FilterEnv:
    return FilterEnv(tmp_path, dns_server.port)


def crlf(text: str) -> bytes:
    """A message written with \\n lines, as the wire form with CRLF."""
    return text.replace("\n", "\r\n").encode("utf-8")


def rsa_dkim_key(key: Any) -> tuple[bytes, list[str]]:
    """The PEM form of an RSA private key (as dkimpy signs with it) and the strings of its
    DKIM TXT record: longer than one 255-byte string, so several (RFC 6376 §3.6.2.2)."""
    import base64

    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    txt = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    return pem, [txt[i : i + 200] for i in range(0, len(txt), 200)]


def pools_used(env: FilterEnv, monkeypatch: Any) -> list[str]:
    """The pools of the thread jobs ``env``'s filters start, recorded as they start."""
    threads = env.service.threads
    real, pools = threads.run, []

    def run(pool: str, fn: Any, *args: Any, **kw: Any) -> Any:
        pools.append(pool)
        return real(pool, fn, *args, **kw)

    monkeypatch.setattr(threads, "run", run)
    return pools


class Keys:
    """A 2048-bit RSA and an Ed25519 DKIM key pair, with their DNS TXT records."""

    def __init__(self) -> None:
        import base64

        import nacl.signing
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rsa_private, self.rsa_txt = rsa_dkim_key(key)
        signing = nacl.signing.SigningKey.generate()
        self.ed_private = base64.b64encode(bytes(signing))
        self.ed_txt = (
            f"v=DKIM1; k=ed25519; p={base64.b64encode(bytes(signing.verify_key)).decode()}"
        )

    def records(self, domain: str, rsa_selector: str = "rsa", ed_selector: str = "ed") -> dict:
        return {
            f"{rsa_selector}._domainkey.{domain}": {"TXT": [self.rsa_txt]},
            f"{ed_selector}._domainkey.{domain}": {"TXT": [self.ed_txt]},
        }

    def sign(
        self, raw: bytes, domain: str, kind: str = "rsa", selector: str | None = None, **kw: Any
    ) -> bytes:
        import dkim

        if kind == "rsa":
            sig = dkim.sign(
                raw, (selector or "rsa").encode(), domain.encode(), self.rsa_private, **kw
            )
        else:
            sig = dkim.sign(
                raw,
                (selector or "ed").encode(),
                domain.encode(),
                self.ed_private,
                signature_algorithm=b"ed25519-sha256",
                **kw,
            )
        return sig.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + raw


@pytest.fixture(scope="session")
def dkim_keys() -> Keys:
    return Keys()


@pytest.fixture
def plain_env(tmp_path: Path) -> FilterEnv:
    """A FilterEnv for filters that make no DNS queries (no DNS server is started)."""
    return FilterEnv(tmp_path, 9)
