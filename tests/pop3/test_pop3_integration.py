"""POP3 end to end: ``twistd -n mailserv`` on loopback with the real stores and the real portal,
driven by Python's poplib, fetchmail and getmail6, for maildir and mbox.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import os
import poplib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailserv.config import from_dict
from mailserv.directory import User
from mailserv.pop3 import lock_directory
from mailserv.pop3.mailbox import MaildropLock
from mailserv.store import store_for
from tests.support.process import render_toml, start_mailserv
from tests.support.process import test_config as make_config

pytestmark = pytest.mark.integration

PASSWORD = "secret one"
FORMATS = ["maildir", "mbox"]
USERS = 40  # one per test on a shared server: no test sees another's mail or lock


class Server:
    """A running mailserv with POP3 (STLS) and POP3S listeners and USERS users."""

    def __init__(self, state_dir: Path, test_ca: Any, store_format: str) -> None:
        state_dir.joinpath("users.passwd").write_text(
            "".join(f"user{i}@example.test:{{PLAIN}}{PASSWORD}::::::\n" for i in range(USERS))
        )
        path = "mail/{domain}/{localpart}/" + ("Maildir" if store_format == "maildir" else "inbox")
        config_dict = make_config(
            state_dir,
            listeners=["pop3", "pop3s"],
            tls=(test_ca.cert_file, test_ca.key_file),
            store={"format": store_format, "path": str(state_dir / path)},
        )
        self.config = from_dict(config_dict)
        # The tests' own deliveries need not be durable (the server's store fsyncs as configured).
        self.config.store.fsync = False
        self.store_format = store_format
        self.ca_file = test_ca.ca_file
        config_file = state_dir / "mailserv.toml"
        config_file.write_text(render_toml(config_dict))
        self.process = start_mailserv(["--config", str(config_file)], state_dir, 2)
        self.port = self.process.port("pop3")
        self.tls_port = self.process.port("pop3s")
        self.users = iter(range(USERS))

    def stop(self) -> None:
        self.process.stop()


class Site:
    """One user of a Server: deliver to its INBOX, log in as it."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.port = server.port
        self.tls_port = server.tls_port
        self.ca_file = server.ca_file
        self.config = server.config
        local = f"user{next(server.users)}"
        self.name = f"{local}@example.test"
        mailbox = self.config.store.path.format(domain="example.test", localpart=local)
        self.user = User(name=self.name, mailbox=mailbox, store_format=server.store_format)
        self.store = store_for(self.user, self.config.store)

    def deliver(self, *messages: bytes) -> None:
        for m in messages:
            self.store.deliver(self.user, io.BytesIO(m))

    def count(self) -> int:
        inbox = self.store.open(self.user).open_folder("INBOX")
        try:
            return len(inbox.messages())
        finally:
            inbox.close()

    def client(self) -> poplib.POP3:
        return poplib.POP3("127.0.0.1", self.port, timeout=60)

    def login(self) -> poplib.POP3:
        c = self.client()
        c.user(self.name)
        c.pass_(PASSWORD)
        return c

    def login_when_released(self) -> poplib.POP3:
        """Log in once the server has seen an earlier connection drop (it holds the lock)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                return self.login()
            except poplib.error_proto as exc:
                if b"IN-USE" not in exc.args[0] or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, test_ca: Any) -> Iterator[dict[str, Server]]:
    """One server per store format, started on first use, shared by the module's tests."""
    started: dict[str, Server] = {}

    class Lazy(dict[str, Server]):
        def __missing__(self, fmt: str) -> Server:
            server = Server(tmp_path_factory.mktemp(f"pop3-{fmt}"), test_ca, fmt)
            started[fmt] = self[fmt] = server
            return server

    try:
        yield Lazy()
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(params=FORMATS)
def site(request: Any, servers: dict[str, Server]) -> Site:
    return Site(servers[request.param])


