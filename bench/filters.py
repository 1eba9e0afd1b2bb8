"""Filter-chain benchmark: server CPU per message with the full inbound chain vs the bare MX path.

Three ``twistd -n mailserv`` runs on loopback, each receiving the same
``--messages`` messages (4 KiB, DKIM-signed with RSA-2048, a link in the
body) from the same client over the PROXY protocol (client 192.0.2.10):

- ``bare``: the MX listener without a pipeline (relay and recipient checks,
  delivery to maildir with fsync);
- ``full, cache warm``: every built-in filter (spamtrap, tarpit, dnsbl with
  two zones, ratelimit, greylist, spf, headers, dkim, arc, dmarc, uribl,
  rules, authresults) with the DNS answers of the loopback DNS server cached
  by the resolver (dnspython's LRU cache, TTL 60 s);
- ``full, cache cold``: the same with ``[dns] cache_size = 0``, so every
  lookup goes to the DNS server.

The figure is the CPU time (user + system, all threads) the server process
used per message, read from /proc before and after the run; the DNS server
runs in its own process and is not counted.  Goal (issue 9): the full chain
at most doubles the CPU per message of the bare path.

    .venv/bin/python bench/filters.py [--messages 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import smtplib
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mailserv.auth import schemes  # noqa: E402
from tests.conftest import DNSServer, MailservRunner  # noqa: E402
from tests.filters.conftest import Keys  # noqa: E402
from tests.support.process import test_config  # noqa: E402

CLIENT = "192.0.2.10"
TICKS = os.sysconf("SC_CLK_TCK")

PIPELINE: list[dict[str, Any]] = [
    {"filter": "spamtrap", "addresses": ["trap@example.test"]},
    {"filter": "tarpit", "networks": ["203.0.113.0/24"]},
    {"filter": "dnsbl", "zones": ["zen.dnsbl.test", "bl.dnsbl.test"]},
    {"filter": "ratelimit", "limits": [{"by": "client", "messages": 1_000_000}]},
    {"filter": "greylist", "delay": "0s"},
    {"filter": "spf"},
    {"filter": "headers"},
    {"filter": "dkim"},
    {"filter": "arc"},
    {"filter": "dmarc"},
    {"filter": "uribl", "zones": ["uribl.test"]},
    {
        "filter": "rules",
        "header_checks": ["/^Subject:.*viagra/i REJECT", "/^X-Spam-Flag: YES/ HOLD"],
        "body_checks": ["/^FORBIDDEN/ REJECT", "/lottery winner/i HOLD"],
    },
    {"filter": "authresults"},
]


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def make_message(keys: Keys, i: int) -> bytes:
    body = "".join(
        f"line {n} of a benchmark message, see https://www.example.net/p{n}\n" for n in range(55)
    )
    text = (
        "From: Alice <alice@sender.test>\n"
        "To: bob@example.test\n"
        f"Subject: benchmark {i}\n"
        "Date: Wed, 25 Nov 2026 10:00:00 +0000\n"
        f"Message-ID: <{i}.{time.monotonic_ns()}@sender.test>\n"
        "\n" + body
    )
    raw = text.replace("\n", "\r\n").encode()
    return keys.sign(raw, "sender.test", "rsa")


def session(port: int) -> smtplib.SMTP:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"PROXY TCP4 {CLIENT} 127.0.0.1 40000 25\r\n".encode())
    client = smtplib.SMTP(timeout=30)
    client.sock = sock
    client._host = "127.0.0.1"  # type: ignore[attr-defined]
    code, _ = client.getreply()
    assert code == 220, code
    client.ehlo("mail.sender.test")
    return client


def send(port: int, messages: list[bytes], per_session: int = 50) -> None:
    for start in range(0, len(messages), per_session):
        with session(port) as s:
            for raw in messages[start : start + per_session]:
                s.mail("alice@sender.test")
                code, text = s.rcpt("bob@example.test")
                if code == 451:  # greylisted first attempt: retry (delay is 0 s)
                    s.rset()
                    s.mail("alice@sender.test")
                    code, text = s.rcpt("bob@example.test")
                assert code == 250, (code, text)
                code, text = s.data(raw)
                assert code == 250, (code, text)


def run(
    name: str, work: Path, dns: DNSServer, keys: Keys, count: int, cache: bool, pipeline: bool
) -> tuple[float, float, float]:
    """(CPU ms per message, messages per second, user CPU ms per message) of one configuration."""
    base = work / name.replace(" ", "_").replace(",", "")
    state = base / "state"
    state.mkdir(parents=True)
    secret = schemes.hash_password("pw", "PLAIN")
    (state / "users.passwd").write_text(f"bob@example.test:{secret}::::::\n")
    listener: dict[str, Any] = {"proxy_protocol": True, "trusted_proxies": ["127.0.0.1/32"]}
    extra: dict[str, Any] = {
        "dns": {"nameservers": [dns.address], "timeout": "2s", "cache_size": 10_000 if cache else 0}
    }
    if pipeline:
        listener["pipeline"] = "inbound"
        extra["pipelines"] = {"inbound": PIPELINE}
    runner = MailservRunner(base)
    proc = runner.start(test_config(state, {"mx": listener}, **extra), timeout=60)
    try:
        port = proc.port("mx")
        send(port, [make_message(keys, -i) for i in range(1, 11)])  # warm-up (imports, caches)
        messages = [make_message(keys, i) for i in range(count)]
        before = cpu_seconds(proc.proc.pid)
        started = time.monotonic()
        send(port, messages)
        elapsed = time.monotonic() - started
        after = cpu_seconds(proc.proc.pid)
    finally:
        runner.stop_all()
    user, system = after[0] - before[0], after[1] - before[1]
    return (user + system) * 1000 / count, count / elapsed, user * 1000 / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    keys = Keys()
    configs = [
        ("bare", True, False),
        ("full, cache warm", True, True),
        ("full, cache cold", False, True),
    ]
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _, _ in configs}
    with tempfile.TemporaryDirectory(prefix="bench-filters-") as tmp:
        work = Path(tmp)
        dns = DNSServer(work)
        dns.set(
            {
                "sender.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
                "_dmarc.sender.test": {"TXT": ["v=DMARC1; p=reject"]},
                **keys.records("sender.test"),
            }
        )
        try:
            for rnd in range(args.rounds):
                for name, cache, pipeline in configs:
                    figures = run(f"{name} {rnd}", work, dns, keys, args.messages, cache, pipeline)
                    results[name].append(figures)
                    print(
                        f"round {rnd + 1} {name:18} {figures[0]:7.2f} ms CPU/msg "
                        f"({figures[2]:.2f} user) {figures[1]:7.1f} msgs/s",
                        flush=True,
                    )
        finally:
            dns.stop()
    print(f"\n{args.messages} messages of ~4 KiB, median of {args.rounds} rounds")
    print(f"{'path':18} {'CPU ms/msg':>11} {'user ms/msg':>12} {'msgs/s':>8} {'CPU vs bare':>12}")
    bare = statistics.median(f[0] for f in results["bare"])
    for name, _, _ in configs:
        cpu = statistics.median(f[0] for f in results[name])
        user = statistics.median(f[2] for f in results[name])
        rate = statistics.median(f[1] for f in results[name])
        print(f"{name:18} {cpu:11.2f} {user:12.2f} {rate:8.1f} {cpu / bare:11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
