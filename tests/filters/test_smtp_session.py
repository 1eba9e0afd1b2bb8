"""Every filter through a real SMTP session on the MX listener of ``twistd mailserv``.

One server runs the whole inbound pipeline for the module; each test connects
through the PROXY protocol (v1) from its own simulated client address, so that
DNSBL, SPF, greylisting, rate limits, traps and the tarpit see that address.
DNS is the loopback server of tests/support/dnsserver.py.
"""

from __future__ import annotations

import ipaddress
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import pytest

from mailserv.auth import schemes
from tests.conftest import DNSServer, MailservRunner
from tests.filters.conftest import crlf
from tests.support.process import test_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# 2001:db8::dead, reversed in nibbles (RFC 5782 §2.4).
V6_LISTED = ".".join(reversed(ipaddress.ip_address("2001:db8::dead").exploded.replace(":", "")))
TRUSTED = ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"]
PIPELINE: list[dict[str, Any]] = [
    {
        "filter": "spamtrap",
        "addresses": ["trap@example.test", "@spamtrap.test"],
        "block_for": "1h",
    },
    {"filter": "tarpit", "networks": ["203.0.113.0/24"], "delay": "1s"},
    {"filter": "dnsbl", "zones": ["zen.dnsbl.test"]},
    {"filter": "ratelimit", "limits": [{"by": "client", "messages": 2, "interval": "1h"}]},
    {"filter": "greylist", "delay": "2s", "allowlist": TRUSTED},
    {"filter": "spf"},
    {"filter": "headers"},
    {"filter": "dkim"},
    {"filter": "arc"},
    {"filter": "dmarc"},
    {"filter": "uribl", "zones": ["uribl.test"], "action": "quarantine"},
    {
        "filter": "rules",
        "body_checks": [
            "/^FORBIDDEN/ REJECT Forbidden content",
            "/^DROPME/ DISCARD dropped by rule",
            "/^HOLDME/ HOLD held by rule",
        ],
    },
    {"filter": "authresults"},
]