@pytest.fixture(params=FORMATS)
def own_site(request: Any, tmp_path: Path, test_ca: Any) -> Iterator[Site]:
    """A site on a server of its own (for tests that leave auth penalties behind)."""
    server = Server(tmp_path, test_ca, request.param)
    try:
        yield Site(server)
    finally:
        server.stop()


def message(n: int, body: bytes = b"") -> bytes:
    return b"From: bob@example.test\r\nSubject: message %d\r\n\r\nbody %d\r\n%s" % (n, n, body)


def retrieved(lines: list[bytes]) -> bytes:
    """poplib gives the lines already un-stuffed and without CRLF."""
    return b"".join(line + b"\r\n" for line in lines)


def test_poplib_session(site: Site) -> None:
    msgs = [message(1), message(2, b".dot line\r\n..two dots\r\n.\r\n"), message(3)]
    site.deliver(*msgs)
    c = site.login()
    assert c.stat() == (3, sum(len(m) for m in msgs))
    _, listing, _ = c.list()
    assert [int(line.split()[1]) for line in listing] == [len(m) for m in msgs]
    _, uidls, _ = c.uidl()
    uids = [line.split()[1] for line in uidls]
    assert len(set(uids)) == 3
    assert retrieved(c.retr(2)[1]) == msgs[1]
    assert c.top(3, 0)[1] == [b"From: bob@example.test", b"Subject: message 3", b""]
    c.dele(1)
    with pytest.raises(poplib.error_proto, match=r"-ERR Message is deleted"):
        c.retr(1)
    assert site.count() == 3  # DELE only marks
    c.quit()
    assert site.count() == 2
    c = site.login()
    _, uidls2, _ = c.uidl()
    assert [line.split()[1] for line in uidls2] == uids[1:]  # stable across sessions
    c.quit()


def test_dropped_connection_deletes_nothing(site: Site) -> None:
    site.deliver(message(1), message(2))
    c = site.login()
    c.dele(1)
    c.dele(2)
    c.sock.shutdown(socket.SHUT_RDWR)  # no QUIT: the connection just drops
    c.close()
    c = site.login_when_released()
    assert c.stat()[0] == 2
    c.quit()
    assert site.count() == 2


def test_capa_and_stls(site: Site) -> None:
    c = site.client()
    caps = c.capa()
    assert "STLS" in caps and "PIPELINING" in caps and "USER" in caps
    # {PLAIN} secrets: every mechanism, strongest first, cleartext ones on loopback.
    assert caps["SASL"] == ["SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN"]
    c.stls(site.tls_context())
    caps = c.capa()
    assert "STLS" not in caps
    c.user(site.name)
    c.pass_(PASSWORD)
    assert c.stat() == (0, 0)
    c.quit()


def test_implicit_tls_and_apop(site: Site) -> None:
    site.deliver(message(1))
    c = poplib.POP3_SSL("127.0.0.1", site.tls_port, context=site.tls_context(), timeout=60)
    assert "STLS" not in c.capa()
    assert b"<" in c.getwelcome()  # {PLAIN} secrets: APOP is offered
    c.apop(site.name, PASSWORD)
    assert c.stat()[0] == 1
    c.quit()


def test_wrong_password(own_site: Site) -> None:
    c = own_site.client()
    c.user(own_site.name)
    with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[AUTH\] Authentication failed\.'$"):
        c.pass_("wrong")
    c.quit()


def test_in_use_across_sessions_and_processes(site: Site) -> None:
    first = site.login()
    second = site.client()
    second.user(site.name)
    with pytest.raises(poplib.error_proto, match=r"IN-USE"):
        second.pass_(PASSWORD)
    first.quit()
    second.quit()
    # Another process (this test) holds the maildrop: the server refuses too.
    lock = MaildropLock(lock_directory(site.config.state_dir), site.name)
    lock.acquire()
    try:
        third = site.client()
        third.user(site.name)
        with pytest.raises(poplib.error_proto, match=r"IN-USE"):
            third.pass_(PASSWORD)
        third.quit()
    finally:
        lock.release()
    site.login().quit()


