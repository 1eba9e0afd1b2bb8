"""MTA-STS (RFC 8461): fetch, parse and cache a domain's policy.

``policy(domain)`` looks up ``_mta-sts.<domain>`` TXT (``v=STSv1; id=...``),
and when the id is new fetches ``https://mta-sts.<domain>/.well-known/mta-sts.txt``
(§3.3: HTTPS with a valid certificate for that name, no redirects, at most
64 KiB) and caches the policy for its ``max_age``.  A cached, unexpired
policy is used when the TXT record or the fetch fails (§5.1), so an attacker
who blocks the fetch cannot downgrade an enforced domain.  The cache is kept
on disk too (``cache_dir``, ``<state_dir>/mta-sts/<domain>.json``, written
atomically with fsync), so a restart does not open that window either: a
domain's file is read the first time the process needs its policy, and
removed once its ``max_age`` has passed.  The HTTPS host is
resolved through mailserv's own resolver, and the port is configurable for
tests (``[queue] mta_sts_port``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.logger import Logger

from mailserv.durable import write_atomic
from mailserv.queue.dane import name_matches

log = Logger()

MAX_POLICY_SIZE = 64 * 1024  # RFC 8461 §3.3
MAX_AGE_LIMIT = 31_557_600  # §3.2: at most one year
FETCH_TIMEOUT = 60.0


@dataclass
class Policy:
    """A parsed policy (RFC 8461 §3.2)."""

    id: str
    mode: str  # enforce | testing | none
    mx: list[str] = field(default_factory=list)
    max_age: int = 86400
    fetched_at: float = 0.0

    def matches(self, host: str) -> bool:
        """§4.1: the MX host matches a pattern (a wildcard covers one label)."""
        return any(name_matches(pattern, host) for pattern in self.mx)

    def expired(self, now: float) -> bool:
        return now >= self.fetched_at + self.max_age


class PolicyError(Exception):
    """A policy that cannot be used."""


def parse_policy(text: str, policy_id: str, now: float) -> Policy:
    """Parse the policy body; PolicyError when it is not a valid STSv1 policy."""
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise PolicyError(f"bad policy line {line[:60]!r}")
        fields.setdefault(key.strip().lower(), []).append(value.strip())
    if fields.get("version") != ["STSv1"]:
        raise PolicyError("version is not STSv1")
    mode = (fields.get("mode") or [""])[0]
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"bad mode {mode!r}")
    age = (fields.get("max_age") or [""])[0]
    if not age.isdigit():
        raise PolicyError("missing or bad max_age")
    mx = [m.lower().rstrip(".") for m in fields.get("mx", [])]
    if mode != "none" and not mx:
        raise PolicyError("no mx patterns")
    return Policy(policy_id, mode, mx, min(int(age), MAX_AGE_LIMIT), now)


_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")


class PolicyCache:
    """The on-disk policy cache: one JSON file per domain (blocking: the "disk" pool)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def path(self, domain: str) -> str | None:
        """The file of ``domain`` (an A-label name), None for anything else."""
        if len(domain) > 253 or not _DOMAIN.match(domain):
            return None
        return os.path.join(self.directory, f"{domain}.json")

    def read(self, domain: str) -> Policy | None:
        path = self.path(domain)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                raw = json.loads(f.read())
            return Policy(
                str(raw["id"]),
                str(raw["mode"]),
                [str(m) for m in raw["mx"]],
                int(raw["max_age"]),
                float(raw["fetched_at"]),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warn("MTA-STS cache {path} unreadable: {error}", path=path, error=exc)
            return None

    def write(self, domain: str, policy: Policy) -> None:
        path = self.path(domain)
        if path is None:
            return
        os.makedirs(self.directory, mode=0o750, exist_ok=True)
        write_atomic(path, json.dumps(asdict(policy), sort_keys=True).encode(), mode=0o640)

    def remove(self, domain: str) -> None:
        path = self.path(domain)
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


_TXT_ID = re.compile(r"^v=STSv1;\s*id=([A-Za-z0-9]{1,32})\s*;?")


def parse_txt(strings: list[str]) -> str | None:
    """The policy id of the ``_mta-sts`` TXT records; None unless exactly one is STSv1 (§3.1)."""
    ids = []
    for text in strings:
        if text.startswith("v=STSv1"):
            match = _TXT_ID.match(text)
            if match is None:
                return None
            ids.append(match.group(1))
    return ids[0] if len(ids) == 1 else None


class _BodyReader(protocol.Protocol):
    """Reads an HTTP response with a size limit."""

    transport: Any

    def __init__(self, finished: defer.Deferred[bytes], limit: int) -> None:
        self.finished = finished
        self.limit = limit
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > self.limit and not self.finished.called:
            self.finished.errback(PolicyError("policy larger than 64 KiB"))
            self.transport.stopProducing()

    def connectionLost(self, reason: Any = None) -> None:
        if self.finished.called:
            return
        from twisted.web.client import ResponseDone

        if reason.check(ResponseDone):
            self.finished.callback(self.data)
        else:
            self.finished.errback(reason)


class MTASTSFetcher:
    """Policies of destination domains, fetched on demand, cached in memory and on disk.

    ``cache_dir`` None keeps the cache in memory only; ``threads`` (the
    service's pools) runs the disk cache's file operations in the "disk" pool.
    """

    def __init__(
        self,
        resolver: Any,
        reactor: Any,
        ca_file: str | None = None,
        port: int = 443,
        cache_dir: str | None = None,
        threads: Any = None,
    ) -> None:
        self.resolver = resolver
        self.reactor = reactor
        self.ca_file = ca_file
        self.port = port
        self.threads = threads
        self.cache: dict[str, Policy] = {}
        self.disk = PolicyCache(cache_dir) if cache_dir else None
        self._read_from_disk: set[str] = set()

    def policy(self, domain: str) -> defer.Deferred[Policy | None]:
        """The policy to apply to ``domain`` now, or None (no MTA-STS)."""
        return defer.ensureDeferred(self._policy(domain.lower().rstrip(".")))

    async def _disk(self, fn: Any, *args: Any) -> Any:
        if self.threads is not None:
            return await self.threads.run("disk", fn, *args)
        return fn(*args)

    async def remember(self, domain: str, policy: Policy) -> None:
        """Cache ``policy`` in memory and durably on disk."""
        self.cache[domain] = policy
        if self.disk is not None:
            try:
                await self._disk(self.disk.write, domain, policy)
            except OSError as exc:
                log.warn("MTA-STS policy of {domain} not saved: {error}", domain=domain, error=exc)

    async def cached(self, domain: str, now: float) -> Policy | None:
        """The unexpired cached policy of ``domain`` (memory, else the disk once)."""
        cached = self.cache.get(domain)
        if cached is None and self.disk is not None and domain not in self._read_from_disk:
            self._read_from_disk.add(domain)
            cached = await self._disk(self.disk.read, domain)
            if cached is not None:
                self.cache.setdefault(domain, cached)
        if cached is not None and cached.expired(now):
            self.cache.pop(domain, None)
            if self.disk is not None:
                await self._disk(self.disk.remove, domain)
            cached = None
        return cached

    async def _policy(self, domain: str) -> Policy | None:
        policy = await self._current(domain)
        return policy if policy is not None and policy.mode != "none" else None

    async def _current(self, domain: str) -> Policy | None:
        now = self.reactor.seconds()
        cached = await self.cached(domain, now)
        try:
            answer = await self.resolver.lookup(f"_mta-sts.{domain}", "TXT")
            strings = [b"".join(r.strings).decode("utf-8", "replace") for r in answer.records]
            policy_id = parse_txt(strings)
        except Exception:
            return cached
        if policy_id is None:
            return cached
        if cached is not None and cached.id == policy_id:
            return cached
        try:
            body = await self.fetch(domain)
            policy = parse_policy(body.decode("utf-8", "replace"), policy_id, now)
        except Exception as exc:
            log.info("MTA-STS policy of {domain} not fetched: {error}", domain=domain, error=exc)
            return cached
        await self.remember(domain, policy)
        return policy

    async def fetch(self, domain: str) -> bytes:
        """GET the policy over HTTPS, checking the certificate against mta-sts.<domain>."""
        from twisted.internet import ssl
        from twisted.web.client import Agent
        from twisted.web.http_headers import Headers

        host = f"mta-sts.{domain}"
        addresses: list[str] = []
        for kind in ("A", "AAAA"):
            try:
                answer = await self.resolver.lookup(host, kind)
            except Exception:  # noqa: S112 - try the other address family
                continue
            addresses.extend(str(r.address) for r in answer.records)
        if not addresses:
            raise PolicyError(f"{host} has no address")
        if self.ca_file:
            with open(self.ca_file, "rb") as f:
                roots = ssl.trustRootFromCertificates(
                    [ssl.Certificate.loadPEM(pem) for pem in _split_pem(f.read())]
                )
        else:
            roots = ssl.platformTrust()
        options = ssl.optionsForClientTLS(host, trustRoot=roots)
        address = addresses[0]
        tcp: Any = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        endpoint = wrapClientTLS(options, tcp(self.reactor, address, self.port, timeout=30))

        class _Endpoints:
            def endpointForURI(self, uri: Any) -> Any:
                return endpoint

        agent = Agent.usingEndpointFactory(self.reactor, _Endpoints())
        url = f"https://{host}/.well-known/mta-sts.txt".encode()
        request = agent.request(b"GET", url, Headers({b"User-Agent": [b"mailserv"]}))
        request.addTimeout(FETCH_TIMEOUT, self.reactor)
        response = await request
        if response.code != 200:  # §3.3: no redirects, only 200
            raise PolicyError(f"HTTP {response.code}")
        finished: defer.Deferred[bytes] = defer.Deferred()
        response.deliverBody(_BodyReader(finished, MAX_POLICY_SIZE))
        return await finished


def _split_pem(data: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [part + marker for part in data.split(marker) if b"-----BEGIN" in part]
