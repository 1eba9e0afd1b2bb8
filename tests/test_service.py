"""MailService: listeners from endpoint strings, implicit TLS, PROXY trust, drain, reload."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task

from mailserv.config import from_dict
from mailserv.errors import ConfigError
from mailserv.net import EagerServer
from mailserv.service import PROTOCOLS, MailService
from tests.support.process import test_config


@pytest.fixture
def echo_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PROTOCOLS, "smtp", "tests.support.echo_protocol")


def build(state_dir: Path, listeners: dict[str, dict[str, Any]], **extra: Any) -> MailService:
    from twisted.internet import reactor

    config = from_dict(test_config(state_dir, listeners, **extra), "test.toml", str(state_dir))
    return MailService.from_config(config, reactor)


def blocking(fn: Any, *args: Any) -> defer.Deferred[Any]:
    """Run blocking client code in a thread so the reactor keeps serving."""
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThread

    assert reactor.running
    return deferToThread(fn, *args)


def talk(port: int, send: bytes = b"", tls: bool = False, ca: str | None = None) -> bytes:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock: socket.socket = raw
    if tls:
        context = ssl.create_default_context(cafile=ca)
        sock = context.wrap_socket(raw, server_hostname="mail.example.test")
    if send:
        sock.sendall(send)
    data = b""
    try:
        while b"\n" not in data or (send and data.count(b"\n") < 2):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    sock.close()
    return data


def port_of(service: MailService, label: str) -> int:
    svc = next(s for s in service.listener_services if s.label == label)
    return svc.port.getHost().port


@pytest_twisted.inlineCallbacks
def test_listener_binds_and_serves(state_dir: Path, echo_protocol: None) -> Any:
    service = build(state_dir, {"mx": {"tls": "none"}})
    service.startService()
    try:
        data = yield blocking(talk, port_of(service, "mx"), b"ping\r\n")
        assert data.startswith(b"hello 127.0.0.1:") and b"tls=False" in data
        assert data.endswith(b"ping\r\n")
        svc = next(s for s in service.listener_services if s.label == "mx")
        assert svc.port.transport is EagerServer
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_implicit_tls_with_configured_certificate(
    state_dir: Path, echo_protocol: None, test_ca: Any
) -> Any:
    service = build(
        state_dir, {"mx": {"tls": "implicit"}}, tls=(test_ca.cert_file, test_ca.key_file)
    )
    service.startService()
    try:
        data = yield blocking(talk, port_of(service, "mx"), b"", True, test_ca.ca_file)
        assert b"tls=True" in data
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_starttls_uses_the_service_context(
    state_dir: Path, echo_protocol: None, test_ca: Any
) -> Any:
    service = build(
        state_dir, {"mx": {"tls": "starttls"}}, tls=(test_ca.cert_file, test_ca.key_file)
    )
    service.startService()

    def client(port: int) -> bytes:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b"STARTTLS\r\n")
        assert f.readline() == b"go ahead\r\n"
        context = ssl.create_default_context(cafile=test_ca.ca_file)
        tls = context.wrap_socket(sock, server_hostname="mail.example.test")
        tls.sendall(b"secret\r\n")
        data = tls.recv(100)
        tls.close()
        return data

    try:
        assert (yield blocking(client, port_of(service, "mx"))) == b"secret\r\n"
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_self_signed_certificate_is_created_once(state_dir: Path, echo_protocol: None) -> Any:
    service = build(state_dir, {"mx": {"tls": "implicit"}})
    cert = state_dir / "tls" / "selfsigned.crt"
    key = state_dir / "tls" / "selfsigned.key"
    assert cert.exists() and key.exists()
    assert key.stat().st_mode & 0o777 == 0o600
    first = cert.read_bytes()
    service.startService()
    try:
        data = yield blocking(talk, port_of(service, "mx"), b"", True, str(cert))
        assert b"tls=True" in data
    finally:
        yield service.stopService()
    build(state_dir, {"mx": {"tls": "implicit"}})
    assert cert.read_bytes() == first


def _proxy_v2(source: str, port: int) -> bytes:
    """A PROXY v2 header (TCP over IPv4) for ``source:port`` → 127.0.0.1:25."""
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    addresses = socket.inet_aton(source) + socket.inet_aton("127.0.0.1")
    ports = port.to_bytes(2, "big") + (25).to_bytes(2, "big")
    return signature + b"\x21\x11" + (12).to_bytes(2, "big") + addresses + ports


@pytest.mark.parametrize(
    ("trusted", "sent", "expected"),
    [
        # v1 from a trusted proxy: the client is the one in the header
        ("127.0.0.1/32", b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n", b"hello 192.0.2.7:40000 "),
        # v2 is understood too
        ("127.0.0.0/8", _proxy_v2("198.51.100.9", 5555), b"hello 198.51.100.9:5555 "),
        # from an untrusted address: refused before a byte is read or written
        ("127.0.0.2/32", b"PROXY TCP4 192.0.2.7 127.0.0.1 1 25\r\n", b""),
        # a trusted proxy that sends no header: dropped, and no greeting went out first
        ("127.0.0.1/32", b"EHLO spoofer\r\n", b""),
    ],
)
@pytest_twisted.inlineCallbacks
def test_proxy_protocol(
    state_dir: Path, echo_protocol: None, trusted: str, sent: bytes, expected: bytes
) -> Any:
    listener = {"tls": "none", "proxy_protocol": True, "trusted_proxies": [trusted]}
    service = build(state_dir, {"mx": listener})
    service.startService()
    try:
        data = yield blocking(talk, port_of(service, "mx"), sent)
        assert data.startswith(expected) if expected else data == b""
    finally:
        yield service.stopService()


def test_bad_certificate_file_is_a_config_error(state_dir: Path, echo_protocol: None) -> None:
    (state_dir / "c.pem").write_text("not a certificate")
    (state_dir / "k.pem").write_text("not a key")
    with pytest.raises(ConfigError) as info:
        build(state_dir, {"mx": {}}, tls=(str(state_dir / "c.pem"), str(state_dir / "k.pem")))
    keys = [p.key for p in info.value.problems]
    assert keys == ["tls.cert_file", "tls.key_file"]


def test_bad_endpoint_is_a_config_error_before_listening(
    state_dir: Path, echo_protocol: None
) -> None:
    with pytest.raises(ConfigError) as info:
        build(state_dir, {"mx": {"endpoints": ["tcp:25:bogus=1"]}})
    assert info.value.problems[0].key == "listeners.mx.endpoints[0]"


@pytest_twisted.inlineCallbacks
def test_stop_drains_then_aborts_after_deadline(state_dir: Path, echo_protocol: None) -> Any:
    from twisted.internet import reactor

    service = build(state_dir, {"mx": {"tls": "none"}}, shutdown_timeout="1s")
    service.startService()
    port = port_of(service, "mx")
    sock = yield blocking(socket.create_connection, ("127.0.0.1", port), 5)
    yield task.deferLater(reactor, 0.2, lambda: None)
    tracker = service.trackers[0]
    assert len(tracker.active) == 1
    # Echo has no drain(): the tracker closes it at once, and stop completes.
    started = reactor.seconds()
    yield service.stopService()
    assert reactor.seconds() - started < 1.5
    assert not tracker.active
    sock.close()


@pytest_twisted.inlineCallbacks
def test_reload_swaps_certificate_and_keeps_listening(
    state_dir: Path, echo_protocol: None, test_ca: Any
) -> Any:
    cert, key = test_ca.issue("one.example.test")
    service = build(state_dir, {"mx": {"tls": "implicit"}}, tls=(cert, key))
    service.startService()
    try:
        port = port_of(service, "mx")
        cert2, key2 = test_ca.issue("two.example.test")
        new = from_dict(
            test_config(
                state_dir, {"mx": {"tls": "implicit"}}, tls=(cert2, key2), domains=("new.test",)
            ),
            "test.toml",
            str(state_dir),
        )
        service.reload(new)
        assert service.config.domains == ["new.test"]

        def names(port: int) -> str:
            context = ssl.create_default_context(cafile=test_ca.ca_file)
            context.check_hostname = False
            with context.wrap_socket(socket.create_connection(("127.0.0.1", port), 5)) as s:
                return dict(x[0] for x in s.getpeercert()["subject"])["commonName"]

        assert (yield blocking(names, port)) == "two.example.test"
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_thread_pools_refuse_work_after_stop(state_dir: Path) -> Any:
    from twisted.internet import reactor

    from mailserv.threads import ThreadPools

    pools = ThreadPools(reactor, {"disk": 1})
    assert (yield pools.run("disk", lambda: 41 + 1)) == 42
    pools.stopService()
    with pytest.raises(RuntimeError, match="stopped"):
        yield pools.run("disk", lambda: 1)
    pools.stopService()  # idempotent: no AlreadyQuit


def test_service_shares_one_dns_resolver_and_reloads_it(
    state_dir: Path, echo_protocol: None
) -> None:
    service = build(state_dir, {"mx": {"tls": "none"}})
    assert service.dns is service.dns
    new = from_dict(
        test_config(state_dir, {"mx": {"tls": "none"}}, dns={"nameservers": ["127.0.0.1:5353"]}),
        "test.toml",
        str(state_dir),
    )
    service.reload(new)
    assert [ns.port for ns in service.dns.resolver.nameservers] == [5353]
    assert service.pop_before_smtp is None


def test_reload_reaches_the_listener_factories(state_dir: Path) -> None:
    """SIGHUP rebuilds an SMTP listener's filter pipeline (the factory is IReloadable)."""
    from twisted.internet import reactor

    listeners = {"mx": {"tls": "none", "pipeline": "inbound"}}
    one = [{"filter": "size", "max_size": 1000}]
    two = [{"filter": "size", "max_size": 2000}]
    config = from_dict(
        test_config(state_dir, listeners, pipelines={"inbound": one}), "t.toml", str(state_dir)
    )
    service = MailService.from_config(config, reactor)
    factory = service.trackers[0].wrapped
    assert factory in service._reloadables
    before = factory.context.chain
    new = from_dict(
        test_config(state_dir, listeners, pipelines={"inbound": two}), "t.toml", str(state_dir)
    )
    service.reload(new)
    assert factory.context.chain is not before


