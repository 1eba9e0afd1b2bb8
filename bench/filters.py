"""Filter-chain benchmark: server CPU per message with the full inbound chain vs the bare MX path.

Three ``twistd -n mailserv`` runs on loopback, each receiving the same
``--messages`` messages (4 KiB, DKIM-signed with RSA-2048, a link in the
body) from the same client over the PROXY protocol (client 192.0.2.10):

- ``bare``: the MX listener without a pipeline (relay and recipient checks,
  delivery to maildir with fsync);
- ``full, cache warm``: every built-in filter (spamtrap, tarpit, dnsbl with
  two zones, ratelimit, greylist, spf, headers, dkim, arc, dmarc, uribl,
  rules, authresults) with the DNS answers of the loopback DNS server cached
  by the resolver (its plain lookups' cache and dnspython's, TTL 60 s);
- ``full, cache cold``: the same with ``[dns] cache_size = 0``, so every
  lookup goes to the DNS server.

The figure is the CPU time (user + system, all threads) the server process
and all its descendant processes (delivery helpers, a queue worker) used per
message, read from /proc before and after the run; the DNS server and the
client run in their own processes and are not counted.  Goal (issue 9): the
full chain at most doubles the CPU per message of the bare path.

``--tree TREE`` runs the server code of another checkout instead of this
one; ``--baseline TREE`` also runs each configuration with the server code of
another checkout (e.g. ``git archive HEAD~3 | tar -x -C /tmp/base``),
interleaved in the same rounds, for before/after figures from one run.
``--profile DIR`` runs the servers under cProfile (every thread, thread CPU
time, from the end of the warm-up) and writes one pstats file per
configuration and round into DIR (CPU figures are then not comparable).

    .venv/bin/python bench/filters.py [--messages 300] [--rounds 3] [--tree TREE]
        [--baseline TREE] [--profile DIR]
"""

from __future__ import annotations

import argparse
import os
import signal
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
from tests.support import process  # noqa: E402
from tests.support.process import TWISTD, test_config  # noqa: E402

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


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (children of each of its threads, recursively)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:  # exited meanwhile
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
            except OSError:
                continue
    return found


def cpu_seconds(pid: int) -> dict[int, tuple[float, float]]:
    """(utime, stime) in seconds of ``pid`` and of each of its descendants (all threads)."""
    out = {}
    for proc in descendants(pid):
        try:
            with open(f"/proc/{proc}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile: not counted
            continue
        out[proc] = (int(fields[11]) / TICKS, int(fields[12]) / TICKS)
    return out


def cpu_used(
    before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]]
) -> tuple[float, float]:
    """(user, system) seconds used between two ``cpu_seconds`` samples.

    A process that appeared in between counts from zero; one that exited in
    between is not counted (the delivery helpers and the queue worker live as
    long as the server).
    """
    user = system = 0.0
    for proc, (utime, stime) in after.items():
        start = before.get(proc, (0.0, 0.0))
        user += utime - start[0]
        system += stime - start[1]
    return user, system


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


# twistd under cProfile in every thread (threading.setprofile starts one profiler per
# new thread), timed in CPU time per thread; SIGUSR1 empties the profiles (sent after the
# warm-up), and the merged pstats file is written when twistd exits.  Descendant processes
# are not profiled.
PROFILED_TWISTD = """
import atexit, cProfile, pstats, signal, sys, threading, time
out = sys.argv.pop(1)
profiles = [cProfile.Profile(time.thread_time)]
def start(*_):
    p = cProfile.Profile(time.thread_time)
    profiles.append(p)
    p.enable()
def dump():
    stats = pstats.Stats(profiles[0])
    for p in profiles[1:]:
        try:
            stats.add(p)
        except TypeError:  # a thread that finished no call since the reset (pycares's)
            pass
    stats.dump_stats(out)
def clear(*_):
    for p in profiles:
        p.clear()
atexit.register(dump)
signal.signal(signal.SIGUSR1, clear)
threading.setprofile(start)
profiles[0].enable()
from twisted.scripts.twistd import run
sys.exit(run())
"""


