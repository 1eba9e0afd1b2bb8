"""DKIM filter: RSA and Ed25519 signatures made by the test, keys served by the DNS fixture."""

from __future__ import annotations

from typing import Any

import dkim
import pytest
import pytest_twisted

from mailserv.filters.base import Action
from mailserv.filters.common import results_for
from tests.filters.conftest import crlf, pools_used, rsa_dkim_key

MESSAGE = crlf(
    "From: Alice <alice@sender.test>\n"
    "To: bob@example.org\n"
    "Subject: hello\n"
    "Date: Wed, 25 Nov 2026 10:00:00 +0000\n"
    "Message-ID: <1@sender.test>\n"
    "\n"
    "Hello Bob.\n"
)


@pytest_twisted.inlineCallbacks
def run(env: Any, raw: bytes, **options: Any) -> Any:
    flt = env.build("dkim", **options)
    session = env.session()
    envelope = env.envelope("alice@sender.test", "bob@example.org")
    verdict = yield flt.check_message(session, envelope, env.message(raw))
    return verdict, results_for(session, envelope)


@pytest_twisted.inlineCallbacks
def test_rsa_and_ed25519_signatures_all_reported(
    filter_env: Any, dns_server: Any, dkim_keys: Any
) -> Any:
    dns_server.set(dkim_keys.records("sender.test"))
    signed = dkim_keys.sign(MESSAGE, "sender.test", "rsa")
    signed = dkim_keys.sign(signed, "sender.test", "ed25519")
    verdict, results = yield run(filter_env, signed)
    assert verdict.action is Action.CONTINUE
    rendered = [r.render() for r in results.dkim]
    assert len(rendered) == 2
    # The topmost signature (Ed25519, added last) comes first.
    assert rendered[0].startswith("dkim=pass (ed25519 key) header.d=sender.test")
    assert "header.s=ed header.a=ed25519-sha256 header.b=" in rendered[0]
    assert rendered[1].startswith("dkim=pass (rsa key) header.d=sender.test")
    assert "header.s=rsa header.a=rsa-sha256" in rendered[1]
    assert results.dkim_pass_domains == ["sender.test", "sender.test"]


@pytest_twisted.inlineCallbacks
def test_modified_body_fails(filter_env: Any, dns_server: Any, dkim_keys: Any) -> Any:
    dns_server.set(dkim_keys.records("sender.test"))
    signed = dkim_keys.sign(MESSAGE, "sender.test", "rsa")
    tampered = signed.replace(b"Hello Bob.", b"Hello Eve.")
    _verdict, results = yield run(filter_env, tampered)
    [result] = results.dkim
    assert result.result == "fail" and "body hash mismatch" in result.comment
    assert results.dkim_pass_domains == []


@pytest_twisted.inlineCallbacks
def test_replayed_signature_with_changed_subject_fails(
    filter_env: Any, dns_server: Any, dkim_keys: Any
) -> Any:
    dns_server.set(dkim_keys.records("sender.test"))
    signed = dkim_keys.sign(MESSAGE, "sender.test", "ed25519")
    replayed = signed.replace(b"Subject: hello", b"Subject: buy now")
    _verdict, results = yield run(filter_env, replayed, fail="reject")
    assert [r.result for r in results.dkim] == ["fail"]


@pytest_twisted.inlineCallbacks
def test_l_tag_is_reported_and_not_trusted_for_appended_body(
    filter_env: Any, dns_server: Any, dkim_keys: Any
) -> Any:
    dns_server.set(dkim_keys.records("sender.test"))
    signed = dkim_keys.sign(MESSAGE, "sender.test", "rsa", length=True)
    # RFC 6376 §8.2: content appended after the signed length still "verifies".
    appended = signed + b"Click http://evil.test/ now\r\n"
    _verdict, results = yield run(filter_env, appended)
    [result] = results.dkim
    assert result.result == "policy"
    assert "l=12 covers 12 of 41 body bytes" in result.comment
    assert results.dkim_pass_domains == []
    # Unmodified, the l= signature covers the whole body: a pass.
    _verdict, results = yield run(filter_env, signed)
    assert [r.result for r in results.dkim] == ["pass"]