class MX:
    def __init__(self, port: int, state: Path, keys: Any) -> None:
        self.port = port
        self.state = state
        self.keys = keys

    def connect(self, client_ip: str) -> tuple[smtplib.SMTP, int, bytes]:
        """An smtplib client whose connection claims ``client_ip`` in a PROXY v1 header."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=15)
        if ":" in client_ip:
            header = f"PROXY TCP6 {client_ip} ::1 40000 25\r\n"
        else:
            header = f"PROXY TCP4 {client_ip} 127.0.0.1 40000 25\r\n"
        sock.sendall(header.encode())
        client = smtplib.SMTP(timeout=15)
        client.sock = sock
        client._host = "127.0.0.1"  # type: ignore[attr-defined]
        code, text = client.getreply()
        return client, code, text

    def session(self, client_ip: str, helo: str = "client.example") -> smtplib.SMTP:
        client, code, _ = self.connect(client_ip)
        assert code == 220
        assert client.ehlo(helo)[0] == 250
        return client

    def mailbox(self, local: str, folder: str = "") -> list[bytes]:
        base = self.state / "mail" / "example.test" / local / "Maildir"
        if folder:
            base = base / f".{folder}"
        out = []
        for sub in ("new", "cur"):
            if (base / sub).is_dir():
                out += [p.read_bytes() for p in sorted((base / sub).iterdir())]
        return out


def message(from_addr: str, body: str = "Hello Bob.\n", extra: str = "") -> bytes:
    return crlf(
        f"{extra}From: {from_addr}\n"
        "To: bob@example.test\n"
        "Subject: hello\n"
        "Date: Wed, 25 Nov 2026 10:00:00 +0000\n"
        f"Message-ID: <{time.monotonic_ns()}@sender.test>\n"
        "\n" + body
    )


@pytest.fixture(scope="module")
def mx(tmp_path_factory: pytest.TempPathFactory, dkim_keys: Any) -> Iterator[MX]:
    base = tmp_path_factory.mktemp("mx")
    dns = DNSServer(base)
    dns.set(
        {
            "2.2.0.192.zen.dnsbl.test": {"A": ["127.0.0.2"], "TXT": ["listed for testing"]},
            V6_LISTED + ".zen.dnsbl.test": {"A": ["127.0.0.4"]},
            "sender.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 ip4:198.51.100.0/24 -all"]},
            "spffail.test": {"TXT": ["v=spf1 -all"]},
            "_dmarc.sender.test": {"TXT": ["v=DMARC1; p=reject"]},
            "_dmarc.bank.test": {"TXT": ["v=DMARC1; p=reject"]},
            "evil-link.test.uribl.test": {"A": ["127.0.0.2"]},
            **dkim_keys.records("sender.test"),
            **dkim_keys.records("relay.test"),
        }
    )
    state = base / "state"
    state.mkdir()
    secret = schemes.hash_password("pw", "PLAIN")
    # The trap address is no user: the spamtrap sees RCPT before the recipient check.
    (state / "users.passwd").write_text(f"bob@example.test:{secret}::::::\n")
    config = test_config(
        state,
        {
            "mx": {
                "proxy_protocol": True,
                "trusted_proxies": ["127.0.0.1/32"],
                "pipeline": "inbound",
            }
        },
        dns={"nameservers": [dns.address], "timeout": "2s"},
        pipelines={"inbound": PIPELINE},
    )
    runner = MailservRunner(base)
    try:
        proc = runner.start(config, timeout=60)
        yield MX(proc.port("mx"), state, dkim_keys)
    finally:
        runner.stop_all()
        dns.stop()


def test_delivery_carries_every_result_and_drops_forged_ones(mx: MX) -> None:
    forged = "Authentication-Results: mail.example.test; dmarc=pass header.from=bank.test\n"
    raw = mx.keys.sign(message("Alice <alice@sender.test>"), "sender.test", "ed25519")
    raw = crlf(forged) + raw
    before = len(mx.mailbox("bob"))
    with mx.session("192.0.2.10") as s:
        assert s.mail("alice@sender.test")[0] == 250
        assert s.rcpt("bob@example.test")[0] == 250
        assert s.data(raw)[0] == 250
    [stored] = mx.mailbox("bob")[before:]
    head = stored.split(b"\r\n\r\n", 1)[0].decode()
    assert "Received-SPF: Pass (mail.example.test: domain of sender.test" in head
    ar = [line for line in head.split("\r\nAuthentication-Results: ")[1:]]
    assert len(ar) == 1, head  # ours only: the forged one claiming our authserv-id is gone
    ours = ar[0].split("\r\n", 1)[0] + ar[0]
    assert ours.startswith("mail.example.test;")
    for expected in (
        "spf=pass (sender SPF authorized) smtp.mailfrom=sender.test",
        "dkim=pass (ed25519 key) header.d=sender.test",
        "dmarc=pass (p=reject sp=reject dis=none) header.from=sender.test",
        "arc=none",
    ):
        assert expected in ours


def test_dnsbl_listed_client_refused_at_rcpt(mx: MX) -> None:
    with mx.session("192.0.2.2") as s:
        assert s.mail("alice@sender.test")[0] == 250
        code, text = s.rcpt("bob@example.test")
        assert code == 554
        assert text == (
            b"5.7.1 Client host [192.0.2.2] blocked using zen.dnsbl.test; listed for testing"
        )
        assert s.rcpt("postmaster@example.test")[0] == 250


def test_dnsbl_ipv6_client(mx: MX) -> None:
    with mx.session("2001:db8::dead") as s:
        assert s.mail("x@nospf.test")[0] == 250
        code, text = s.rcpt("bob@example.test")
        assert (code, text) == (
            554,
            b"5.7.1 Client host [2001:db8::dead] blocked using zen.dnsbl.test",
        )
    with mx.session("2001:db8::beef") as s:
        assert s.mail("x@nospf.test")[0] == 250
        assert s.rcpt("bob@example.test")[0] == 250


def test_spf_fail_refused_at_mail(mx: MX) -> None:
    with mx.session("198.51.100.20") as s:
        code, text = s.mail("someone@spffail.test")
        assert code == 550 and text.startswith(b"5.7.23 SPF validation failed")


def test_dmarc_reject_and_header_rules_after_data(mx: MX) -> None:
    cases = [
        (message("Bank <ceo@bank.test>"), 550, b"5.7.1 Rejected by DMARC policy of bank.test"),
        (message("a@sender.test").replace(b"From: a@sender.test\r\n", b""), 550, b"5.6.0"),
        (message("a@sender.test", "FORBIDDEN words\n"), 550, b"5.7.1 Forbidden content"),
    ]
    for i, (raw, code, text) in enumerate(cases):
        with mx.session(f"198.51.100.{30 + i}") as s:
            assert s.mail("x@sender.test")[0] == 250
            assert s.rcpt("bob@example.test")[0] == 250
            got_code, got_text = s.data(raw)  # smtplib returns the final reply of DATA
            assert got_code == code
            assert got_text.startswith(text), got_text


def test_uribl_quarantines_into_junk(mx: MX) -> None:
    raw = message("a@sender.test", "See http://www.evil-link.test/win now\n")
    with mx.session("198.51.100.40") as s:
        assert s.mail("x@sender.test")[0] == 250
        assert s.rcpt("bob@example.test")[0] == 250
        assert s.data(raw)[0] == 250
    [junk] = mx.mailbox("bob", "Junk")[-1:]
    assert b"X-Mailserv-Quarantine: Message contains a link to evil-link.test" in junk


def test_arc_sealed_message_reported(mx: MX) -> None:
    raw = message("a@sender.test", extra="Authentication-Results: relay.test; spf=pass\n")
    sets = dkim.arc_sign(raw, b"rsa", b"relay.test", mx.keys.rsa_private, b"relay.test")
    raw = b"".join(h.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for h in sets) + raw
    before = len(mx.mailbox("bob"))
    with mx.session("198.51.100.50") as s:
        assert s.mail("x@sender.test")[0] == 250
        assert s.rcpt("bob@example.test")[0] == 250
        assert s.data(raw)[0] == 250
    [stored] = mx.mailbox("bob")[before:]
    assert b"arc=pass (1 ARC set: success)" in stored


def test_greylisting_defers_then_accepts_the_retry(mx: MX) -> None:
    with mx.session("100.64.0.1") as s:
        assert s.mail("new@nospf.test")[0] == 250
        code, text = s.rcpt("bob@example.test")
        assert (code, text[:5]) == (451, b"4.7.1")
    time.sleep(2.2)
    with mx.session("100.64.0.2") as s:  # the same /24 retries
        assert s.mail("new@nospf.test")[0] == 250
        assert s.rcpt("bob@example.test")[0] == 250


def test_spamtrap_blocks_the_client(mx: MX) -> None:
    with mx.session("198.51.100.60") as s:
        assert s.mail("x@sender.test")[0] == 250
        assert s.rcpt("trap@example.test")[0] == 550
    client, code, text = mx.connect("198.51.100.60")
    assert (code, text) == (554, b"5.7.1 Access denied")
    client.close()


def test_spamtrap_domain_outside_the_local_domains(mx: MX) -> None:
    """A trap domain is no local domain: the trap answers, not the relay check."""
    with mx.session("198.51.100.61") as s:
        assert s.mail("x@sender.test")[0] == 250
        assert s.rcpt("anyone@spamtrap.test") == (550, b"5.1.1 Recipient address rejected")
    client, code, _ = mx.connect("198.51.100.61")
    assert code == 554
    client.close()
    with mx.session("198.51.100.62") as s:  # other clients still get the usual replies
        assert s.mail("x@sender.test")[0] == 250
        assert s.rcpt("nobody@example.test")[0] == 550
        assert s.rcpt("someone@elsewhere.test")[0] == 554
        assert s.rcpt("bob@example.test")[0] == 250


def _send_marked(mx: MX, client_ip: str, keyword: str) -> tuple[bytes, tuple[int, bytes]]:
    """Send a message whose body line starts with ``keyword``; (its marker, DATA reply)."""
    marker = f"{keyword}-{time.monotonic_ns()}"
    with mx.session(client_ip) as s:
        assert s.mail("x@sender.test")[0] == 250
        assert s.rcpt("bob@example.test")[0] == 250
        reply = s.data(message("a@sender.test", f"{keyword} {marker}\n"))
        assert s.mail("x@sender.test")[0] == 250  # the session goes on as usual
    return marker.encode(), reply


def test_rule_discard_accepts_and_drops(mx: MX) -> None:
    """Postfix DISCARD: claim success, deliver nothing (issue 9, rules)."""
    marker, (code, text) = _send_marked(mx, "198.51.100.90", "DROPME")
    assert code == 250 and text.startswith(b"2.0.0 Ok"), text
    assert not any(marker in m for m in mx.mailbox("bob") + mx.mailbox("bob", "Junk"))
    assert not list((mx.state / "spool" / "incoming").iterdir())


def test_rule_quarantine_delivers_into_junk_with_the_reason(mx: MX) -> None:
    marker, (code, _) = _send_marked(mx, "198.51.100.91", "HOLDME")
    assert code == 250
    assert not any(marker in m for m in mx.mailbox("bob"))
    [junk] = [m for m in mx.mailbox("bob", "Junk") if marker in m]
    head = junk.split(b"\r\n\r\n", 1)[0]
    assert b"X-Mailserv-Quarantine: rule quarantine: held by rule" in head
    assert b"Authentication-Results: mail.example.test;" in head


def test_rate_limit_per_client(mx: MX) -> None:
    with mx.session("198.51.100.70") as s:
        codes = []
        for _ in range(3):
            codes.append(s.mail("x@sender.test")[0])
            s.rset()
    assert codes == [250, 250, 451]


def test_tarpit_delays_the_banner_of_listed_networks(mx: MX) -> None:
    started = time.monotonic()
    client, code, _ = mx.connect("203.0.113.9")
    delay = time.monotonic() - started
    client.close()
    started = time.monotonic()
    other, _, _ = mx.connect("198.51.100.80")
    fast = time.monotonic() - started
    other.close()
    assert code == 220 and delay >= 1.0 and fast < 1.0