@pytest.mark.slow
def test_poplib_1000_messages(site: Site) -> None:
    msgs = [message(n, (b"x" * 78 + b"\r\n") * 50) for n in range(1000)]  # ~4 KiB each
    site.deliver(*msgs)
    c = site.login()
    assert c.stat() == (1000, sum(len(m) for m in msgs))
    digests = set()
    for n in range(1, 1001):
        digests.add(hashlib.sha256(retrieved(c.retr(n)[1])).digest())
        c.dele(n)
    c.quit()
    assert digests == {hashlib.sha256(m).digest() for m in msgs}
    assert site.count() == 0


@pytest.mark.slow
def test_poplib_20_megabyte_message(site: Site) -> None:
    # "." lines at and around the 16 KiB and 64 KiB chunk boundaries of the stream.
    line = b"y" * 98 + b"\r\n"
    body = bytearray()
    while len(body) < 20 * 1024 * 1024:
        body += line
        if len(body) % 16384 < 100:
            body += b".\r\n"
    big = message(1, bytes(body))
    site.deliver(big)
    c = site.login()
    assert c.list(1).split()[2] == str(len(big)).encode()
    assert retrieved(c.retr(1)[1]) == big
    c.quit()
    # The same through implicit TLS (the stream's back-pressure through the TLS layer).
    c = poplib.POP3_SSL("127.0.0.1", site.tls_port, context=site.tls_context(), timeout=60)
    c.user(site.name)
    c.pass_(PASSWORD)
    assert retrieved(c.retr(1)[1]) == big
    c.quit()


def prepare(site: Site, tmp_path: Path, msgs: list[bytes]) -> Path:
    """Deliver ``msgs``; return the directory the client program writes them to."""
    site.deliver(*msgs)
    out = tmp_path / "fetched"
    out.mkdir()
    return out


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, **kw)


@pytest.mark.parametrize("mode", ["apop", "stls"])
def test_fetchmail(site: Site, tmp_path: Path, require_program: Any, mode: str) -> None:
    fetchmail = require_program("fetchmail")
    msgs = [message(1), message(2, b".\r\n")]
    out = prepare(site, tmp_path, msgs)
    if mode == "apop":
        protocol = "APOP"
        tls = "sslproto ''"
    else:
        protocol = "POP3"
        tls = f"sslproto 'TLS1.2+' sslcertck sslcertfile '{site.ca_file}' sslcommonname localhost"
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        "set no bouncemail\n"
        f"poll 127.0.0.1 service {site.port} protocol {protocol} uidl\n"
        f'  user "{site.name}" password "{PASSWORD}" is "alice" here\n'
        f"  {tls} no keep\n"
        f"  mda \"/bin/sh -c 'cat > {out}/msg.$$'\"\n"
    )
    rc.chmod(0o600)
    result = run(
        [fetchmail, "-f", str(rc), "-N", "--nosyslog", "-v", "-i", str(tmp_path / "ids")],
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    if mode == "stls":
        assert "STLS" in result.stdout + result.stderr
    got = sorted(
        p.read_bytes().replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n") for p in out.iterdir()
    )
    assert len(got) == 2
    for m in msgs:
        assert any(g.endswith(m) for g in got), got
    assert site.count() == 0


@pytest.mark.parametrize("secure", [False, True])
def test_getmail6(site: Site, tmp_path: Path, require_program: Any, secure: bool) -> None:
    getmail = require_program("getmail")
    msgs = [message(1), message(2, b"..x\r\n")]
    dest = prepare(site, tmp_path, msgs)
    retriever = (
        f"type = SimplePOP3SSLRetriever\nport = {site.tls_port}\nca_certs = {site.ca_file}\n"
        if secure
        else f"type = SimplePOP3Retriever\nport = {site.port}\n"
    )
    rc = tmp_path / "getmailrc"
    rc.write_text(
        "[retriever]\n"
        f"{retriever}server = 127.0.0.1\nusername = {site.name}\npassword = {PASSWORD}\n"
        # An external MDA: getmail's own maildir delivery refuses to run as root.
        "[destination]\ntype = MDA_external\npath = /bin/sh\nallow_root_commands = true\n"
        f'arguments = ("-c", "cat > {dest}/msg.$$")\n'
        "[options]\ndelete = true\nread_all = true\n"
    )
    result = run([getmail, f"--rcfile={rc}", f"--getmaildir={tmp_path}"])
    assert result.returncode == 0, result.stdout + result.stderr
    got = [p.read_bytes().replace(b"\r\n", b"\n") for p in dest.iterdir()]
    assert len(got) == 2
    for m in msgs:
        assert any(g.endswith(m.replace(b"\r\n", b"\n")) for g in got), got
    assert site.count() == 0


def test_concurrent_users_do_not_block_each_other(site: Site) -> None:
    site.deliver(message(1))
    errors: list[BaseException] = []

    def session() -> None:
        try:
            c = site.client()
            c.capa()
            c.quit()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=session) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


