"""DKIM verification (RFC 6376, Ed25519 by RFC 8463) with dkimpy, every signature reported.

In the chain, the keys are looked up on the reactor first; a small message
held in memory is then verified on the reactor when its keys are cheap to
verify with and the work fits the chain's inline budget (common.run_inline),
else in the ``crypto`` thread pool, where dkimpy's own key lookups go through
our resolver (``lookup_blocking``).  Each signature gets an RFC 8601 §2.7.1
result:

- ``pass``: valid signature over the whole body;
- ``policy``: valid, but its ``l=`` covers only part of the body (RFC 6376
  §8.2): reported, never trusted for the whole body nor used by DMARC;
- ``fail``: bad signature or body hash; ``permerror``: malformed signature
  or no usable key; ``temperror``: the key could not be fetched now;
- ``neutral``: not verified (signature limit, message too large).
"""

from __future__ import annotations

import base64
import functools
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import dkim
import dkim.canonicalization
import dkim.crypto
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy
from zope.interface import implementer

from mailserv.config.schema import Section, integer, option, size
from mailserv.errors import TemporaryFailure
from mailserv.filters.base import CONTINUE, FilterBase, Verdict
from mailserv.filters.common import (
    Job,
    MethodResult,
    NeedsThread,
    action_kind,
    cached_answer,
    gather,
    in_memory,
    load_options,
    outcome,
    prepared,
    resolver_for,
    results_for,
    then,
)
from mailserv.interfaces import IMessageFilter

# dkimpy converts RSA integers byte by byte in Python (about 0.6 ms per RSA-2048
# verification, half the cost of a DKIM check); these are the same functions on
# int.to_bytes/int.from_bytes (tests/filters/test_dkim.py checks they agree).
_slow_int2str = dkim.crypto.int2str
_slow_str2int = dkim.crypto.str2int