def test_reload_says_when_the_delivery_helper_count_needs_a_restart(state_dir: Path) -> None:
    from twisted.internet import reactor
    from twisted.logger import globalLogPublisher

    config = from_dict(test_config(state_dir, ["mx"]), "t.toml", str(state_dir))
    service = MailService.from_config(config, reactor)
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        seen.append(str(event.get("log_format", "")))

    globalLogPublisher.addObserver(observe)
    try:
        service.reload(from_dict(test_config(state_dir, ["mx"]), "t.toml", str(state_dir)))
        assert not any("[delivery] processes" in s for s in seen)
        more = test_config(state_dir, ["mx"], delivery={"processes": 4})
        service.reload(from_dict(more, "t.toml", str(state_dir)))
    finally:
        globalLogPublisher.removeObserver(observe)
    assert any("[delivery] processes" in s for s in seen)


@pytest_twisted.inlineCallbacks
def test_proxied_protocols_are_built_for_the_client_address(
    state_dir: Path, echo_protocol: None
) -> Any:
    """Per-IP limits in a protocol factory count the client, not the proxy."""
    listener = {"tls": "none", "proxy_protocol": True, "trusted_proxies": ["127.0.0.1/32"]}
    service = build(state_dir, {"mx": listener})
    factory = service.trackers[0].wrapped
    seen: list[str] = []
    original = factory.buildProtocol
    factory.buildProtocol = lambda addr: seen.append(addr.host) or original(addr)
    service.startService()
    try:
        header = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n"
        data = yield blocking(talk, port_of(service, "mx"), header)
        assert data.startswith(b"hello 192.0.2.7:40000 ")
        assert seen == ["192.0.2.7"]
    finally:
        yield service.stopService()


