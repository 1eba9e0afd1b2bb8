"""Fixtures of the queue tests: scripted "remote" MX servers on 127.0.0.2, 127.0.0.3, ...

``mx_net.server("127.0.0.2", **behaviour)`` starts a small SMTP server (Twisted, in this
process) on that loopback address and the shared port ``mx_net.port``; it records every
transaction it accepts (``.messages``: sender, recipients, unstuffed data) and the raw DATA
lines (``.raw``).  ``queue_env`` builds a QueueService whose DNS is the ``dns_server``
fixture and whose MX port is ``mx_net.port``.  Only loopback addresses are used.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, protocol
from twisted.protocols.basic import LineReceiver

from mailserv.config import parse_config
from mailserv.dns import DNSResolver
from mailserv.queue import spool
from mailserv.threads import ThreadPools


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    tls: bool
    connection: int = 0  # which connection of the server (1, 2, ...) carried it


@dataclass
class Behaviour:
    greeting: str = "220 mx.example.test ESMTP"
    ehlo: bool = True
    extensions: list[str] = field(
        default_factory=lambda: ["PIPELINING", "SIZE 50000000", "8BITMIME", "SMTPUTF8", "DSN"]
    )
    starttls: bool = False
    cert: tuple[str, str] | None = None
    mail_reply: str = "250 2.1.0 Ok"
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # address -> reply
    data_reply: str = "250 2.0.0 Ok: queued"
    drop_in_data: bool = False  # close the connection once DATA has started
    broken_tls: bool = False  # answer STARTTLS with 220, then send garbage and close
    auth: tuple[str, str] | None = None  # AUTH PLAIN user/password to require
    silent_after_data: bool = False  # never answer the final dot
    final_reply_delay: float = 0.0  # answer the final dot this much later (seconds)


class FakeMXProtocol(LineReceiver):
    MAX_LENGTH = 1_000_000
    delimiter = b"\r\n"

    def __init__(self, server: FakeMX) -> None:
        self.server = server
        self.b = server.behaviour
        self.in_data = False
        self.reset()
        self.tls = False
        self.authenticated = False
        self.held: list[bytes] | None = None  # lines received while a reply is delayed

    def reset(self) -> None:
        self.sender: str | None = None
        self.rcpts: list[str] = []
        self.lines: list[bytes] = []

    def connectionMade(self) -> None:
        self.server.connections += 1
        self.number = self.server.connections
        self.reply(self.b.greeting)

    def reply(self, text: str) -> None:
        self.transport.write(text.encode() + b"\r\n")

    def lineReceived(self, line: bytes) -> None:
        if self.held is not None:
            self.held.append(line)
            self.server.events.append("held")  # arrived before the delayed reply
            return
        if self.in_data:
            self.server.raw.append(line)
            if line == b".":
                self.in_data = False
                data = b"".join(
                    (ln[1:] if ln.startswith(b".") else ln) + b"\r\n" for ln in self.lines
                )
                if self.b.silent_after_data:
                    return
                reply = self.b.data_reply
                if reply.startswith("2"):
                    self.server.messages.append(
                        Received(self.sender or "", list(self.rcpts), data, self.tls, self.number)
                    )
                self.reset()
                if self.b.final_reply_delay:
                    # A slow server: later lines wait, so replies stay in order.
                    from twisted.internet import reactor

                    self.held = []

                    def late() -> None:
                        self.server.events.append("final reply")
                        self.reply(reply)
                        held, self.held = self.held or [], None
                        for waiting in held:
                            self.lineReceived(waiting)

                    reactor.callLater(self.b.final_reply_delay, late)
                    return
                self.server.events.append("final reply")
                self.reply(reply)
                return
            if self.b.drop_in_data:
                self.transport.loseConnection()
                return
            self.lines.append(line)
            return
        text = line.decode("utf-8", "replace")
        self.server.commands.append(text)
        self.server.events.append(text.split(" ", 1)[0].upper())
        verb = text.split(" ", 1)[0].upper()
        if verb == "EHLO":
            if not self.b.ehlo:
                self.reply("502 5.5.1 no EHLO")
                return
            exts = list(self.b.extensions)
            if self.b.starttls and not self.tls:
                exts.append("STARTTLS")
            if self.b.auth is not None and self.tls:
                exts.append("AUTH LOGIN PLAIN")
            lines = ["mx.example.test", *exts]
            out = [f"250-{x}" for x in lines[:-1]] + [f"250 {lines[-1]}"]
            self.transport.write("".join(x + "\r\n" for x in out).encode())
        elif verb == "HELO":
            self.reply("250 mx.example.test")
        elif verb == "STARTTLS" and self.b.starttls and self.b.broken_tls:
            self.reply("220 2.0.0 go ahead")
            self.transport.write(b"this is not a TLS server hello\r\n" * 4)
            self.transport.loseConnection()
        elif verb == "AUTH" and self.b.auth is not None:
            import base64

            parts = text.split(" ")
            user, password = self.b.auth
            expected = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            if len(parts) == 3 and parts[1].upper() == "PLAIN" and parts[2] == expected:
                self.authenticated = True
                self.reply("235 2.7.0 Authentication successful")
            else:
                self.reply("535 5.7.8 Authentication credentials invalid")
        elif verb == "STARTTLS" and self.b.starttls:
            from mailserv.tls import ServerTLS

            assert self.b.cert is not None
            self.reply("220 2.0.0 go ahead")
            self.transport.startTLS(ServerTLS(*self.b.cert))
            self.tls = True
        elif verb == "MAIL" and self.b.auth is not None and not self.authenticated:
            self.reply("530 5.7.0 Authentication required")
        elif verb == "MAIL":
            self.sender = text[10:].split(">")[0].lstrip("<")
            self.reply(self.b.mail_reply)
        elif verb == "RCPT":
            address = text[8:].split(">")[0].lstrip("<")
            reply = self.b.rcpt_replies.get(address, "250 2.1.5 Ok")
            if reply.startswith("2"):
                self.rcpts.append(address)
            self.reply(reply)
        elif verb == "DATA":
            if not self.rcpts:
                self.reply("554 5.5.1 no valid recipients")
                return
            self.in_data = True
            self.reply("354 go ahead")
        elif verb == "RSET":
            self.reset()
            self.reply("250 2.0.0 Ok")
        elif verb == "QUIT":
            self.reply("221 2.0.0 bye")
            self.transport.loseConnection()
        elif verb == "NOOP":
            self.reply("250 2.0.0 Ok")
        else:
            self.reply("502 5.5.2 unknown command")


class FakeMX(protocol.Factory):
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.messages: list[Received] = []
        self.raw: list[bytes] = []
        self.commands: list[str] = []
        self.events: list[str] = []  # command verbs and "final reply", in order
        self.connections = 0
        self.port: Any = None

    def buildProtocol(self, addr: Any) -> FakeMXProtocol:
        return FakeMXProtocol(self)


def free_port(hosts: list[str]) -> int:
    """A TCP port free on every one of ``hosts`` (all loopback)."""
    for _ in range(50):
        probe = socket.socket()
        probe.bind((hosts[0], 0))
        port = probe.getsockname()[1]
        probe.close()
        ok = True
        for host in hosts:
            s = socket.socket()
            try:
                s.bind((host, port))
            except OSError:
                ok = False
            finally:
                s.close()
        if ok:
            return port
    raise RuntimeError("no common free port")


class MXNet:
    def __init__(self) -> None:
        self.port = free_port([f"127.0.0.{i}" for i in range(2, 8)])
        self.servers: list[FakeMX] = []

    def server(self, host: str, **behaviour: Any) -> FakeMX:
        from twisted.internet import reactor

        assert host.startswith("127.") and host != "127.0.0.1"
        fake = FakeMX(Behaviour(**behaviour))
        fake.port = reactor.listenTCP(self.port, fake, interface=host)
        self.servers.append(fake)
        return fake

    def stop(self) -> defer.Deferred[Any]:
        return defer.DeferredList([defer.maybeDeferred(s.port.stopListening) for s in self.servers])


CONFIG = """
config_version = 1
hostname = "mail.local.test"
domains = ["local.test"]
state_dir = "{state}"
[store]
path = "{state}/mail/{{localpart}}"
[dns]
nameservers = ["127.0.0.1:{dns_port}"]
timeout = "2s"
cache_size = 0
[queue]
smtp_port = {mx_port}
tls_ca_file = "{ca}"
connect_timeout = "3s"
greeting_timeout = "5s"
command_timeout = "5s"
data_timeout = "5s"
block_timeout = "5s"
final_timeout = "5s"
mta_sts_port = {sts_port}
{extra}
"""


class QueueEnv:
    """A QueueService wired to the test DNS server and fake MXs."""

    def __init__(self, tmp_path: Path, dns_port: int, mx_port: int, ca: Any) -> None:
        self.tmp_path = tmp_path
        self.state = tmp_path / "state"
        self.state.mkdir(exist_ok=True)
        self.dns_port = dns_port
        self.mx_port = mx_port
        self.ca = ca
        self.sts_port = 0
        self.services: list[Any] = []
        self.threads: ThreadPools | None = None

    def config(self, extra: str = "") -> Any:
        return parse_config(
            CONFIG.format(
                state=self.state,
                dns_port=self.dns_port,
                mx_port=self.mx_port,
                ca=self.ca.ca_file,
                sts_port=self.sts_port or 443,
                extra=extra,
            )
        )

    @property
    def queue_dir(self) -> str:
        return str(self.state / "queue")

    def build(self, extra: str = "", router: Any = None, resolver: Any = None, **kw: Any) -> Any:
        from twisted.internet import reactor

        from mailserv.queue import build_queue_service

        config = self.config(extra)
        if self.threads is None:
            self.threads = ThreadPools(reactor, {"dns": 4, "disk": 4, "crypto": 2})

        class FakeService:
            pass

        svc = FakeService()
        svc.config = config  # type: ignore[attr-defined]
        svc.reactor = reactor  # type: ignore[attr-defined]
        svc.threads = self.threads  # type: ignore[attr-defined]
        svc.dns = resolver or DNSResolver(config.dns, self.threads)  # type: ignore[attr-defined]
        svc.router = router  # type: ignore[attr-defined]
        queue = build_queue_service(svc)
        self.services.append(queue)
        return queue

    def start(self, extra: str = "", **kw: Any) -> Any:
        """``build`` and start the queue service."""
        queue = self.build(extra, **kw)
        queue.startService()
        return queue

    def enqueue(
        self,
        sender: str,
        rcpts: list[str],
        data: bytes,
        notify: list[str] | None = None,
        **kw: Any,
    ) -> str:
        entry = spool.QueueEntry(
            id=spool.new_id(),
            sender=sender,
            recipients=[spool.QueuedRecipient(r, notify=notify) for r in rcpts],
            **kw,
        )
        return spool.enqueue(self.queue_dir, entry, [data])

    def state_reasons(self) -> list[str]:
        """The reasons recorded for deferred recipients (to show why a test waits)."""
        from mailserv.queue.state import QueueStore

        store = QueueStore(self.queue_dir)
        out = []
        for entry_id in store.ids():
            if os.path.exists(store.path(entry_id, "state")):
                out += [str(r.reason) for r in store.load(entry_id).recipients if r.reason]
        return out

    def entries(self) -> list[str]:
        return spool.list_entries(self.queue_dir)

    def stop(self) -> None:
        for service in self.services:
            if service.running:
                service.stopService()
        # The pools stop at reactor shutdown (ThreadPools' trigger): stopping them here
        # while an attempt is finishing would restart a pool that then stops twice.


@pytest.fixture
def mx_net() -> Iterator[MXNet]:
    net = MXNet()
    yield net
    for s in net.servers:
        s.port.stopListening()


@pytest.fixture
def queue_env(tmp_path: Path, dns_server: Any, mx_net: MXNet, test_ca: Any) -> Iterator[QueueEnv]:
    env = QueueEnv(tmp_path, dns_server.port, mx_net.port, test_ca)
    yield env
    env.stop()


POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx1.remote.test\r\nmax_age: 86400\r\n"


class TLSNet:
    """The TLS side of the fake remote network (the ``tls_net`` fixture).

    ``mx(host, name)`` starts a fake MX offering STARTTLS with a certificate of
    the session's test CA issued for ``name`` (or ``cert``); ``mta_sts(policy)``
    serves an MTA-STS policy over HTTPS on 127.0.0.7 (``mta-sts.remote.test``)
    and publishes its TXT and A records; the test's QueueEnv fetches it there.
    Everything stops when the test ends.
    """

    def __init__(self, queue_env: QueueEnv, mx_net: MXNet, dns_server: Any, test_ca: Any) -> None:
        self.queue_env = queue_env
        self.mx_net = mx_net
        self.dns_server = dns_server
        self.test_ca = test_ca
        self.listening: list[Any] = []

    def mx(
        self, host: str = "127.0.0.2", name: str = "mx1.remote.test", **behaviour: Any
    ) -> FakeMX:
        if "cert" not in behaviour:  # issuing again would replace the key of ``name``
            behaviour["cert"] = self.test_ca.issue(name)
        return self.mx_net.server(host, starttls=True, **behaviour)

    def mta_sts(self, policy: str = POLICY, policy_id: str = "20261125") -> Any:
        from twisted.internet import reactor
        from twisted.web import resource, server

        from mailserv.tls import ServerTLS

        class Policy(resource.Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                request.setHeader(b"content-type", b"text/plain")
                return policy.encode()

        self.queue_env.sts_port = self.mx_net.port
        cert = self.test_ca.issue("mta-sts.remote.test")
        port = reactor.listenSSL(
            self.mx_net.port, server.Site(Policy()), ServerTLS(*cert), interface="127.0.0.7"
        )
        self.listening.append(port)
        self.sts_dns(policy_id)
        return port

    def sts_dns(self, policy_id: str | None = "20261125", **extra: Any) -> None:
        """The remote domain's records, with the ``_mta-sts`` TXT (None: without it).

        (mta-sts.remote.test has an address either way; nothing listens there
        unless ``mta_sts`` was called.)
        """
        records: dict[str, Any] = {
            "remote.test": {"MX": [[10, "mx1.remote.test"]]},
            "mx1.remote.test": {"A": ["127.0.0.2"]},
            "sender.test": {"MX": [[10, "mx.sender.test"]]},
            "mx.sender.test": {"A": ["127.0.0.5"]},
            "mta-sts.remote.test": {"A": ["127.0.0.7"]},
        }
        if policy_id is not None:
            records["_mta-sts.remote.test"] = {"TXT": [f"v=STSv1; id={policy_id}"]}
        records.update(extra)
        self.dns_server.set(records)

    def dane_dns(self, spki_sha256: str, **extra: Any) -> None:
        """The remote domain's records with a TLSA 3 1 1 record for mx1.remote.test."""
        name = f"_{self.mx_net.port}._tcp.mx1.remote.test"
        self.sts_dns(None, **{name: {"TLSA": [[3, 1, 1, spki_sha256]]}}, **extra)

    def stop(self) -> defer.Deferred[Any]:
        ports, self.listening = self.listening, []
        return defer.DeferredList([defer.maybeDeferred(p.stopListening) for p in ports])


@pytest.fixture
def tls_net(queue_env: QueueEnv, mx_net: MXNet, dns_server: Any, test_ca: Any) -> Iterator[TLSNet]:
    net = TLSNet(queue_env, mx_net, dns_server, test_ca)
    yield net
    net.stop()


def message(
    subject: str = "hello", body: bytes = b"Hello.\r\n", sender: str = "a@local.test"
) -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <b@remote.test>\r\nSubject: {subject}\r\n"
        "Message-ID: <1@local.test>\r\n\r\n"
    ).encode() + body


__all__ = ["POLICY", "FakeMX", "MXNet", "QueueEnv", "TLSNet", "message", "os"]