@pytest_twisted.inlineCallbacks
def test_missing_key_is_permerror_and_timeout_temperror(
    filter_env: Any, dns_server: Any, dkim_keys: Any
) -> Any:
    dns_server.set({"rsa._domainkey.sender.test": {"TIMEOUT": True}})
    signed = dkim_keys.sign(MESSAGE, "sender.test", "rsa")
    signed = dkim_keys.sign(signed, "sender.test", "ed25519")
    verdict, results = yield run(filter_env, signed, fail="tempfail")
    assert [r.result for r in results.dkim] == ["permerror", "temperror"]
    assert verdict.action is Action.TEMPFAIL


@pytest_twisted.inlineCallbacks
def test_unsigned_message_is_none(filter_env: Any) -> Any:
    verdict, results = yield run(filter_env, MESSAGE, fail="reject")
    assert verdict.action is Action.CONTINUE
    assert [r.render() for r in results.dkim] == ["dkim=none"]


@pytest_twisted.inlineCallbacks
def test_signature_limit(filter_env: Any, dns_server: Any, dkim_keys: Any) -> Any:
    dns_server.set(dkim_keys.records("sender.test"))
    signed = MESSAGE
    for _ in range(3):
        signed = dkim_keys.sign(signed, "sender.test", "ed25519")
    _verdict, results = yield run(filter_env, signed, max_signatures=2)
    assert [r.result for r in results.dkim] == ["pass", "pass", "neutral"]


def test_fast_integer_conversions_agree_with_dkimpys() -> None:
    import random

    from mailserv.filters import dkim as ours

    rng = random.Random(7)
    values = [0, 1, 255, 256, 2**2048 - 1] + [
        rng.getrandbits(rng.randint(1, 4096)) for _ in range(300)
    ]
    for n in values:
        assert ours._int2str(n) == ours._slow_int2str(n)
        for length in (0, 1, 5, 256, 600):
            assert ours._int2str(n, length) == ours._slow_int2str(n, length)
        data = bytes(ours._slow_int2str(n))
        assert ours._str2int(data) == ours._slow_str2int(data) == n


def test_openssl_rsa_verification_agrees_with_dkimpys(dkim_keys: Any) -> None:
    """The OpenSSL RSASSA-PKCS1-v1_5 check gives dkimpy's answer, valid or not."""
    import hashlib

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    import mailserv.filters.dkim as ours

    private = serialization.load_pem_private_key(dkim_keys.rsa_private, None)
    numbers = private.public_key().public_numbers()  # type: ignore[union-attr]
    public = {"modulus": numbers.n, "publicExponent": numbers.e}
    cases = []
    for i in range(40):
        data = f"message {i}".encode()
        sig = private.sign(data, padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr]
        cases.append((data, sig))
        cases.append((data + b"x", sig))  # wrong digest
        cases.append((data, sig[:-1] + bytes([sig[-1] ^ 1])))  # damaged signature
        if sig[0] == 0:
            cases.append((data, sig.lstrip(b"\0")))  # leading zero octets dropped
    cases.append((b"m", b"\xff" * 256))  # not below the modulus
    cases.append((b"m", b"\x01" * 300))  # longer than the modulus: dkimpy's own code
    for data, sig in cases:
        for algorithm in (hashlib.sha256, hashlib.sha1):
            fast = ours._rsa_verify(algorithm(data), sig, public)
            assert fast == ours._slow_rsa_verify(algorithm(data), sig, public)
    assert ours._rsa_verify(hashlib.sha256(cases[0][0]), cases[0][1], public) is True