def run(
    name: str,
    work: Path,
    dns: DNSServer,
    keys: Keys,
    count: int,
    cache: bool,
    pipeline: bool,
    tree: str | None = None,
    profile: Path | None = None,
) -> tuple[float, float, float]:
    """(CPU ms per message, messages per second, user CPU ms per message) of one configuration.

    ``tree``: run the server code of that checkout; ``profile``: write its cProfile stats there.
    """
    base = work / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
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
    env = {"PYTHONPATH": tree} if tree else None
    if profile is not None:
        process.TWISTD = [sys.executable, "-c", PROFILED_TWISTD, str(profile)]
    try:
        proc = runner.start(test_config(state, {"mx": listener}, **extra), timeout=60, env=env)
    finally:
        process.TWISTD = TWISTD
    try:
        port = proc.port("mx")
        send(port, [make_message(keys, -i) for i in range(1, 11)])  # warm-up (imports, caches)
        messages = [make_message(keys, i) for i in range(count)]
        if profile is not None:
            os.kill(proc.proc.pid, signal.SIGUSR1)
            time.sleep(0.5)
        before = cpu_seconds(proc.proc.pid)
        started = time.monotonic()
        send(port, messages)
        elapsed = time.monotonic() - started
        after = cpu_seconds(proc.proc.pid)
    finally:
        runner.stop_all()
    user, system = cpu_used(before, after)
    return (user + system) * 1000 / count, count / elapsed, user * 1000 / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", metavar="TREE", help="run this checkout's server code")
    parser.add_argument("--baseline", metavar="TREE", help="also run this checkout's server")
    parser.add_argument("--profile", metavar="DIR", type=Path, help="write cProfile stats here")
    args = parser.parse_args()
    keys = Keys()
    trees: list[tuple[str, str | None]] = [
        ("", str(Path(args.tree).resolve()) if args.tree else None)
    ]
    if args.baseline:
        trees.append((" (base)", str(Path(args.baseline).resolve())))
    configs = [
        (name + suffix, cache, pipeline, tree)
        for suffix, tree in trees
        for name, cache, pipeline in (
            ("bare", True, False),
            ("full, cache warm", True, True),
            ("full, cache cold", False, True),
        )
    ]
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name, *_ in configs}
    width = max(18, *(len(name) for name in results))
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
                for name, cache, pipeline, tree in configs:
                    label = f"{name} {rnd}"
                    profile = None
                    if args.profile:
                        profile = args.profile / (
                            label.replace(" ", "_").replace(",", "") + ".prof"
                        )
                    figures = run(
                        label, work, dns, keys, args.messages, cache, pipeline, tree, profile
                    )
                    results[name].append(figures)
                    print(
                        f"round {rnd + 1} {name:{width}} {figures[0]:7.2f} ms CPU/msg "
                        f"({figures[2]:.2f} user) {figures[1]:7.1f} msgs/s",
                        flush=True,
                    )
        finally:
            dns.stop()
    print(f"\n{args.messages} messages of ~4 KiB, median of {args.rounds} rounds")
    print(
        f"{'path':{width}} {'CPU ms/msg':>11} {'user ms/msg':>12} {'msgs/s':>8} {'CPU vs bare':>12}"
    )
    for suffix, _tree in trees:
        bare = statistics.median(f[0] for f in results["bare" + suffix])
        for name, *_ in configs:
            if not name.endswith(suffix) or (not suffix and name.endswith(")")):
                continue
            cpu = statistics.median(f[0] for f in results[name])
            user = statistics.median(f[2] for f in results[name])
            rate = statistics.median(f[1] for f in results[name])
            print(f"{name:{width}} {cpu:11.2f} {user:12.2f} {rate:8.1f} {cpu / bare:11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
