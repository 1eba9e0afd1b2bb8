"""SASLprep (RFC 4013 §3 examples) and its use by SCRAM."""

from __future__ import annotations

import pytest

from mailserv.auth import schemes
from mailserv.auth.saslprep import normalize_password, saslprep


@pytest.mark.parametrize(
    "given, prepared",
    [
        ("I\u00adX", "IX"),  # soft hyphen mapped to nothing
        ("user", "user"),
        ("USER", "USER"),  # case preserved
        ("\u00aa", "a"),  # NFKC
        ("\u2168", "IX"),  # NFKC
        ("a\u00a0b", "a b"),  # non-ASCII space mapped to SPACE
    ],
)
def test_rfc4013_examples(given: str, prepared: str) -> None:
    assert saslprep(given) == prepared


@pytest.mark.parametrize("given", ["\u0007", "\u0627\u0031"])  # control char; bad bidi
def test_rfc4013_errors(given: str) -> None:
    with pytest.raises(ValueError):
        saslprep(given)


def test_scram_secret_uses_the_prepared_password() -> None:
    salt = b"0123456789abcdef"
    composed = schemes.ScramSecret.derive("\u2168".encode(), "SCRAM-SHA-256", salt)
    assert composed == schemes.ScramSecret.derive(b"IX", "SCRAM-SHA-256", salt)
    assert normalize_password(b"\xff\xfe") == b"\xff\xfe"  # not UTF-8: left alone