RFC822_CASES = [
    b"",
    b"\r\n",
    b"\r\nbody only\r\n",
    b"Subject: hi\r\n",
    b"Subject: hi",
    b"Subject: hi\r\n\r\n",
    b"Subject: hi\r\n\r\nbody\r\n",
    b"Subject: hi\r\n\r\nbody\r\n\r\n\r\n",
    b"Subject: hi\r\n\r\n\r\nafter an empty first body line\r\n",
    b"From sender Wed Nov 25 10:00:00 2026\r\nSubject: mbox\r\n\r\nx\r\n",
    b"Subject: folded\r\n\tsecond line\r\n  third\r\nTo: a@b.test\r\n\r\nbody\r\nmore",
    b"Subject: a lone \r in a header\r\n\r\nand \r in the body\r\n",
    b"Subject: LF only\n\nbody\n",
    b"Subject: mixed\r\nTo: x@y.test\n\r\nbody\nline\r\n",
    b"Subject: mixed body\r\n\r\nline\nline\r\n",
    b"Subject: x\r\r\n\r\nbody",
    b"Bad header line\r\n\r\nbody",
    b" leading continuation\r\n\r\nbody",
    b"Subject: x\r\n\r\n\r\n",
]


@pytest.mark.parametrize("raw", RFC822_CASES)
def test_fast_rfc822_parse_agrees_with_dkimpys(raw: bytes) -> None:
    """dkimpy's message parser, without splitting and joining the body line by line."""
    from mailserv.filters import dkim as ours

    def outcome(parse: Any) -> Any:
        try:
            return parse(raw)
        except Exception as exc:
            return type(exc)

    assert outcome(ours._rfc822_parse) == outcome(ours._slow_rfc822_parse)
    assert ours.dkim.rfc822_parse is ours._rfc822_parse


def test_fast_rfc822_parse_agrees_on_the_bench_message(dkim_keys: Any) -> None:
    from mailserv.filters import dkim as ours

    body = "".join(f"line {n} see https://www.example.net/p{n}\n" for n in range(55))
    text = f"From: Alice <alice@sender.test>\nTo: bob@example.test\nSubject: t\n\n{body}"
    raw = dkim_keys.sign(text.replace("\n", "\r\n").encode(), "sender.test", "rsa")
    assert ours._rfc822_parse(raw) == ours._slow_rfc822_parse(raw)


@pytest_twisted.inlineCallbacks
def test_keys_are_fetched_on_the_reactor_before_the_chains_thread_job(
    filter_env: Any, dns_server: Any, dkim_keys: Any, monkeypatch: Any
) -> Any:
    """In the chain, uncached keys are looked up asynchronously before the crypto job."""
    from twisted.internet import reactor

    from mailserv.filters.chain import FilterChain

    dns_server.set(
        {
            **dkim_keys.records("sender.test", "prefetch-rsa", "prefetch-ed"),
            "late._domainkey.sender.test": {"TIMEOUT": True},
        }
    )
    signed = dkim_keys.sign(MESSAGE, "sender.test", "rsa", selector="prefetch-rsa")
    signed = dkim_keys.sign(signed, "sender.test", "ed25519", selector="prefetch-ed")
    signed = dkim_keys.sign(signed, "sender.test", "rsa", selector="late")
    flt = filter_env.build("dkim")

    def blocking(name: str, rdtype: str) -> Any:
        raise AssertionError(f"blocking lookup of {name} in the job")

    monkeypatch.setattr(flt.resolver, "lookup_blocking", blocking)
    session = filter_env.session()
    envelope = filter_env.envelope("alice@sender.test", "bob@example.org")
    stage = yield FilterChain([flt], reactor).message(session, envelope, filter_env.message(signed))
    assert stage.verdict.action is Action.CONTINUE
    results = results_for(session, envelope)
    assert [(r.result, dict(r.properties)["header.s"]) for r in results.dkim] == [
        ("temperror", "late"),
        ("pass", "prefetch-ed"),
        ("pass", "prefetch-rsa"),
    ]


def test_key_names_are_those_dkimpy_looks_up(dkim_keys: Any, filter_env: Any) -> None:
    """The names fetched early are the names dkimpy asks its dnsfunc for."""
    import dkim

    from mailserv.filters import dkim as ours

    signed = dkim_keys.sign(MESSAGE, "Sender.test", "rsa", selector="one")
    signed = dkim_keys.sign(signed, "sub.sender.test", "ed25519", selector="two")
    signed = dkim_keys.sign(signed, "sender.test", "rsa", selector="one")
    asked: list[str] = []

    def dnsfunc(name: bytes, timeout: float = 5) -> None:
        asked.append(name.decode().rstrip("."))
        return None

    verifier = dkim.DKIM(signed)
    for idx in range(3):
        try:
            verifier.verify(idx, dnsfunc)
        except dkim.DKIMException:
            pass
    message = filter_env.message(signed)
    assert ours.key_names(message, 5) == list(dict.fromkeys(asked))
    assert ours.key_names(message, 1) == asked[:1]


