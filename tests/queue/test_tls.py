"""Transport security of outbound mail: STARTTLS, DANE (RFC 7672), MTA-STS (RFC 8461).

The fake MXs present certificates signed by the session's test CA; the MTA-STS policy is
served over HTTPS by a twisted.web server on 127.0.0.7.  DANE needs a validating resolver
(the AD bit): ``Validating`` marks the test DNS server's answers as validated, as a
DNSSEC-validating resolver on 127.0.0.1 would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mailserv.queue.state import QueueStore
from tests.queue.conftest import POLICY, message
from tests.queue.test_delivery import remote_dns, wait_for

pytestmark = pytest.mark.integration


class Validating:
    """A resolver whose answers carry the AD bit (what DANE requires)."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def lookup(self, name: str, rdtype: str) -> Any:
        d = self.real.lookup(name, rdtype)
        return d.addCallback(lambda a: dataclasses.replace(a, authenticated=True))


def spki_sha256(cert_file: str) -> str:
    with open(cert_file, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def build_validating(queue_env: Any) -> Any:
    """The queue service of queue_env with a resolver that validates every answer."""
    _config, resolver = validating_env(queue_env)
    return queue_env.build(resolver=resolver)


def validating_env(queue_env: Any) -> tuple[Any, Any]:
    from twisted.internet import reactor

    from mailserv.dns import DNSResolver
    from mailserv.threads import ThreadPools

    config = queue_env.config()
    queue_env.threads = queue_env.threads or ThreadPools(reactor, {"dns": 4, "disk": 4})
    resolver = Validating(DNSResolver(config.dns, queue_env.threads))
    return config, resolver


async def deferred_reason(queue_env: Any, entry_id: str) -> str:
    store = QueueStore(queue_env.queue_dir)
    await wait_for(lambda: os.path.exists(store.path(entry_id, "state")))
    return str(store.load(entry_id).recipients[0].reason)


@pytest_twisted.ensureDeferred
async def test_starttls_whenever_offered(
    queue_env: Any, tls_net: Any, mx_net: Any, dns_server: Any, test_ca: Any
) -> None:
    remote_dns(dns_server)
    mx = tls_net.mx(name="untrusted.example")
    queue_env.enqueue("a@sender.test", ["b@remote.test"], message())
    queue = queue_env.build()
    queue.startService()
    await wait_for(lambda: len(mx.messages) == 1)
    assert mx.messages[0].tls is True
    # RFC 3207 §4.2: EHLO again after the handshake.
    assert [c.split()[0] for c in mx.commands][:3] == ["EHLO", "STARTTLS", "EHLO"]


@pytest_twisted.ensureDeferred
async def test_dane_matching_tlsa_delivers_over_tls(
    queue_env: Any, tls_net: Any, mx_net: Any, dns_server: Any, test_ca: Any
) -> None:
    cert = test_ca.issue("mx1.remote.test")
    tls_net.dane_dns(spki_sha256(cert[0]))
    mx = tls_net.mx(cert=cert)
    queue_env.enqueue("a@sender.test", ["b@remote.test"], message())
    queue = build_validating(queue_env)
    queue.startService()
    await wait_for(lambda: len(mx.messages) == 1)
    assert mx.messages[0].tls is True


@pytest_twisted.ensureDeferred
async def test_dane_mismatch_defers_and_sends_nothing(
    queue_env: Any, tls_net: Any, mx_net: Any, dns_server: Any, test_ca: Any
) -> None:
    cert = test_ca.issue("mx1.remote.test")
    other = test_ca.issue("someone-else.test")
    tls_net.dane_dns(spki_sha256(other[0]))
    mx = tls_net.mx(cert=cert)
    entry_id = queue_env.enqueue("a@sender.test", ["b@remote.test"], message())
    queue = build_validating(queue_env)
    queue.startService()
    reason = await deferred_reason(queue_env, entry_id)
    assert "4.7.5" in reason and "DANE" in reason
    assert not mx.messages and not any(c.startswith("MAIL") for c in mx.commands)


@pytest_twisted.ensureDeferred
async def test_dane_with_stripped_starttls_never_sends_in_plaintext(
    queue_env: Any, tls_net: Any, mx_net: Any, dns_server: Any, test_ca: Any
) -> None:
    """Defect 7 end to end: TLSA exists, the STARTTLS offer was stripped: defer, no MAIL."""
    cert = test_ca.issue("mx1.remote.test")
    tls_net.dane_dns(spki_sha256(cert[0]))
    mx = mx_net.server("127.0.0.2", starttls=False)
    entry_id = queue_env.enqueue("a@sender.test", ["b@remote.test"], message())
    queue = build_validating(queue_env)
    queue.startService()
    reason = await deferred_reason(queue_env, entry_id)
    assert "4.7.5" in reason
    assert not any(c.startswith("MAIL") for c in mx.commands)


@pytest_twisted.ensureDeferred
async def test_without_validation_tlsa_is_ignored(
    queue_env: Any, tls_net: Any, mx_net: Any, dns_server: Any, test_ca: Any
) -> None:
    """Unauthenticated TLSA records (no AD bit) must not be used (RFC 7672 §2.1)."""
    tls_net.dane_dns("00" * 32)
    mx = mx_net.server("127.0.0.2")
    queue_env.enqueue("a@sender.test", ["b@remote.test"], message())
    queue = queue_env.build()
    queue.startService()
    await wait_for(lambda: len(mx.messages) == 1)


@pytest_twisted.ensureDeferred
async def test_mta_sts_enforce_with_valid_certificate(
    queue_env: Any, tls_net: Any, mx_net: Any, dns_server: Any, test_ca: Any
) -> None:
    tls_net.mta_sts()
    mx = tls_net.mx()
    queue_env.enqueue("a@sender.test", ["b@remote.test"], message())
    queue_env.start()
    await wait_for(lambda: len(mx.messages) == 1 or queue_env.state_reasons())
    assert not queue_env.state_reasons()
    assert mx.messages[0].tls


@pytest_twisted.ensureDeferred
async def test_mta_sts_enforce_refuses_a_bad_certificate(
    queue_env: Any, tls_net: Any, mx_net: Any, dns_server: Any, test_ca: Any
) -> None:
    tls_net.mta_sts()
    await refused_for_its_certificate(queue_env, tls_net)


async def refused_for_its_certificate(queue_env: Any, tls_net: Any) -> None:
    """An MX with a certificate for another name under an enforced policy: deferred, no MAIL."""
    await refused_for_its_certificate_with(queue_env, tls_net)


async def refused_for_its_certificate_with(
    queue_env: Any, tls_net: Any, data: bytes | None = None, **entry: Any
) -> None:
    mx = tls_net.mx(name="wrong.name.test")
    entry_id = queue_env.enqueue("a@sender.test", ["b@remote.test"], data or message(), **entry)
    queue_env.start()
    reason = await deferred_reason(queue_env, entry_id)
    assert "4.7.5" in reason and "certificate" in reason
    assert not any(c.startswith("MAIL") for c in mx.commands)


@pytest_twisted.ensureDeferred
async def test_mta_sts_enforce_skips_mx_not_in_policy(
    queue_env: Any, tls_net: Any, mx_net: Any, dns_server: Any, test_ca: Any
) -> None:
    tls_net.mta_sts(POLICY.replace("mx: mx1.remote.test", "mx: *.elsewhere.test"))
    mx = tls_net.mx()
    entry_id = queue_env.enqueue("a@sender.test", ["b@remote.test"], message())
    queue_env.start()
    reason = await deferred_reason(queue_env, entry_id)
    assert "MTA-STS" in reason
    assert mx.connections == 0


class ValidatingOnly(Validating):
    """Validated answers only for names under ``suffix`` (one DNSSEC-signed zone)."""

    def __init__(self, real: Any, suffix: str) -> None:
        super().__init__(real)
        self.suffix = suffix

    def lookup(self, name: str, rdtype: str) -> Any:
        if name.rstrip(".").endswith(self.suffix):
            return super().lookup(name, rdtype)
        return self.real.lookup(name, rdtype)


def secure_sender_mx(tls_net: Any) -> Any:
    """The sender's MX: DNSSEC zone, valid certificate, REQUIRETLS: bounces can reach it."""
    extensions = ["PIPELINING", "SIZE 50000000", "8BITMIME", "DSN", "REQUIRETLS"]
    return tls_net.mx("127.0.0.5", "mx.sender.test", extensions=extensions)


@pytest_twisted.ensureDeferred
async def test_requiretls_without_dnssec_or_mta_sts_bounces(
    queue_env: Any, tls_net: Any, mx_net: Any, dns_server: Any, test_ca: Any
) -> None:
    """RFC 8689 §4.2.1: no validated MX and no MTA-STS policy: 5.7.10, nothing sent."""
    remote_dns(dns_server)
    mx = tls_net.mx()
    sender_mx = secure_sender_mx(tls_net)
    queue_env.enqueue("a@sender.test", ["b@remote.test"], message(), requiretls=True)
    config, _ = validating_env(queue_env)
    from mailserv.dns import DNSResolver

    resolver = ValidatingOnly(DNSResolver(config.dns, queue_env.threads), "sender.test")
    queue = queue_env.build(resolver=resolver)
    queue.startService()
    await wait_for(lambda: len(sender_mx.messages) == 1)
    assert mx.connections == 0
    bounce = sender_mx.messages[0]
    assert bounce.tls and "MAIL FROM:<> SIZE=" in "\n".join(sender_mx.commands)
    assert any(
        c.startswith("MAIL FROM:<>") and c.endswith("REQUIRETLS") for c in sender_mx.commands
    )
    text = bounce.data.decode()
    assert "Status: 5.7.10" in text and "text/rfc822-headers" in text
    assert "Hello." not in text  # RFC 8689 §5: the body is not returned


@pytest_twisted.ensureDeferred
async def test_requiretls_needs_the_extension_and_verified_tls(
    queue_env: Any, tls_net: Any, mx_net: Any, dns_server: Any, test_ca: Any
) -> None:
    remote_dns(dns_server)
    plain_tls = tls_net.mx()
    sender_mx = secure_sender_mx(tls_net)
    queue_env.enqueue("a@sender.test", ["b@remote.test"], message(), requiretls=True)
    queue = build_validating(queue_env)
    queue.startService()
    await wait_for(lambda: len(sender_mx.messages) == 1)
    assert plain_tls.connections == 1 and not any(c.startswith("MAIL") for c in plain_tls.commands)
    assert (
        "REQUIRETLS: mx1.remote.test does not support REQUIRETLS"
        in sender_mx.messages[0].data.decode()
    )


@pytest_twisted.ensureDeferred
async def test_requiretls_delivered_with_the_mail_parameter(
    queue_env: Any, tls_net: Any, mx_net: Any, dns_server: Any, test_ca: Any
) -> None:
    remote_dns(dns_server)
    extensions = ["PIPELINING", "SIZE 50000000", "8BITMIME", "REQUIRETLS"]
    mx = tls_net.mx(extensions=extensions)
    queue_env.enqueue("a@sender.test", ["b@remote.test"], message(), requiretls=True)
    queue = build_validating(queue_env)
    queue.startService()
    await wait_for(lambda: len(mx.messages) == 1)
    assert mx.messages[0].tls
    mail = next(c for c in mx.commands if c.startswith("MAIL"))
    assert mail.endswith(" REQUIRETLS")


@pytest_twisted.ensureDeferred
async def test_opportunistic_tls_failure_retries_in_plaintext(
    queue_env: Any, mx_net: Any, dns_server: Any
) -> None:
    """RFC 7435: with no policy, a failed handshake may go on in plaintext (as Postfix does)."""
    remote_dns(dns_server)
    mx = mx_net.server("127.0.0.2", starttls=True, broken_tls=True)
    queue_env.enqueue("a@sender.test", ["b@remote.test"], message())
    queue_env.start()
    await wait_for(lambda: len(mx.messages) == 1)
    assert mx.connections == 2 and mx.messages[0].tls is False
    # The plaintext retry does not even try STARTTLS again.
    assert mx.commands.count("STARTTLS") == 1


@pytest_twisted.ensureDeferred
async def test_failed_handshake_under_a_policy_never_goes_plaintext(
    queue_env: Any, tls_net: Any, mx_net: Any, dns_server: Any, test_ca: Any
) -> None:
    cert = test_ca.issue("mx1.remote.test")
    tls_net.dane_dns(spki_sha256(cert[0]))
    mx = mx_net.server("127.0.0.2", starttls=True, broken_tls=True)
    entry_id = queue_env.enqueue("a@sender.test", ["b@remote.test"], message())
    queue = build_validating(queue_env)
    queue.startService()
    reason = await deferred_reason(queue_env, entry_id)
    assert "4.7.5" in reason and "TLS handshake failed" in reason
    assert mx.connections == 1 and not mx.messages


@pytest_twisted.ensureDeferred
async def test_smarthost_with_verified_tls_and_auth(
    queue_env: Any, tls_net: Any, mx_net: Any, dns_server: Any, test_ca: Any, tmp_path: Any
) -> None:
    dns_server.set({"relay.example.test": {"A": ["127.0.0.3"]}})
    relay = tls_net.mx("127.0.0.3", "relay.example.test", auth=("mailserv", "s3cret pass"))
    secret = tmp_path / "relay.secret"
    secret.write_text("s3cret pass\n")
    extra = (
        f'relay_host = "relay.example.test:{mx_net.port}"\n'
        f'relay_user = "mailserv"\nrelay_password_file = "{secret}"'
    )
    queue_env.enqueue("a@sender.test", ["b@anywhere.test", "c@elsewhere.test"], message())
    queue = queue_env.build(extra)
    queue.startService()
    await wait_for(lambda: len(relay.messages) == 2)
    assert all(m.tls for m in relay.messages)
    assert sorted(r for m in relay.messages for r in m.recipients) == [
        "b@anywhere.test",
        "c@elsewhere.test",
    ]
    assert all(c.split()[0] != "AUTH" or c.startswith("AUTH PLAIN ") for c in relay.commands)


@pytest_twisted.ensureDeferred
async def test_smarthost_auth_failure_defers(
    queue_env: Any, tls_net: Any, mx_net: Any, dns_server: Any, test_ca: Any, tmp_path: Any
) -> None:
    dns_server.set({"relay.example.test": {"A": ["127.0.0.3"]}})
    relay = tls_net.mx("127.0.0.3", "relay.example.test", auth=("u", "right"))
    secret = tmp_path / "relay.secret"
    secret.write_text("wrong\n")
    extra = (
        f'relay_host = "relay.example.test:{mx_net.port}"\n'
        f'relay_user = "u"\nrelay_password_file = "{secret}"'
    )
    entry_id = queue_env.enqueue("a@sender.test", ["b@anywhere.test"], message())
    queue = queue_env.build(extra)
    queue.startService()
    reason = await deferred_reason(queue_env, entry_id)
    assert "authentication failed" in reason and reason.startswith("4")
    assert not relay.messages


@pytest_twisted.ensureDeferred
async def test_mta_sts_policy_is_kept_on_disk_across_a_restart(
    queue_env: Any, tls_net: Any, mx_net: Any
) -> None:
    """RFC 8461 §5.1: a cached policy outlives a restart; a stripped TXT cannot downgrade."""
    tls_net.mta_sts()
    good = tls_net.mx()
    queue_env.enqueue("a@sender.test", ["b@remote.test"], message())
    queue = queue_env.start()
    await wait_for(lambda: len(good.messages) == 1)
    queue.stopService()
    # Restart while an attacker strips the TXT record, blocks the policy host and
    # answers for the MX with a certificate for another name.
    await tls_net.stop()
    tls_net.sts_dns(None)
    await good.port.stopListening()
    await refused_for_its_certificate(queue_env, tls_net)


class FailingTXT:
    """A resolver whose every lookup fails (the TXT record cannot be read)."""

    def lookup(self, name: str, rdtype: str) -> Any:
        from twisted.internet import defer

        from mailserv.errors import TemporaryFailure

        return defer.fail(TemporaryFailure("SERVFAIL"))


@pytest_twisted.ensureDeferred
async def test_mta_sts_disk_cache_is_used_until_max_age(tmp_path: Any) -> None:
    import time

    from twisted.internet import reactor

    from mailserv.queue.mtasts import MTASTSFetcher, Policy

    cache = str(tmp_path / "mta-sts")
    fresh = Policy("1", "enforce", ["mx1.fresh.test"], 3600, time.time() - 60)
    stale = Policy("2", "enforce", ["mx1.stale.test"], 3600, time.time() - 3700)
    first = MTASTSFetcher(FailingTXT(), reactor, cache_dir=cache)
    await first.remember("fresh.test", fresh)
    await first.remember("stale.test", stale)
    # Another process (a restart) with nothing in memory and no DNS answers:
    second = MTASTSFetcher(FailingTXT(), reactor, cache_dir=cache)
    assert await second.policy("fresh.test") == fresh
    assert await second.policy("stale.test") is None
    assert not os.path.exists(os.path.join(cache, "stale.test.json"))
    assert await second.policy("../escape") is None


def relaxed_message() -> bytes:
    """A message whose sender asks for delivery even where TLS policy fails (RFC 8689 §5)."""
    return b"TLS-Required: No\r\n" + message()


@pytest_twisted.ensureDeferred
async def test_tls_required_no_delivers_despite_mta_sts_failure(
    queue_env: Any, tls_net: Any
) -> None:
    """RFC 8689: "TLS-Required: No" lifts the MTA-STS requirement; STARTTLS is still used."""
    tls_net.mta_sts()
    mx = tls_net.mx(name="wrong.name.test")
    queue_env.enqueue("a@sender.test", ["b@remote.test"], relaxed_message())
    queue_env.start()
    await wait_for(lambda: len(mx.messages) == 1)
    assert mx.messages[0].tls


@pytest_twisted.ensureDeferred
async def test_tls_required_no_delivers_despite_dane_mismatch(
    queue_env: Any, tls_net: Any, test_ca: Any
) -> None:
    other = test_ca.issue("someone-else.test")
    tls_net.dane_dns(spki_sha256(other[0]))
    mx = tls_net.mx()
    queue_env.enqueue("a@sender.test", ["b@remote.test"], relaxed_message())
    build_validating(queue_env).startService()
    await wait_for(lambda: len(mx.messages) == 1)
    assert mx.messages[0].tls


@pytest_twisted.ensureDeferred
async def test_tls_required_no_is_ignored_with_requiretls(queue_env: Any, tls_net: Any) -> None:
    """RFC 8689: with the REQUIRETLS MAIL parameter the header field is ignored."""
    tls_net.mta_sts()
    await refused_for_its_certificate_with(queue_env, tls_net, relaxed_message(), requiretls=True)