def _sasl_session(site: Site) -> tuple[socket.socket, Any]:
    sock = socket.create_connection(("127.0.0.1", site.port), timeout=30)
    f = sock.makefile("rb")
    assert f.readline().startswith(b"+OK")
    return sock, f


def test_auth_cram_md5(site: Site) -> None:
    sock, f = _sasl_session(site)
    with sock:
        sock.sendall(b"AUTH CRAM-MD5\r\n")
        line = f.readline()
        assert line.startswith(b"+ ")
        challenge = base64.b64decode(line[2:].strip())
        digest = hmac.new(PASSWORD.encode(), challenge, "md5").hexdigest()
        sock.sendall(base64.b64encode(f"{site.name} {digest}".encode()) + b"\r\n")
        assert f.readline().startswith(b"+OK Logged in")
        sock.sendall(b"QUIT\r\n")
        assert f.readline().startswith(b"+OK")


def test_auth_scram_sha_256(site: Site) -> None:
    """RFC 5802/7677 through POP3 AUTH (RFC 5034): two challenges, then the server's proof."""
    sock, f = _sasl_session(site)
    with sock:
        nonce = base64.b64encode(os.urandom(18)).decode()
        first_bare = f"n={site.name},r={nonce}"
        sock.sendall(
            b"AUTH SCRAM-SHA-256 " + base64.b64encode(b"n,," + first_bare.encode()) + b"\r\n"
        )
        line = f.readline()
        assert line.startswith(b"+ ")
        server_first = base64.b64decode(line[2:].strip()).decode()
        attrs = dict(part.split("=", 1) for part in server_first.split(","))
        assert attrs["r"].startswith(nonce)
        salted = hashlib.pbkdf2_hmac(
            "sha256", PASSWORD.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
        )
        client_key = hmac.new(salted, b"Client Key", "sha256").digest()
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={attrs['r']}"
        auth_message = f"{first_bare},{server_first},{without_proof}".encode()
        signature = hmac.new(stored_key, auth_message, "sha256").digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        final = f"{without_proof},p={base64.b64encode(proof).decode()}"
        sock.sendall(base64.b64encode(final.encode()) + b"\r\n")
        line = f.readline()
        assert line.startswith(b"+ ")
        server_key = hmac.new(salted, b"Server Key", "sha256").digest()
        expected = hmac.new(server_key, auth_message, "sha256").digest()
        assert base64.b64decode(line[2:].strip()) == b"v=" + base64.b64encode(expected)
        sock.sendall(b"\r\n")
        assert f.readline().startswith(b"+OK Logged in")
        sock.sendall(b"QUIT\r\n")
        assert f.readline().startswith(b"+OK")


def test_mail_arriving_between_polls_is_seen(site: Site) -> None:
    site.deliver(message(1))
    c = site.login()
    assert c.stat()[0] == 1
    c.dele(1)
    c.quit()
    site.deliver(message(2), message(3))  # another process delivers between two polls
    c = site.login()
    assert c.stat()[0] == 2
    assert retrieved(c.retr(2)[1]) == message(3)
    c.quit()