def _int2str(n: int, length: int = -1) -> bytearray:
    assert n >= 0
    if length < 0:
        return bytearray(n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big"))
    return bytearray((n & ((1 << (8 * length)) - 1)).to_bytes(length, "big"))


def _str2int(s: bytes) -> int:
    return int.from_bytes(bytes(s), "big")


dkim.crypto.int2str = _int2str
dkim.crypto.str2int = _str2int

# dkimpy 1.1 verifies RSA with Python's pow() (about 0.15 ms for RSA-2048, the
# largest single cost of a DKIM check); OpenSSL, through the ``cryptography``
# package we already depend on, does the same RSASSA-PKCS1-v1_5 check (RFC 8017
# §8.2.2) in a fraction of that.  Anything unusual (SHA-1, keys under 1024
# bits, a signature longer than the modulus, a key OpenSSL refuses) keeps
# dkimpy's own code, so results never differ (tests/filters/test_dkim.py).
_slow_rsa_verify = dkim.RSASSA_PKCS1_v1_5_verify
_rsa_keys: OrderedDict[tuple[int, int], Any] = OrderedDict()
_RSA_KEYS_MAX = 1000


def _rsa_key(modulus: int, exponent: int) -> Any:
    key = _rsa_keys.get((modulus, exponent))
    if key is None:
        key = rsa.RSAPublicNumbers(exponent, modulus).public_key()
        _rsa_keys[(modulus, exponent)] = key
        while len(_rsa_keys) > _RSA_KEYS_MAX:
            _rsa_keys.popitem(last=False)
    return key


def _rsa_verify(hash: Any, signature: bytes, public_key: Mapping[str, int]) -> bool:
    modulus, exponent = public_key["modulus"], public_key["publicExponent"]
    modlen = (modulus.bit_length() + 7) // 8
    if hash.name.lower() != "sha256" or modulus.bit_length() < 1024 or len(signature) > modlen:
        return bool(_slow_rsa_verify(hash, signature, public_key))
    try:
        key = _rsa_key(modulus, exponent)
    except ValueError:
        return bool(_slow_rsa_verify(hash, signature, public_key))
    try:
        key.verify(
            signature.rjust(modlen, b"\0"),
            hash.digest(),
            padding.PKCS1v15(),
            Prehashed(hashes.SHA256()),
        )
    except InvalidSignature:
        return False
    return True


dkim.RSASSA_PKCS1_v1_5_verify = _rsa_verify

# Parsed key records, by (name, record text): parsing (base64, ASN.1) is redone
# by dkimpy for every signature; the record itself still comes from DNS (our
# resolver's cache, per TTL) each time, so a changed or removed key is seen.
_slow_load_pk = dkim.load_pk_from_dns
_parsed_keys: OrderedDict[tuple[bytes, bytes], tuple[Any, ...]] = OrderedDict()


def _load_pk_from_dns(name: bytes, dnsfunc: Any = None, timeout: float = 5) -> tuple[Any, ...]:
    record = dnsfunc(name, timeout=timeout)
    if not record:
        return tuple(dkim.evaluate_pk(name, record))  # raises KeyFormatError
    key = (name, bytes(record))
    parsed = _parsed_keys.get(key)
    if parsed is None:
        parsed = tuple(dkim.evaluate_pk(name, record))
        _parsed_keys[key] = parsed
        while len(_parsed_keys) > _RSA_KEYS_MAX:
            _parsed_keys.popitem(last=False)
    if getattr(dnsfunc, "inline", False) and not _cheap(parsed):
        raise NeedsThread(f"costly key at {name!r}")
    return parsed


# The largest RSA key verified on the reactor, and its largest public exponent: a
# verification with such a key costs well under a millisecond.  OpenSSL accepts
# moduli up to 16384 bits and, up to 3072 bits, exponents as large as the modulus
# (a full modular exponentiation, milliseconds): such keys are verified in the pool.
INLINE_RSA_BITS = 4096
INLINE_RSA_EXPONENT_BITS = 64


def _cheap(parsed: tuple[Any, ...]) -> bool:
    """True when verifying with this parsed key (dkim.evaluate_pk) costs little."""
    pk, keysize, ktag = parsed[:3]
    if ktag != b"rsa":
        return True  # ed25519: one fixed-size verification
    return bool(
        keysize <= INLINE_RSA_BITS
        and int(pk["publicExponent"]).bit_length() <= INLINE_RSA_EXPONENT_BITS
    )


dkim.load_pk_from_dns = _load_pk_from_dns


# dkimpy's message parser splits the whole message into lines with a regular
# expression and joins the body again (about 35 of its 45 us on a 4 KiB
# message).  When every LF ends a CRLF (the SMTP server spools CRLF lines) the
# lines are those of bytes.split(b"\r\n") and the body is the rest of the
# message after the first empty line as it is; the headers are parsed by the
# same loop as dkimpy's.  Anything else keeps dkimpy's own parser
# (tests/filters/test_dkim.py checks they agree).  Used by DKIM and ARC.
_slow_rfc822_parse = dkim.rfc822_parse
_HEADER_NAME = re.compile(rb"([\x21-\x7e]+?):")


def _rfc822_parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
    if message.count(b"\n") != message.count(b"\r\n"):
        return _slow_rfc822_parse(message)  # type: ignore[no-any-return]
    if message.startswith(b"\r\n"):  # no header at all
        return [], message[2:]
    end = message.find(b"\r\n\r\n")
    if end < 0:  # no body: every line is a header line (a final CRLF ends the last one)
        lines = message.split(b"\r\n")
        if not lines[-1]:
            lines.pop()
        body = b""
    else:
        lines = message[:end].split(b"\r\n")
        body = message[end + 4 :]
    headers: list[list[bytes]] = []
    for line in lines:  # dkimpy's loop
        if line[0] in (0x09, 0x20):
            headers[-1][1] += line + b"\r\n"
        else:
            m = _HEADER_NAME.match(line)
            if m is not None:
                headers.append([m.group(1), line[m.end(0) :] + b"\r\n"])
            elif line.startswith(b"From "):
                pass
            else:
                raise dkim.MessageFormatError(f"Unexpected characters in RFC822 header: {line!r}")
    return headers, body


dkim.rfc822_parse = _rfc822_parse


# dkimpy parses every DKIM-Signature (and ARC field) tag list with a pattern
# string per tag (a cache lookup in the re module for each of a dozen tags); the
# same rules with bytes methods: a tag name starts with an ASCII letter
# (tests/filters/test_dkim.py checks they agree, errors included).
_slow_parse_tag_value = dkim.util.parse_tag_value


def _parse_tag_value(tag_list: bytes) -> dict[bytes, bytes]:
    tags: dict[bytes, bytes] = {}
    specs = tag_list.strip().split(b";")
    if not specs[-1]:  # a trailing semicolon is allowed
        specs.pop()
    for spec in specs:
        key, eq, value = spec.partition(b"=")
        key = key.strip()
        if not eq or not key[:1].isalpha():
            raise dkim.util.InvalidTagSpec(spec)
        if key in tags:
            raise dkim.util.DuplicateTag(key)
        tags[key] = value.strip()
    return tags


dkim.util.parse_tag_value = _parse_tag_value
dkim.parse_tag_value = _parse_tag_value


# dkimpy's relaxed-canonicalization helpers call re.sub with pattern strings (a
# cache lookup in the re module each time, about 20 calls per signature); the
# same substitutions on patterns compiled once (tests/filters/test_dkim.py).
_SLOW_CANONICALIZATION = {
    name: getattr(dkim.canonicalization, name)
    for name in ("strip_trailing_whitespace", "compress_whitespace", "unfold_header_value")
}
_TRAILING_WSP = re.compile(b"[\t ]+\r\n")
_WSP = re.compile(b"[\t ]+")
_LINE_END = re.compile(b"\r?\n")


# Both run over the whole body for relaxed body canonicalization (the common c=
# relaxed/relaxed: ~75 us on a 4 KiB text body, where a space starts a try at every
# word); a body with no whitespace before a line end, or no tab and no double space,
# comes out unchanged, which a substring search (C, ~1 us) tells.
def _strip_trailing_whitespace(content: bytes) -> bytes:
    if b" \r\n" not in content and b"\t\r\n" not in content:
        return content
    return _TRAILING_WSP.sub(b"\r\n", content)


def _compress_whitespace(content: bytes) -> bytes:
    if b"\t" not in content and b"  " not in content:
        return content
    return _WSP.sub(b" ", content)


def _unfold_header_value(content: bytes) -> bytes:
    return _LINE_END.sub(b"", content)


# Relaxed header canonicalization (RFC 6376 §3.4.2) of every header field, twice
# per signature: a field on one line (its only LF ends it) without tabs or double
# spaces needs no substitution at all.
_slow_relaxed_headers = dkim.canonicalization.Relaxed.canonicalize_headers


def _relaxed_headers(headers: list[Any]) -> list[tuple[bytes, bytes]]:
    out = []
    for name, value in headers:
        if value.endswith(b"\r\n") and value.count(b"\n") == 1:
            value = value[:-2]
            if b"\t" in value or b"  " in value:
                value = _WSP.sub(b" ", value)
        else:
            value = _WSP.sub(b" ", _LINE_END.sub(b"", value))
        out.append((name.lower().rstrip(), value.strip() + b"\r\n"))
    return out


# dkimpy removes the b= value of the signature field with a pattern that enters a
# group for each of its ~350 characters (FWS before each one; about 28 us).  Its
# FWS, ``(?:(?:\s*\r?\n)?\s+)?``, matches exactly the runs of whitespace, so the
# value is the longest run of whitespace and base64 characters that ends with a
# base64 character: the same matches (tests/filters/test_dkim.py).
_SLOW_BTAG = dkim.RE_BTAG
_BTAG = re.compile(rb"([;\s]b\s*=)(?:[\sa-zA-Z0-9+/=]*[a-zA-Z0-9+/=])?(?:\r?\n\Z)?")
dkim.RE_BTAG = _BTAG
dkim.canonicalization.Relaxed.canonicalize_headers = staticmethod(_relaxed_headers)  # type: ignore[method-assign]
dkim.canonicalization.strip_trailing_whitespace = _strip_trailing_whitespace
dkim.canonicalization.compress_whitespace = _compress_whitespace
dkim.canonicalization.unfold_header_value = _unfold_header_value


class DKIMOptions(Section):
    """Keys of ``filter = "dkim"``."""

    max_signatures: int = option(integer(1, 50), 5)
    max_size: int = option(size, 20 * 1024 * 1024)
    min_key_bits: int = option(integer(512, 16384), 1024)
    # What a message with signatures but no passing one gets (DMARC decides policy).
    fail: str = option(action_kind, "ignore")


@dataclass(frozen=True)
class SignatureResult:
    result: str
    domain: str
    selector: str
    identity: str
    algorithm: str
    b: str
    comment: str
    body_length: int | None = None  # l= when present


def txt_lookup(
    resolver: Any,
    state: dict[str, Any],
    fetched: Mapping[str, Any] | None = None,
    inline: bool = False,
) -> Callable[..., bytes | None]:
    """dkimpy's ``dnsfunc``: the joined TXT strings of ``name``, None when there are none.

    ``fetched``: answers (or TemporaryFailures) already looked up, by name.
    ``inline``: on the reactor: a name neither fetched nor cached, which would
    need a blocking lookup, or a costly key raises NeedsThread.
    """

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        text = name.decode("ascii", "replace").rstrip(".")
        try:
            answer = fetched.get(text) if fetched else None
            if isinstance(answer, TemporaryFailure):
                raise answer
            if answer is None:
                answer = cached_answer(resolver, text, "TXT")
            if answer is None:
                if inline:
                    raise NeedsThread(f"key {text} not looked up yet")
                answer = resolver.lookup_blocking(text, "TXT")
        except TemporaryFailure as exc:
            state["temporary"] = str(exc)
            raise dkim.DnsTimeoutError(str(exc)) from None
        for record in answer.records:
            return b"".join(record.strings)  # type: ignore[no-any-return]
        state["missing"] = True
        return None

    dnsfunc.inline = inline  # type: ignore[attr-defined]  # read by _load_pk_from_dns
    return dnsfunc


def _text(value: bytes | None) -> str:
    return (value or b"").decode("ascii", "replace")


# The s= and d= tags of a DKIM-Signature (RFC 6376 §3.2 tag-list), found without
# dkimpy's full tag parser: only to look keys up early; dkimpy parses the field
# itself when it verifies, and a name found here that it does not ask for only
# costs a lookup.
_KEY_TAG = re.compile(rb"(?:^|;)\s*([sd])\s*=\s*([^;]*)")


def key_names(message: Any, limit: int) -> list[str]:
    """The key record names (``s._domainkey.d``) of the message's first ``limit`` signatures."""
    names: list[str] = []
    for value in message.header("DKIM-Signature")[:limit]:
        tags: dict[bytes, bytes] = {}
        for match in _KEY_TAG.finditer(value):
            tags.setdefault(match.group(1), b"".join(match.group(2).split()))
        selector, domain = tags.get(b"s"), tags.get(b"d")
        if selector and domain:
            name = (selector + b"._domainkey." + domain).decode("ascii", "replace").rstrip(".")
            if name not in names:
                names.append(name)
    return names


_H_TAG = re.compile(rb"(?:^|;)\s*h\s*=([^;]*)")

# dkimpy finds the fields an h= tag names by scanning the header section backwards
# for each name (dkim.select_headers): work up to (names in h=) x (header fields),
# which a small message can push into the millions (thousands of names that are no
# field).  Above this much, the verification goes to the pool (~1 ms of such scanning).
INLINE_SELECTION_WORK = 20_000


def selection_work(message: Any, field: str, limit: int) -> int:
    """The scanning dkimpy's header selection may do for the first ``limit`` ``field``s."""
    names = 0
    for value in message.header(field)[:limit]:
        for match in _H_TAG.finditer(value):
            names += match.group(1).count(b":") + 1
    return names * len(message.headers)


def check_inline(message: Any, field: str, limit: int) -> None:
    """NeedsThread unless the signatures ``field`` (DKIM-Signature, ARC-Message-Signature)
    of ``message`` may be verified on the reactor: a small message held in memory whose
    first ``limit`` such fields have h= tags cheap to resolve."""
    if not in_memory(message):
        raise NeedsThread("message on disk")
    if selection_work(message, field, limit) > INLINE_SELECTION_WORK:
        raise NeedsThread("long h= tags over many header fields")


def fetch_keys(resolver: Any, names: list[str]) -> Any:
    """Deferred of ``{name: DNSAnswer | TemporaryFailure}`` for the key records not cached.

    None when every one is cached (the job reads them from the cache).  Any
    other failure leaves the name out: the job looks it up itself.
    """
    missing = [name for name in names if cached_answer(resolver, name, "TXT") is None]
    if not missing:
        return None
    keys: dict[str, Any] = {}

    def store(answer: Any, name: str) -> None:
        keys[name] = answer

    def failed(failure: Any, name: str) -> None:
        if failure.check(TemporaryFailure):
            keys[name] = failure.value

    lookups = [
        resolver.lookup(name, "TXT", dnssec=False).addCallbacks(
            store, failed, callbackArgs=(name,), errbackArgs=(name,)
        )
        for name in missing
    ]
    return gather(lookups).addCallback(lambda _: keys)


# At most this many signatures are verified on the reactor (more go to the pool).
INLINE_SIGNATURES = 3


def verify_message(
    raw: bytes,
    resolver: Any,
    max_signatures: int,
    min_key_bits: int,
    fetched: Mapping[str, Any] | None = None,
    deadline: float | None = None,
) -> list[SignatureResult]:
    """Verify every DKIM-Signature of ``raw`` (blocking: run in the crypto pool).

    ``deadline`` (time.monotonic): an inline attempt on the reactor, which
    raises NeedsThread rather than look a key up, verify with a costly key,
    verify more than INLINE_SIGNATURES signatures or go on past it.
    """
    try:
        verifier = dkim.DKIM(raw, minkey=min_key_bits)
    except dkim.DKIMException as exc:
        return [SignatureResult("permerror", "", "", "", "", "", f"unparsable message: {exc}")]
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    inline = deadline is not None
    if inline and min(count, max_signatures) > INLINE_SIGNATURES:
        raise NeedsThread(f"{count} signatures")
    results = []
    for idx in range(count):
        if idx >= max_signatures:
            results.append(SignatureResult("neutral", "", "", "", "", "", "signature limit"))
            continue
        if deadline is not None and time.monotonic() >= deadline:
            raise NeedsThread("inline budget spent")
        results.append(_verify_one(verifier, idx, resolver, fetched, inline))
    return results


def _verify_one(
    verifier: Any,
    idx: int,
    resolver: Any,
    fetched: Mapping[str, Any] | None,
    inline: bool = False,
) -> SignatureResult:
    state: dict[str, Any] = {}
    verifier.signature_fields = {}
    try:
        ok = verifier.verify(idx, txt_lookup(resolver, state, fetched, inline))
        error = ""
    except dkim.ValidationError as exc:
        ok, error = False, str(exc)
    except dkim.DKIMException as exc:
        ok, error = None, str(exc)
    sig = verifier.signature_fields or {}
    domain, selector = _text(sig.get(b"d")), _text(sig.get(b"s"))
    algorithm = _text(sig.get(b"a"))
    b_value = re.sub(r"\s+", "", _text(sig.get(b"b")))
    identity = _text(sig.get(b"i")) or f"@{domain}"
    length = int(sig[b"l"]) if b"l" in sig and sig[b"l"].isdigit() else None

    def make(result: str, comment: str) -> SignatureResult:
        return SignatureResult(
            result, domain, selector, identity, algorithm, b_value, comment, length
        )

    if ok is None:
        return make("permerror", error or "bad signature")
    if "temporary" in state:
        return make("temperror", "key lookup failed")
    if not ok:
        if "missing" in state:
            return make("permerror", "no key for signature")
        return make("fail", error or "signature verification failed")
    if length is not None:
        canon = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        body = canon.canonicalize_body(verifier.body)
        if length < len(body):
            return make("policy", f"l={length} covers {length} of {len(body)} body bytes")
    return make("pass", f"{_key_kind(algorithm)} key")


def _key_kind(algorithm: str) -> str:
    return "ed25519" if algorithm.startswith("ed25519") else "rsa"


def as_method_result(sig: SignatureResult) -> MethodResult:
    """RFC 8601 resinfo with header.d/s/i/a and header.b (RFC 6008: first 8 characters)."""
    props = []
    if sig.domain:
        props.append(("header.d", sig.domain))
        props.append(("header.i", sig.identity))
        props.append(("header.s", sig.selector))
        props.append(("header.a", sig.algorithm))
        if sig.b:
            props.append(("header.b", sig.b[:8]))
    return MethodResult("dkim", sig.result, props, sig.comment)


@implementer(IMessageFilter)
class DKIMFilter(FilterBase):
    """Verify all DKIM signatures of the message; results go to Authentication-Results."""

    name = "dkim"
    default_timeout = 30.0

    def __init__(self, options: Mapping[str, Any] | None = None, service: Any = None) -> None:
        super().__init__(options, service)
        self.config = load_options(DKIMOptions, self.options)
        self.resolver = resolver_for(service)
        self.threads = service.threads

    def _verify_file(
        self, message: Any, fetched: Mapping[str, Any] | None = None
    ) -> list[SignatureResult]:
        with message.open() as f:
            raw = f.read()
        return verify_message(
            raw, self.resolver, self.config.max_signatures, self.config.min_key_bits, fetched
        )

    def _verify_inline(
        self, message: Any, fetched: Mapping[str, Any] | None, deadline: float
    ) -> list[SignatureResult]:
        """The verification on the reactor, for a small message held in memory."""
        limit = min(self.config.max_signatures, INLINE_SIGNATURES + 1)
        check_inline(message, "DKIM-Signature", limit)
        with message.open() as f:
            raw = f.read()
        return verify_message(
            raw,
            self.resolver,
            self.config.max_signatures,
            self.config.min_key_bits,
            fetched,
            deadline,
        )

    def _job(self, message: Any, fetched: Mapping[str, Any] | None = None) -> Job:
        return Job(
            functools.partial(self._verify_file, message, fetched),
            functools.partial(self._verify_inline, message, fetched),
        )

    def message_job(self, session: Any, envelope: Any, message: Any) -> Any:
        """The verification, for the chain's jobs of the message (common.start_jobs).

        Keys not in the cache are looked up on the reactor first (a Deferred
        of the job), so the job does not block a thread on DNS; with its keys
        at hand, a small message is verified on the reactor.
        """
        if not message.header("DKIM-Signature") or message.size > self.config.max_size:
            return None
        fetching = fetch_keys(self.resolver, key_names(message, self.config.max_signatures))
        if fetching is None:
            return self._job(message)
        return fetching.addCallback(lambda keys: self._job(message, keys))

    def check_message(self, session: Any, envelope: Any, message: Any) -> Any:
        results = results_for(session, envelope)
        if not message.header("DKIM-Signature"):
            results.dkim.append(MethodResult("dkim", "none"))
            return CONTINUE
        if message.size > self.config.max_size:
            results.dkim.append(MethodResult("dkim", "neutral", comment="message too large"))
            return CONTINUE
        job = prepared(session, envelope, self.name)
        if job is None:
            job = self.threads.run("crypto", self._verify_file, message)
        return then(job, self._verdict, results)

    def _verdict(self, signatures: list[SignatureResult], results: Any) -> Verdict:
        for sig in signatures:
            results.dkim.append(as_method_result(sig))
            if sig.result == "pass" and sig.domain:
                results.dkim_pass_domains.append(sig.domain.lower())
        if results.dkim_pass_domains:
            return CONTINUE
        reason = "no valid DKIM signature"
        return outcome(
            self.config.fail, reason, (550, "5.7.20", reason), (), results.quarantine.append
        )


def public_key_record(public_der_or_raw: bytes, key_type: str = "rsa") -> str:
    """The TXT value to publish for a key (RFC 6376 §3.6.1): ``v=DKIM1; k=...; p=...``."""
    return f"v=DKIM1; k={key_type}; p={base64.b64encode(public_der_or_raw).decode('ascii')}"
