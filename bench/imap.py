"""IMAP load benchmark: mailserv against Dovecot's imap on loopback, same maildir, same client.

10 concurrent clients (asyncio, one connection each) run for a fixed time.  Each
client logs in, SELECTs an INBOX of 1000 messages and loops over: FETCH headers
of 10 messages, FETCH one whole body, FETCH FLAGS of every message, STORE a
flag, APPEND a message, UID STORE \\Deleted + UID EXPUNGE it again, IDLE/DONE
and NOOP; every 20 rounds it logs out and in again.  Reported: commands per
second, logins per second, p50/p99 latency per command and overall, and
protocol errors (any NO, BAD or broken response).  Plaintext LOGIN on
127.0.0.1 for both servers; each server gets its own copy of the maildir.

    .venv/bin/python bench/imap.py [--clients 10] [--seconds 20] [--messages 1000]

Needs Debian's dovecot-imapd (``apt-get install dovecot-imapd``; where a
policy-rc.d forbids it, installing does not start a system Dovecot).  This
script runs its own Dovecot in the foreground with a private configuration
and stops it afterwards.  Without Dovecot it reports mailserv alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pop3 as popbench

USER = popbench.USER
PASSWORD = popbench.PASSWORD
_LITERAL = re.compile(rb"\{(\d+)\}\r\n$")


class ProtocolError(Exception):
    """A NO, BAD or malformed response."""


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    logins: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def add(self, name: str, seconds: float) -> None:
        self.latencies.setdefault(name, []).append(seconds)

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(text[:200])


class Client:
    """A minimal IMAP client: tagged commands, literals, continuation requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.n = 0

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 24)
        client = cls(reader, writer)
        greeting = await reader.readline()
        if not greeting.startswith(b"* OK"):
            raise ProtocolError(f"greeting {greeting!r}")
        return client

    async def _response_line(self) -> bytes:
        line = await self.reader.readline()
        if not line:
            raise ProtocolError("connection closed")
        while True:
            m = _LITERAL.search(line)
            if m is None:
                return line
            line += await self.reader.readexactly(int(m.group(1)))
            more = await self.reader.readline()
            if not more:
                raise ProtocolError("connection closed in a literal")
            line += more

    async def _until_tagged(self, tag: bytes) -> list[bytes]:
        lines = []
        while True:
            line = await self._response_line()
            if line.startswith(tag + b" "):
                status = line[len(tag) + 1 :].split(b" ", 1)[0]
                if status != b"OK":
                    raise ProtocolError(line.decode("latin-1").strip())
                lines.append(line)
                return lines
            lines.append(line)

    def _tag(self) -> bytes:
        self.n += 1
        return b"b%d" % self.n

    async def command(self, text: str) -> list[bytes]:
        tag = self._tag()
        self.writer.write(tag + b" " + text.encode() + b"\r\n")
        return await self._until_tagged(tag)

    async def append(self, data: bytes) -> list[bytes]:
        tag = self._tag()
        self.writer.write(tag + b" APPEND INBOX {%d}\r\n" % len(data))
        line = await self._response_line()
        if not line.startswith(b"+"):
            raise ProtocolError(line.decode("latin-1").strip())
        self.writer.write(data + b"\r\n")
        return await self._until_tagged(tag)

    async def idle(self) -> list[bytes]:
        tag = self._tag()
        self.writer.write(tag + b" IDLE\r\n")
        line = await self._response_line()
        while line.startswith(b"* "):
            line = await self._response_line()
        if not line.startswith(b"+"):
            raise ProtocolError(line.decode("latin-1").strip())
        self.writer.write(b"DONE\r\n")
        return await self._until_tagged(tag)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


NEW_MESSAGE = (
    b"From: load@example.test\r\nTo: bench@example.test\r\nSubject: appended\r\n"
    b"Message-ID: <appended@example.test>\r\n\r\n" + b"appended body line\r\n" * 50
)