def test_canonicalization_helpers_agree_with_dkimpys() -> None:
    """dkimpy's relaxed-canonicalization helpers on precompiled patterns: the same bytes."""
    import random

    from mailserv.filters import dkim as ours

    rng = random.Random(5)
    pieces = [b" ", b"\t", b"\r\n", b"\n", b"\r", b"a", b"b c", b"\r\n\t", b"\r\n ", b"  \t "]
    for _ in range(3000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 20)))
        for name, slow in ours._SLOW_CANONICALIZATION.items():
            fast = getattr(ours.dkim.canonicalization, name)
            assert fast is not slow
            assert fast(data) == slow(data), (name, data)


def test_relaxed_header_canonicalization_agrees_with_dkimpys() -> None:
    import random

    from mailserv.filters import dkim as ours

    rng = random.Random(6)
    pieces = [b" ", b"\t", b"\r\n", b"\n", b"\r", b"a", b"b c", b"\r\n\t", b"\r\n ", b"  \t ", b"x"]
    relaxed = ours.dkim.canonicalization.Relaxed
    assert relaxed.canonicalize_headers is not ours._slow_relaxed_headers
    for _ in range(3000):
        headers = [
            [
                rng.choice([b"Subject", b"FROM ", b"dkim-Signature"]),
                b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
                + rng.choice([b"\r\n", b"", b"\n"]),
            ]
            for _ in range(rng.randint(0, 4))
        ]
        expected = ours._slow_relaxed_headers([list(h) for h in headers])
        assert relaxed.canonicalize_headers(headers) == expected, headers


def test_b_tag_pattern_agrees_with_dkimpys() -> None:
    """The b= value removal (RFC 6376 §3.7) on a pattern without a group per character."""
    import random

    from mailserv.filters import dkim as ours

    assert ours.dkim.RE_BTAG is ours._BTAG
    rng = random.Random(8)
    pieces = [b"b", b"=", b";", b" ", b"\t", b"\r\n", b"\n", b"\r", b"ab", b"+/", b"b=", b" b ="]
    pieces += [b"; b=", b"\r\n b=", b"x", b"-", b"bh=", b"==", b"\r\n\t"]
    for _ in range(20000):
        value = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        assert ours._BTAG.sub(b"\\1", value) == ours._SLOW_BTAG.sub(b"\\1", value), value


def _rsa_key(bits: int, exponent: int = 65537) -> tuple[bytes, list[str]]:
    """The PEM private key and the TXT strings of an RSA key of ``bits`` bits whose
    public exponent is ``exponent`` (any odd value: made from a generated key's primes)."""
    import math

    from cryptography.hazmat.primitives.asymmetric import rsa

    base = rsa.generate_private_key(public_exponent=65537, key_size=bits).private_numbers()
    p, q = base.p, base.q
    phi = (p - 1) * (q - 1)
    while math.gcd(exponent, phi) != 1:
        exponent += 2
    d = pow(exponent, -1, phi)
    public = rsa.RSAPublicNumbers(exponent, p * q)
    key = rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), public
    ).private_key()
    return rsa_dkim_key(key)


@pytest_twisted.inlineCallbacks
def test_small_messages_are_verified_on_the_reactor_once_their_keys_are_fetched(
    filter_env: Any, dns_server: Any, dkim_keys: Any, monkeypatch: Any
) -> Any:
    """In the chain, a small message held in memory is verified on the reactor when its
    keys have been fetched (no thread job); a spooled one still goes to the pool."""
    from twisted.internet import reactor

    from mailserv.filters.chain import FilterChain

    dns_server.set(dkim_keys.records("sender.test", "inline-rsa", "inline-ed"))
    signed = dkim_keys.sign(MESSAGE, "sender.test", "rsa", selector="inline-rsa")
    signed = dkim_keys.sign(signed, "sender.test", "ed25519", selector="inline-ed")
    flt = filter_env.build("dkim")
    pools = pools_used(filter_env, monkeypatch)
    for memory, expected in ((True, []), (False, ["crypto"])):
        session = filter_env.session()
        envelope = filter_env.envelope("alice@sender.test", "bob@example.org")
        message = filter_env.message(signed, memory=memory)
        yield FilterChain([flt], reactor).message(session, envelope, message)
        results = results_for(session, envelope)
        assert [r.result for r in results.dkim] == ["pass", "pass"], memory
        assert pools == expected, memory


