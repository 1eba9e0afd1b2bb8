"""The configuration schema: validation, defaults, and errors that name file, key and problem."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailserv.config import ConfigError, default_config, load_config, parse_config, parse_size
from mailserv.config.schema import Invalid, parse_duration

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """
config_version = 1
hostname = "mail.example.test"
domains = ["example.test"]
state_dir = "state"
[store]
path = "/var/mail/{domain}/{localpart}/Maildir"
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "f.toml", "/etc/mailserv")
    return [str(p) for p in info.value.problems]


def test_minimal_config_gets_defaults() -> None:
    config = parse_config(MINIMAL, "f.toml", "/etc/mailserv")
    assert config.hostname == "mail.example.test"
    assert config.domains == ["example.test"]
    assert config.state_dir == "/etc/mailserv/state"
    assert config.listeners == {}
    assert config.store.format == "maildir"
    assert config.store.quota == 51_200_000
    assert config.shutdown_timeout == 30.0
    assert config.tls.cert_file is None
    assert config.dns.nameservers == []
    assert config.threads.disk == 10


def test_reference_config_loads() -> None:
    config = load_config(str(REPO / "etc" / "mailserv.toml"))
    assert set(config.listeners) == {
        "mx",
        "submission",
        "submissions",
        "imap",
        "imaps",
        "pop3",
        "pop3s",
    }
    assert config.listeners["imaps"].tls == "implicit"
    assert config.listeners["mx"].endpoints == ["tcp:25", "tcp6:25"]
    assert config.auth.backends == ["local"]
    assert config.auth.backend["local"].type == "passwd-file"
    assert config.store.quota == 50 * 1024 * 1024


def test_three_mistakes_are_all_reported_with_their_keys() -> None:
    text = (
        MINIMAL
        + """
[listeners.imap]
protocol = "imap"
endpoints = ["tcp:143"]
tls = "yes"
[dns]
timeout = "soon"
[auth]
backend.local = { type = "passwd-file", pathh = "/x" }
"""
    )
    found = problems(text)
    assert (
        "f.toml: listeners.imap.tls: expected one of none, starttls, implicit, got 'yes'" in found
    )
    assert any(p.startswith("f.toml: dns.timeout: expected a duration") for p in found)
    assert "f.toml: auth.backend.local.pathh: unknown key (did you mean 'path'?)" in found
    assert "f.toml: auth.backend.local.path: is required" in found
    assert len(found) == 4


def test_unknown_top_level_key_gets_did_you_mean() -> None:
    assert "f.toml: hostnme: unknown key (did you mean 'hostname'?)" in problems(
        'hostnme = "x"\n' + MINIMAL
    )


def test_required_keys() -> None:
    found = problems("config_version = 1\n")
    assert "f.toml: hostname: is required" in found
    assert "f.toml: domains: is required" in found
    assert "f.toml: state_dir: is required" in found
    assert "f.toml: store: is required" in found


def test_config_version_must_be_1() -> None:
    assert "f.toml: config_version: must be at most 1, got 2" in problems(
        MINIMAL.replace("config_version = 1", "config_version = 2")
    )


def test_toml_syntax_error_names_the_file() -> None:
    found = problems("hostname = \n")
    assert len(found) == 1 and found[0].startswith("f.toml: TOML syntax error")


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("tcp:abc", "bad port 'abc'"),
        ("ssl:993", 'use tls = "implicit"'),
        ("udp:25", "expected an endpoint"),
        ("tcp:99999", "bad port"),
    ],
)
def test_bad_endpoints(endpoint: str, message: str) -> None:
    text = MINIMAL + f'[listeners.x]\nprotocol = "smtp"\nendpoints = ["{endpoint}"]\n'
    found = problems(text)
    assert len(found) == 1 and "listeners.x.endpoints[0]" in found[0] and message in found[0]


def test_endpoint_with_escaped_interface_is_valid() -> None:
    text = (
        MINIMAL
        + '[listeners.x]\nprotocol = "smtp"\nendpoints = ["tcp6:25:interface=\\\\:\\\\:1"]\n'
    )
    config = parse_config(text, "f.toml", "/")
    assert config.listeners["x"].endpoints == ["tcp6:25:interface=\\:\\:1"]


def test_proxy_protocol_needs_trusted_proxies() -> None:
    text = MINIMAL + '[listeners.x]\nprotocol="smtp"\nendpoints=["tcp:25"]\nproxy_protocol=true\n'
    assert problems(text) == [
        "f.toml: listeners.x.trusted_proxies: proxy_protocol = true needs trusted proxies"
    ]
    ok = parse_config(text + 'trusted_proxies = ["127.0.0.1/8", "::1"]\n', "f.toml", "/")
    assert [str(n) for n in ok.listeners["x"].trusted_proxies] == ["127.0.0.0/8", "::1/128"]


def test_auth_backends_must_name_tables() -> None:
    text = MINIMAL + '[auth]\nbackends = ["ldap1"]\n'
    assert problems(text) == ["f.toml: auth.backends[0]: no [auth.backend.ldap1] table"]


def test_unknown_backend_type() -> None:
    text = MINIMAL + '[auth.backend.x]\ntype = "kerberos"\n'
    assert problems(text) == [
        "f.toml: auth.backend.x.type: expected one of ldap, pam, passwd-file, sql, got 'kerberos'"
    ]


def test_store_path_must_be_per_user() -> None:
    text = MINIMAL.replace("/var/mail/{domain}/{localpart}/Maildir", "/var/mail/all")
    assert problems(text) == ["f.toml: store.path: must contain {localpart}, {user} or {home}"]