async def timed(stats: Stats, name: str, coro: object) -> list[bytes]:
    start = time.perf_counter()
    result = await coro  # type: ignore[misc]
    stats.add(name, time.perf_counter() - start)
    return result  # type: ignore[no-any-return]


async def session(
    port: int, stats: Stats, deadline: float, messages: int, rng: random.Random
) -> None:
    while time.monotonic() < deadline:
        try:
            start = time.perf_counter()
            client = await Client.connect(port)
            await client.command(f'LOGIN "{USER}" "{PASSWORD}"')
            stats.add("LOGIN", time.perf_counter() - start)
            stats.logins += 1
            await timed(stats, "SELECT", client.command("SELECT INBOX"))
            for _ in range(20):
                if time.monotonic() >= deadline:
                    break
                n = rng.randint(1, messages - 10)
                await timed(
                    stats,
                    "FETCH headers",
                    client.command(
                        f"FETCH {n}:{n + 9} (UID FLAGS RFC822.SIZE "
                        "BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)])"
                    ),
                )
                await timed(stats, "FETCH body", client.command(f"FETCH {n} (BODY.PEEK[])"))
                await timed(stats, "FETCH flags", client.command("FETCH 1:* (FLAGS)"))
                op = "+" if rng.random() < 0.5 else "-"
                await timed(stats, "STORE", client.command(f"STORE {n} {op}FLAGS (\\Seen)"))
                lines = await timed(stats, "APPEND", client.append(NEW_MESSAGE))
                m = re.search(rb"APPENDUID \d+ (\d+)", lines[-1])
                if m is None:
                    raise ProtocolError("APPEND without APPENDUID")
                uid = int(m.group(1))
                await timed(
                    stats, "STORE", client.command(f"UID STORE {uid} +FLAGS.SILENT (\\Deleted)")
                )
                await timed(stats, "EXPUNGE", client.command(f"UID EXPUNGE {uid}"))
                await timed(stats, "IDLE", client.idle())
                await timed(stats, "NOOP", client.command("NOOP"))
            await timed(stats, "LOGOUT", client.command("LOGOUT"))
            await client.close()
        except (ProtocolError, OSError, asyncio.IncompleteReadError) as exc:
            stats.error(repr(exc))
            await asyncio.sleep(0.05)


async def load(port: int, clients: int, seconds: float, messages: int) -> tuple[Stats, float]:
    stats = Stats()
    start = time.monotonic()
    deadline = start + seconds
    await asyncio.gather(
        *(session(port, stats, deadline, messages, random.Random(i)) for i in range(clients))
    )
    return stats, time.monotonic() - start


async def warm_up(port: int) -> None:
    """Log in and SELECT once so that both servers build their indexes before timing."""
    client = await Client.connect(port)
    await client.command(f'LOGIN "{USER}" "{PASSWORD}"')
    await client.command("SELECT INBOX")
    await client.command("FETCH 1:* (FLAGS RFC822.SIZE)")
    await client.command("LOGOUT")
    await client.close()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(name: str, stats: Stats, elapsed: float) -> dict[str, float]:
    every = [v for values in stats.latencies.values() for v in values]
    total = len(every)
    print(f"\n{name}: {total} commands in {elapsed:.1f}s, {stats.errors} errors")
    print(f"  {'command':<14}{'count':>8}{'p50 ms':>10}{'p99 ms':>10}")
    for cmd in sorted(stats.latencies):
        values = stats.latencies[cmd]
        print(
            f"  {cmd:<14}{len(values):>8}{percentile(values, 0.5) * 1000:>10.2f}"
            f"{percentile(values, 0.99) * 1000:>10.2f}"
        )
    for sample in stats.error_samples:
        print(f"  error: {sample}")
    return {
        "cps": total / elapsed,
        "logins": stats.logins / elapsed,
        "p50": percentile(every, 0.5) * 1000,
        "p99": percentile(every, 0.99) * 1000,
        "errors": float(stats.errors),
        "median": statistics.median(every) * 1000 if every else 0.0,
    }