def _sni_config(state_dir: Path, test_ca: Any, mode: str = "implicit") -> Any:
    config = test_config(
        state_dir, {"mx": {"tls": mode}}, tls=(test_ca.cert_file, test_ca.key_file)
    )
    net = test_ca.issue("mail.example.net", "imap.example.net")
    wild = test_ca.issue("*.wild.test")
    config["tls"]["certificates"] = [
        {"cert_file": net[0], "key_file": net[1]},
        {"cert_file": wild[0], "key_file": wild[1]},
    ]
    return config


def _served_name(port: int, ca_file: str, server_name: str | None, starttls: bool = False) -> str:
    """The commonName of the certificate the server shows for ``server_name`` (SNI)."""
    context = ssl.create_default_context(cafile=ca_file)
    context.check_hostname = False
    raw = socket.create_connection(("127.0.0.1", port), 5)
    if starttls:
        f = raw.makefile("rb")
        f.readline()
        raw.sendall(b"STARTTLS\r\n")
        assert f.readline() == b"go ahead\r\n"
    with context.wrap_socket(raw, server_hostname=server_name) as s:
        return dict(x[0] for x in s.getpeercert()["subject"])["commonName"]


@pytest_twisted.inlineCallbacks
def test_sni_picks_the_certificate_that_serves_the_requested_name(
    state_dir: Path, echo_protocol: None, test_ca: Any
) -> Any:
    config = from_dict(_sni_config(state_dir, test_ca), "test.toml", str(state_dir))
    from twisted.internet import reactor

    service = MailService.from_config(config, reactor)
    service.startService()
    try:
        port = port_of(service, "mx")
        cases = {
            None: "mail.example.test",  # no SNI: the default certificate
            "unknown.example.org": "mail.example.test",
            "mail.example.net": "mail.example.net",
            "IMAP.Example.NET": "mail.example.net",  # names compare case-insensitively
            "mx1.wild.test": "*.wild.test",
            "a.b.wild.test": "mail.example.test",  # a wildcard covers one label only
        }
        for name, expected in cases.items():
            assert (yield blocking(_served_name, port, test_ca.ca_file, name)) == expected, name
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_sni_after_starttls(state_dir: Path, echo_protocol: None, test_ca: Any) -> Any:
    config = from_dict(_sni_config(state_dir, test_ca, "starttls"), "test.toml", str(state_dir))
    from twisted.internet import reactor

    service = MailService.from_config(config, reactor)
    service.startService()
    try:
        port = port_of(service, "mx")
        served = yield blocking(_served_name, port, test_ca.ca_file, "mail.example.net", True)
        assert served == "mail.example.net"
    finally:
        yield service.stopService()


