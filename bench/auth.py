"""Authentication benchmark: logins per second per backend, and the longest reactor stall.

mailserv's portal (the same code the protocols use) is driven on the real
reactor by ``--concurrency`` login loops for ``--seconds``; a 5 ms
LoopingCall measures the longest time the reactor could not run (hashing,
LDAP, SQL and PAM all run in thread pools, so this should stay small).
Backends: passwd-file with ARGON2ID and with SHA512-CRYPT, SQLite,
PostgreSQL (127.0.0.1:5432), LDAP (a private slapd) and PAM (pam_wrapper).

The peer is Dovecot's auth service (2.3) on the same passwd-files, spoken to
over its auth-client socket (the protocol its login processes use), with
the same number of concurrent clients.

    .venv/bin/python bench/auth.py [--seconds 5] [--concurrency 8] [--only NAME ...]

Backends whose server or program is missing are reported as skipped.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pytest  # noqa: E402

from mailserv.auth import build_portal, schemes  # noqa: E402
from mailserv.config import from_dict  # noqa: E402
from mailserv.threads import ThreadPools  # noqa: E402
from tests.auth import conftest as fx  # noqa: E402  (slapd, SQL and PAM set-up helpers)

USER = "alice@example.org"
PASSWORD = fx.ALICE_PASSWORD
CRYPTO_THREADS = [4]


class Service:
    def __init__(self, work: Path, backend: dict[str, Any], reactor: Any, threads: int) -> None:
        raw = {
            "config_version": 1,
            "hostname": "mail.example.org",
            "domains": ["example.org"],
            "state_dir": str(work / "state"),
            "auth": {"backends": ["b"], "backend": {"b": backend}},
            "store": {"path": str(work / "mail/{domain}/{localpart}")},
        }
        self.config = from_dict(raw, "bench.toml", str(work))
        self.reactor = reactor
        # The service's defaults: [threads] auth = 10, crypto = 4.
        self.threads = ThreadPools(reactor, {"auth": threads, "crypto": CRYPTO_THREADS[0]})


# --------------------------------------------------------------------------
# Backends


def passwd_file(work: Path, scheme: str) -> dict[str, Any]:
    path = work / f"users-{scheme}"
    path.write_text(f"{USER}:{schemes.hash_password(PASSWORD, scheme)}::::::\n")
    return {"type": "passwd-file", "path": str(path)}


def sqlite_backend(work: Path) -> dict[str, Any]:
    conn = sqlite3.connect(work / "users.sqlite")
    fx.fill_sql(conn, "?", "SHA512-CRYPT")
    conn.close()
    return {"type": "sql", "driver": "sqlite", "database": str(work / "users.sqlite")}


def postgres_backend(work: Path, cleanups: list[Callable[[], None]]) -> dict[str, Any]:
    import psycopg

    admin = psycopg.connect(dbname="postgres", autocommit=True, connect_timeout=3, **fx.PG)
    name = f"mailserv_bench_{os.getpid()}"
    admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    admin.execute(f'CREATE DATABASE "{name}"')
    cleanups.append(lambda: admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    with psycopg.connect(dbname=name, **fx.PG) as conn:
        fx.fill_sql(conn, "%s", "SHA512-CRYPT")
    return {"type": "sql", "driver": "postgresql", "database": name, "user": "postgres"}


def ldap_backend(work: Path, cleanups: list[Callable[[], Any]]) -> dict[str, Any]:
    from cryptography.hazmat.primitives import serialization

    from mailserv.tls import generate_certificate

    d = work / "slapd"
    d.mkdir()
    cert, key = generate_certificate("localhost", ("127.0.0.1",))
    (d / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "k.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = fx.start_slapd(d, str(d / "c.pem"), str(d / "c.pem"), str(d / "k.pem"))
    cleanups.append(server.stop)
    return {
        "type": "ldap",
        "urls": [server.url],
        "base_dn": "dc=example,dc=org",
        "bind_dn": server.reader_dn,
        "bind_password_file": server.reader_password_file,
        "pool_size": 8,
    }


def pam_backend(work: Path) -> dict[str, Any]:
    fx.use_pam_wrapper(work / "pam")
    return fx.pam_case().section


# --------------------------------------------------------------------------
# Running mailserv


def measure(work: Path, backend: dict[str, Any], seconds: float, concurrency: int) -> Any:
    """Deferred (logins/s, longest and 99th-percentile reactor stall in ms, failures)."""
    from twisted.cred.credentials import UsernamePassword
    from twisted.internet import defer, reactor, task

    from mailserv.auth import _shared
    from mailserv.interfaces import IMailUser

    service = Service(work, backend, reactor, max(concurrency, 4))
    portal = build_portal(service)
    creds = UsernamePassword(USER.encode(), PASSWORD.encode())
    counts = {"ok": 0, "failed": 0}
    stall = {"last": time.monotonic()}
    gaps: list[float] = []

    def tick() -> None:
        now = time.monotonic()
        gaps.append(max(0.0, now - stall["last"] - 0.005))
        stall["last"] = now

    @defer.inlineCallbacks
    def loop(deadline: float) -> Any:
        while time.monotonic() < deadline:
            try:
                yield portal.login(creds, None, IMailUser)
                counts["ok"] += 1
            except Exception:
                counts["failed"] += 1

    @defer.inlineCallbacks
    def run() -> Any:
        try:
            yield portal.login(creds, None, IMailUser)  # warm up: connections, file load
            ticker = task.LoopingCall(tick)
            stall["last"] = time.monotonic()
            ticker.start(0.005)
            started = time.monotonic()
            yield defer.gatherResults([loop(started + seconds) for _ in range(concurrency)])
            elapsed = time.monotonic() - started
            ticker.stop()
            gaps.sort()
            p99 = gaps[int(len(gaps) * 0.99)] if gaps else 0.0
            return counts["ok"] / elapsed, gaps[-1] * 1000, p99 * 1000, counts["failed"]
        finally:
            _shared[service].close()
            service.threads._stop_pools()

    return run()


# --------------------------------------------------------------------------
# Dovecot's auth service


class DovecotAuth:
    """A private Dovecot (2.3) whose auth service reads ``passwd``."""

    def __init__(self, work: Path, passwd: str) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        run = work / "run"
        users = "default_internal_user = dovecot\ndefault_login_user = dovenull\n"
        if os.getuid() != 0:
            me = os.environ.get("USER", "nobody")
            users = f"default_internal_user = {me}\ndefault_login_user = {me}\n"
        (work / "dovecot.conf").write_text(
            f"base_dir = {run}\nstate_dir = {work}/state\nlog_path = {work}/dovecot.log\n"
            f"{users}protocols = none\nlisten = 127.0.0.1\nssl = no\ndisable_plaintext_auth = no\n"
            "auth_mechanisms = plain\nauth_cache_size = 0\n"
            f"passdb {{\n  driver = passwd-file\n  args = {passwd}\n}}\n"
            "userdb {\n  driver = static\n  args = uid=65534 gid=65534 home=/nonexistent\n}\n"
            "service auth {\n  unix_listener auth-client {\n    mode = 0666\n  }\n}\n"
            "service anvil {\n  chroot =\n}\nservice stats {\n  chroot =\n}\n"
        )
        self.proc = subprocess.Popen(
            ["dovecot", "-F", "-c", str(work / "dovecot.conf")], start_new_session=True
        )
        self.socket = str(run / "auth-client")
        deadline = time.monotonic() + 20
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("dovecot did not start")
            time.sleep(0.05)
        time.sleep(0.3)

    def client(self, deadline: float, counts: dict[str, int], lock: threading.Lock) -> None:
        """One auth-client connection, one PLAIN request at a time (as a login process does)."""
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(self.socket)
        f = sock.makefile("rwb")
        f.write(f"VERSION\t1\t2\nCPID\t{os.getpid()}\n".encode())
        f.flush()
        while f.readline().strip() != b"DONE":
            pass
        resp = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        n = 0
        while time.monotonic() < deadline:
            n += 1
            f.write(f"AUTH\t{n}\tPLAIN\tservice=imap\tsecured\tresp={resp}\n".encode())
            f.flush()
            line = f.readline()
            with lock:
                counts["ok" if line.startswith(b"OK\t") else "failed"] += 1
        sock.close()

    def run(self, seconds: float, concurrency: int) -> tuple[float, int]:
        counts = {"ok": 0, "failed": 0}
        lock = threading.Lock()
        started = time.monotonic()
        threads = [
            threading.Thread(target=self.client, args=(started + seconds, counts, lock))
            for _ in range(concurrency)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return counts["ok"] / (time.monotonic() - started), counts["failed"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(15)


# --------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--crypto-threads", type=int, default=4, help="[threads] crypto")
    parser.add_argument("--only", nargs="*", default=None, help="substrings of backend names")
    args = parser.parse_args()
    CRYPTO_THREADS[0] = args.crypto_threads
    work = Path(tempfile.mkdtemp(prefix="mailserv-bench-auth-"))
    work.chmod(0o755)  # Dovecot's auth process reads the passwd-files as user dovecot
    cleanups: list[Callable[[], Any]] = []
    setups: dict[str, Callable[[], dict[str, Any]]] = {
        "passwd-file ARGON2ID": lambda: passwd_file(work, "ARGON2ID"),
        "passwd-file SHA512-CRYPT": lambda: passwd_file(work, "SHA512-CRYPT"),
        "SQLite (SHA512-CRYPT)": lambda: sqlite_backend(work),
        "PostgreSQL (SHA512-CRYPT)": lambda: postgres_backend(work, cleanups),
        "LDAP bind (slapd, SSHA)": lambda: ldap_backend(work, cleanups),
        "PAM (pam_wrapper)": lambda: pam_backend(work),
    }
    selected = {
        name: setup
        for name, setup in setups.items()
        if not args.only or any(o.lower() in name.lower() for o in args.only)
    }
    ours: dict[str, Any] = {}
    from twisted.internet import defer, reactor

    @defer.inlineCallbacks
    def all_backends() -> Any:
        for name, setup in selected.items():
            try:
                backend = setup()
            except (Exception, pytest.skip.Exception) as exc:  # skip: from the shared helpers
                ours[name] = f"skipped ({type(exc).__name__}: {exc})"[:90]
                continue
            try:
                ours[name] = yield measure(work, backend, args.seconds, args.concurrency)
            except Exception as exc:
                ours[name] = f"failed ({type(exc).__name__}: {exc})"[:90]

    def start() -> None:
        d = all_backends()
        d.addErrback(lambda f: f.printTraceback())
        d.addBoth(lambda _: reactor.stop())

    try:
        reactor.callWhenRunning(start)
        reactor.run()
        peer: dict[str, Any] = {}
        if shutil.which("dovecot"):
            for name in selected:
                if name.startswith("passwd-file"):
                    scheme = name.split()[-1]
                    dovecot = DovecotAuth(work / f"dovecot-{scheme}", str(work / f"users-{scheme}"))
                    try:
                        peer[name] = dovecot.run(args.seconds, args.concurrency)
                    finally:
                        dovecot.stop()
    finally:
        for cleanup in cleanups:
            cleanup()
    print(f"concurrency {args.concurrency}, {args.seconds:g} s per backend, {os.cpu_count()} CPUs")
    print(
        f"{'backend':28} {'mailserv logins/s':>18} {'stall max/p99 ms':>17} "
        f"{'Dovecot logins/s':>17}"
    )
    for name in selected:
        result = ours.get(name)
        if not isinstance(result, tuple):
            print(f"{name:28} {result}")
            continue
        rate, stall, p99, failed = result
        other = peer.get(name)
        theirs = f"{other[0]:17.1f}" if other else f"{'-':>17}"
        note = f"  ({failed} failed)" if failed else ""
        print(f"{name:28} {rate:18.1f} {stall:9.1f} /{p99:6.1f} {theirs}{note}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