class ImapDovecot(popbench.Dovecot):
    """A private Dovecot (imap only); everything but the protocol comes from bench/pop3.py."""

    PROTOCOL = "imap"
    EXTRA = "mail_max_userip_connections = 100\n"


class ImapMailserv(popbench.Mailserv):
    """``twistd -n mailserv`` with an IMAP listener; ``stop`` comes from bench/pop3.py."""

    def __init__(self, work: Path, mail_root: Path, fsync: bool = True) -> None:
        self.port = popbench.free_port()
        state = work / "state"
        state.mkdir()
        (state / "users.passwd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}::::::\n")
        config = work / "mailserv.toml"
        config.write_text(
            'config_version = 1\nhostname = "mail.example.test"\ndomains = ["example.test"]\n'
            f'state_dir = "{state}"\n\n[listeners.imap]\nprotocol = "imap"\n'
            f'endpoints = ["tcp:{self.port}:interface=127.0.0.1"]\ntls = "none"\n\n'
            '[auth]\nbackends = ["local"]\n[auth.backend.local]\n'
            f'type = "passwd-file"\npath = "{state}/users.passwd"\n\n'
            f'[store]\nformat = "maildir"\npath = "{mail_root}/{{user}}/Maildir"\n'
            f"fsync = {'true' if fsync else 'false'}\n"
        )
        twistd = "import sys; from twisted.scripts.twistd import run; sys.exit(run())"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", twistd, "-n", "--pidfile=", "-l", str(work / "mailserv.log"),
             "mailserv", "--config", str(config)],
            cwd=work,
            env=dict(os.environ, PYTHONPATH=str(popbench.REPO)),
            start_new_session=True,
        )  # fmt: skip
        popbench.wait_port(self.port, self.proc, "mailserv")


def run_one(name: str, port: int, args: argparse.Namespace) -> dict[str, float]:
    asyncio.run(warm_up(port))
    stats, elapsed = asyncio.run(load(port, args.clients, args.seconds, args.messages))
    return report(name, stats, elapsed)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--skip-dovecot", action="store_true", help="measure mailserv alone")
    parser.add_argument(
        "--no-fsync", action="store_true", help="mailserv with [store] fsync = false (diagnosis)"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imapbench-"))
    work.chmod(0o755)  # Dovecot's auth and mail processes run as unprivileged users
    results: dict[str, dict[str, float]] = {}
    try:
        source = work / "source" / USER / "Maildir"
        popbench.make_maildir(source, args.messages, args.size)
        ours_root = work / "mailserv-mail"
        shutil.copytree(work / "source", ours_root)
        (work / "mailserv").mkdir()
        ours = ImapMailserv(work / "mailserv", ours_root, fsync=not args.no_fsync)
        try:
            results["mailserv"] = run_one("mailserv", ours.port, args)
        finally:
            ours.stop()
        if args.skip_dovecot:
            pass
        elif shutil.which("dovecot") or Path("/usr/sbin/dovecot").exists():
            theirs_root = work / "dovecot-mail"
            shutil.copytree(work / "source", theirs_root)
            (work / "dovecot").mkdir()
            dovecot = ImapDovecot(work / "dovecot", theirs_root)
            try:
                dovecot.own(theirs_root)
                results["dovecot"] = run_one(dovecot.version(), dovecot.port, args)
            finally:
                dovecot.stop()
        else:
            print("\ndovecot not installed: mailserv alone (apt-get install dovecot-imapd)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.clients} clients, {args.seconds:.0f}s, INBOX of {args.messages} messages")
    print(f"{'server':<10}{'cmd/s':>10}{'logins/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for name, r in results.items():
        print(
            f"{name:<10}{r['cps']:>10.1f}{r['logins']:>10.2f}{r['p50']:>10.2f}"
            f"{r['p99']:>10.2f}{r['errors']:>8.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