@pytest_twisted.inlineCallbacks
def test_keys_costly_to_verify_with_are_used_in_the_pool(
    filter_env: Any, dns_server: Any, monkeypatch: Any
) -> Any:
    """An RSA key over 4096 bits, or one with a public exponent over 64 bits (a full
    modular exponentiation per check), is not used on the reactor: the message is
    verified in the pool, with the same results."""
    from twisted.internet import reactor

    from mailserv.filters.chain import FilterChain

    for selector, (pem, txt) in (
        ("large", _rsa_key(4352)),
        ("exponent", _rsa_key(2048, exponent=(1 << 1500) + 1)),
    ):
        dns_server.set({f"{selector}._domainkey.sender.test": {"TXT": [txt]}})
        signed = dkim.sign(MESSAGE, selector.encode(), b"sender.test", pem)
        signed = signed.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + MESSAGE
        flt = filter_env.build("dkim")
        pools = pools_used(filter_env, monkeypatch)
        session = filter_env.session()
        envelope = filter_env.envelope("alice@sender.test", "bob@example.org")
        message = filter_env.message(signed, memory=True)
        yield FilterChain([flt], reactor).message(session, envelope, message)
        assert [r.result for r in results_for(session, envelope).dkim] == ["pass"], selector
        assert pools == ["crypto"], selector
        monkeypatch.undo()


@pytest_twisted.inlineCallbacks
def test_signatures_costly_to_resolve_are_verified_in_the_pool(
    filter_env: Any, dns_server: Any, dkim_keys: Any, monkeypatch: Any
) -> Any:
    """An h= tag naming thousands of fields, over a header section of hundreds, would
    have dkimpy scan the section once per name: such a small message is verified in
    the pool, not on the reactor, and gets the same result."""
    from twisted.internet import reactor

    from mailserv.filters.chain import FilterChain

    dns_server.set(dkim_keys.records("sender.test"))
    extra = "".join(f"X-Filler-{i}: {i}\n" for i in range(150))
    raw = crlf(extra) + MESSAGE
    many = [f"x{i}".encode() for i in range(400)]
    signed = dkim_keys.sign(raw, "sender.test", "rsa", include_headers=[b"from", *many])
    assert len(signed) < 16 * 1024  # small enough to be held in memory
    flt = filter_env.build("dkim")
    pools = pools_used(filter_env, monkeypatch)
    session = filter_env.session()
    envelope = filter_env.envelope("alice@sender.test", "bob@example.org")
    yield FilterChain([flt], reactor).message(session, envelope, filter_env.message(signed, True))
    assert [r.result for r in results_for(session, envelope).dkim] == ["pass"]
    assert pools == ["crypto"]


def test_tag_list_parsing_agrees_with_dkimpys() -> None:
    """The tag-list parser put in dkimpy's place gives its tags, or raises its errors."""
    import random

    from mailserv.filters import dkim as ours

    assert ours.dkim.parse_tag_value is ours._parse_tag_value
    rng = random.Random(13)
    pieces = [b"v", b"=", b"1", b";", b" ", b"\t", b"a", b"b", b"bh", b"9", b"_", b"\xc3\xa9"]
    pieces += [b"\r\n", b"d=x.test", b"; ", b"==", b"h=from:to", b"A", b"-"]

    def outcome(parse: Any, data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:
            return type(exc), exc.args

    for _ in range(5000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        assert outcome(ours._parse_tag_value, data) == outcome(ours._slow_parse_tag_value, data), (
            data
        )
