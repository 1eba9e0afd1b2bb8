"""SASLprep (RFC 4013), the Normalize() of SCRAM passwords (RFC 5802 §2.2).

Only the "query" profile is needed (unassigned code points allowed), since
it is applied to passwords being checked as well as new ones.
"""

from __future__ import annotations

import stringprep
import unicodedata

_PROHIBITED = (
    stringprep.in_table_c12,
    stringprep.in_table_c21_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
)


def saslprep(value: str) -> str:
    """The prepared string; ValueError for prohibited characters or bad bidi (RFC 4013 §2)."""
    # §2.1 mapping: non-ASCII spaces to SPACE, "commonly mapped to nothing" removed.
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in value if not stringprep.in_table_b1(c)
    )
    # §2.2 normalisation: Unicode NFKC.
    prepared = unicodedata.normalize("NFKC", mapped)
    # §2.3 prohibited output.
    for c in prepared:
        if any(table(c) for table in _PROHIBITED):
            raise ValueError(f"prohibited character U+{ord(c):04X}")
    # §2.4 bidirectional characters (RFC 3454 §6).
    if any(stringprep.in_table_d1(c) for c in prepared):
        if any(stringprep.in_table_d2(c) for c in prepared):
            raise ValueError("mixed right-to-left and left-to-right text")
        if not (stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])):
            raise ValueError("right-to-left text must start and end with such a character")
    return prepared


def normalize_password(password: bytes) -> bytes:
    """SASLprep'd UTF-8 password for SCRAM; left as is when it is not valid UTF-8 or prohibited."""
    try:
        return saslprep(password.decode("utf-8")).encode("utf-8")
    except (UnicodeDecodeError, ValueError):
        return password