def test_pipeline_reference_must_exist() -> None:
    text = MINIMAL + '[listeners.x]\nprotocol="smtp"\nendpoints=["tcp:25"]\npipeline="inbound"\n'
    assert problems(text) == ["f.toml: listeners.x.pipeline: no [[pipelines.inbound]] defined"]
    ok = parse_config(
        text + '[[pipelines.inbound]]\nfilter = "dnsbl"\nzones = ["z.test"]\n', "f", "/"
    )
    entry = ok.pipelines["inbound"][0]
    assert entry.filter == "dnsbl" and entry.options == {"zones": ["z.test"]}


def test_domains_are_normalised_to_lowercase_a_labels() -> None:
    text = MINIMAL.replace(
        'domains = ["example.test"]', 'domains = ["Example.TEST.", "bücher.test"]'
    )
    assert parse_config(text, "f", "/").domains == ["example.test", "xn--bcher-kva.test"]


def test_bad_domain_is_reported() -> None:
    text = MINIMAL.replace('domains = ["example.test"]', 'domains = ["ex ample.test"]')
    assert problems(text) == ["f.toml: domains[0]: not a valid domain name: 'ex ample.test'"]


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "mailserv.toml"
    path.parent.mkdir()
    path.write_text(
        MINIMAL + '[tls]\ncert_file = "tls/c.pem"\nkey_file = "tls/k.pem"\n'
        '[auth.backend.local]\ntype = "passwd-file"\npath = "users"\n'
    )
    config = load_config(str(path))
    assert config.tls.cert_file == str(tmp_path / "conf" / "tls" / "c.pem")
    assert config.auth.backend["local"].path == str(tmp_path / "conf" / "users")
    assert config.state_dir == str(tmp_path / "conf" / "state")


def test_tls_needs_both_files() -> None:
    assert problems(MINIMAL + '[tls]\ncert_file = "c.pem"\n') == [
        "f.toml: tls: set both cert_file and key_file, or neither"
    ]


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "nope.toml"))
    assert "cannot read" in str(info.value)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h", 3600), ("5d", 432000), ("250ms", 0.25), (7, 7), ("10", 10)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5s", -1, True, "5x"])
def test_bad_durations(text: object) -> None:
    with pytest.raises(Invalid):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("50M", 52428800),
        ("10K", 10240),
        ("1G", 1073741824),
        (10240000, 10240000),
        ("100", 100),
        ("2MiB", 2097152),
        ("1.5k", 1536),
    ],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["big", "-1", True, "5X"])
def test_bad_sizes(text: object) -> None:
    with pytest.raises(Invalid):
        parse_size(text)


def test_embedded_default_not_root(tmp_path: Path) -> None:
    config = default_config(home=str(tmp_path / "var"), root=False)
    ports = {name: lst.endpoints for name, lst in config.listeners.items()}
    assert ports == {
        "mx": ["tcp:2525:interface=127.0.0.1"],
        "submission": ["tcp:2587:interface=127.0.0.1"],
        "submissions": ["tcp:2465:interface=127.0.0.1"],
        "imap": ["tcp:2143:interface=127.0.0.1"],
        "imaps": ["tcp:2993:interface=127.0.0.1"],
        "pop3": ["tcp:2110:interface=127.0.0.1"],
        "pop3s": ["tcp:2995:interface=127.0.0.1"],
    }
    assert config.listeners["imaps"].tls == "implicit"
    assert config.listeners["submissions"].tls == "implicit"
    assert config.domains == ["localhost"]
    assert config.state_dir == str(tmp_path / "var")
    assert config.auth.backend["local"].path == str(tmp_path / "var" / "users.passwd")


def test_embedded_default_as_root_uses_standard_ports(tmp_path: Path) -> None:
    config = default_config(domain="example.org", home=str(tmp_path), root=True)
    ports = sorted(int(lst.endpoints[0].split(":")[1]) for lst in config.listeners.values())
    assert ports == [25, 110, 143, 465, 587, 993, 995]
    assert config.domains == ["example.org"] and config.hostname == "example.org"


def test_embedded_default_home_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILSERV_HOME", str(tmp_path / "h"))
    assert default_config(root=False).state_dir == str(tmp_path / "h")
    monkeypatch.delenv("MAILSERV_HOME")
    monkeypatch.chdir(tmp_path)
    assert default_config(root=False).state_dir == os.path.join(str(tmp_path), "var")


def test_embedded_default_on_ipv6_interface(tmp_path: Path) -> None:
    config = default_config(home=str(tmp_path), interface="::1", root=False)
    assert config.listeners["mx"].endpoints == ["tcp6:2525:interface=\\:\\:1"]


def test_reference_config_with_every_commented_key_enabled(tmp_path: Path) -> None:
    """Every commented-out key of etc/mailserv.toml is a real key with a valid value."""
    import re

    text = (REPO / "etc" / "mailserv.toml").read_text()
    enabled = re.sub(r"(?m)^# (\[\[?[a-z_.]+\]\]?|[a-z_]+ = .*)$", r"\1", text)
    assert enabled != text
    config = parse_config(enabled, "etc/mailserv.toml", str(tmp_path))
    assert set(config.auth.backend) >= {"local", "db", "corp", "system"}
    assert config.tls.cert_file == "/etc/mailserv/tls/fullchain.pem"
    assert config.tls.certificates[0].key_file == "/etc/mailserv/tls/example.net.key"
    assert config.listeners["metrics"].protocol == "metrics"
    assert [e.filter for e in config.pipelines["inbound"]][:3] == ["headers", "dnsbl", "spf"]
