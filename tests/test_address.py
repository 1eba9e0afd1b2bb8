"""RFC 5321/5322/6531 address parsing (mailserv.address)."""

from __future__ import annotations

import pytest

from mailserv.address import (
    Address,
    AddressError,
    normalise_domain,
    parse_header_addresses,
    parse_mailbox,
    parse_params,
    parse_path,
    quote_local,
    split_detail,
    xtext_decode,
    xtext_encode,
)


def test_simple_path_and_params() -> None:
    addr, rest = parse_path("<User@Example.ORG> SIZE=10 BODY=8BITMIME")
    assert addr == Address("User", "example.org", "example.org")
    assert addr.key == "user@example.org"
    assert parse_params(rest) == {"SIZE": "10", "BODY": "8BITMIME"}


def test_null_path() -> None:
    assert parse_path("<>") == (None, "")


def test_source_route_is_ignored() -> None:
    addr, _ = parse_path("<@relay.example,@other.example:user@final.example>")
    assert addr is not None and addr.key == "user@final.example"


def test_quoted_local_part_is_unquoted() -> None:
    addr, _ = parse_path('<"john.doe"@example.org>')
    assert addr is not None and addr.local == "john.doe" and str(addr) == "john.doe@example.org"
    addr, _ = parse_path('<"a b@c"@example.org>')
    assert addr is not None and addr.local == "a b@c"
    assert str(addr) == '"a b@c"@example.org'
    assert quote_local('a"b') == '"a\\"b"'


@pytest.mark.parametrize(
    "path",
    [
        "user@example.org",  # no brackets
        "<user@example.org.>",  # trailing dot (RFC 5321 Domain)
        "<user@.example.org>",
        "<user@exa_mple.org>",
        "<user..x@example.org>",
        "<.user@example.org>",
        "<user@>",
        "<@example.org>",
        "<user>",
        "<user@[300.1.1.1]>",
        "<user@example.org",
        "<user@example.org>x",
        "<" + "a" * 65 + "@example.org>",
        '<"unterminated@example.org>',
    ],
)
def test_bad_paths(path: str) -> None:
    with pytest.raises(AddressError):
        parse_path(path)


def test_address_literals() -> None:
    addr, _ = parse_path("<u@[192.0.2.1]>")
    assert addr is not None and addr.domain == "[192.0.2.1]" and addr.is_literal
    addr, _ = parse_path("<u@[IPv6:2001:DB8:0:0::1]>")
    assert addr is not None and addr.domain == "[IPv6:2001:db8::1]"


def test_idn_domains_normalise_to_a_labels() -> None:
    assert normalise_domain("Bücher.Example") == ("xn--bcher-kva.example", "bücher.example")
    assert normalise_domain("XN--BCHER-KVA.example") == ("xn--bcher-kva.example", "bücher.example")
    with pytest.raises(AddressError):
        normalise_domain("bücher.example", allow_utf8=False)


def test_smtputf8_local_parts() -> None:
    with pytest.raises(AddressError):
        parse_path("<jörg@example.org>", allow_utf8=False)
    addr, _ = parse_path("<jörg@bücher.example>")
    assert addr is not None and addr.needs_smtputf8
    assert addr.display() == "jörg@bücher.example"
    assert not parse_mailbox("a@example.org").needs_smtputf8


def test_params() -> None:
    assert parse_params("SMTPUTF8 RET=HDRS") == {"SMTPUTF8": None, "RET": "HDRS"}
    for bad in ("SIZE=1 SIZE=2", "=x", "K=", "K=a=b", "-K=1"):
        with pytest.raises(AddressError):
            parse_params(bad)


def test_xtext() -> None:
    assert xtext_decode("a+2Bb+3Dc") == "a+b=c"
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    for bad in ("a+2", "a+zz", "a=b"):
        with pytest.raises(AddressError):
            xtext_decode(bad)


def test_split_detail() -> None:
    assert split_detail("user+lists") == ("user", "lists")
    assert split_detail("user+") == ("user", None)
    assert split_detail("+x") == ("+x", None)
    assert split_detail("user+a+b") == ("user", "a+b")
    assert split_detail("user-x", "-") == ("user", "x")
    assert split_detail("user+x", "") == ("user+x", None)


def test_header_addresses() -> None:
    got = parse_header_addresses('"Doe, John" <john@example.org>, jane@Example.org, broken@')
    assert [a.key for a in got] == ["john@example.org", "jane@example.org"]