def test_sni_certificate_problems_name_the_key_and_reload_keeps_the_old(
    state_dir: Path, echo_protocol: None, test_ca: Any, tmp_path: Path
) -> None:
    from twisted.internet import reactor

    bad = _sni_config(state_dir, test_ca)
    bad["tls"]["certificates"][1]["cert_file"] = str(tmp_path / "missing.crt")
    with pytest.raises(ConfigError) as info:
        MailService.from_config(from_dict(bad, "test.toml", str(state_dir)), reactor)
    assert "tls.certificates[1].cert_file" in str(info.value)
    assert "missing.crt" in str(info.value)

    good = from_dict(_sni_config(state_dir, test_ca), "test.toml", str(state_dir))
    service = MailService.from_config(good, reactor)
    before = service.tls_options().getContext()
    with pytest.raises(ConfigError):
        service.reload(from_dict(bad, "test.toml", str(state_dir)))
    tls = service.tls_options()
    assert tls.getContext() is before and len(tls.extra) == 2
    assert str(tmp_path / "missing.crt") not in [c for c, _ in tls.extra]


def test_sni_certificates_config_is_checked(state_dir: Path) -> None:
    config = test_config(state_dir)
    config["tls"] = {"certificates": [{"cert_file": "a.crt"}]}
    with pytest.raises(ConfigError, match=r"tls\.certificates\[0\]\.key_file"):
        from_dict(config, "/etc/mailserv/mailserv.toml", str(state_dir))
    config["tls"] = {"certificates": [{"cert_file": "a.crt", "key_file": "a.key"}]}
    loaded = from_dict(config, "/etc/mailserv/mailserv.toml", "/etc/mailserv")
    assert loaded.tls.certificates[0].cert_file == "/etc/mailserv/a.crt"


def test_the_daemon_sets_the_gil_switch_interval_from_the_config(state_dir: Path) -> None:
    import sys

    assert build(state_dir, {"mx": {}}).config.threads.switch_interval == 0.0005
    service = build(state_dir, {"mx": {}}, threads={"switch_interval": "2ms"})
    before = sys.getswitchinterval()
    try:
        service.tune_process()
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        sys.setswitchinterval(before)
    with pytest.raises(ConfigError, match=r"threads\.switch_interval"):
        build(state_dir, {"mx": {}}, threads={"switch_interval": "0s"})
