"""FETCH items from the RFC text: BINARY with an unknown transfer encoding (RFC 3516
section 4.3) and ENVELOPE address groups (RFC 3501 section 7.4.2)."""

from __future__ import annotations

from tests.imap.harness import Env


def _one(raw: bytes) -> tuple[Env, object]:
    env = Env()
    env.deliver(raw)
    return env, env.selected_session()


UUENCODED = (
    b"Subject: u\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 f\r\n#86)C\r\n`\r\nend\r\n"
)


def test_binary_of_an_unknown_transfer_encoding_is_unknown_cte():
    """RFC 3516 section 4.3: a server that cannot decode the encoding answers a tagged
    NO with the UNKNOWN-CTE response code."""
    _env, s = _one(UUENCODED)
    out = s.cmd("a FETCH 1 (BINARY.PEEK[1])")  # type: ignore[attr-defined]
    assert out.endswith(b"a NO [UNKNOWN-CTE] Cannot decode the part's transfer encoding\r\n")
    assert b"BINARY[1]" not in out
    out = s.cmd("b FETCH 1 (BINARY.SIZE[1])")  # type: ignore[attr-defined]
    assert out.endswith(b"b NO [UNKNOWN-CTE] Cannot decode the part's transfer encoding\r\n")


def test_binary_of_identity_encodings_is_the_part_itself():
    raw = (
        b"Subject: u\r\nContent-Type: text/plain\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\nna\xc3\xafve\r\n"
    )
    _env, s = _one(raw)
    out = s.cmd("a FETCH 1 (BINARY.PEEK[1])")  # type: ignore[attr-defined]
    assert out == b"* 1 FETCH (BINARY[1] {8}\r\nna\xc3\xafve\r\n)\r\na OK FETCH completed\r\n"


def test_body_of_an_unknown_encoding_is_still_served_encoded():
    """BODY[] returns the octets as stored; only BINARY decodes."""
    _env, s = _one(UUENCODED)
    out = s.cmd("a FETCH 1 (BODY.PEEK[1])")  # type: ignore[attr-defined]
    assert out.endswith(b"a OK FETCH completed\r\n") and b"begin 644 f" in out


def test_envelope_renders_groups():
    """RFC 3501 section 7.4.2: a group is (NIL NIL "name" NIL) before its members and
    (NIL NIL NIL NIL) after them."""
    raw = (
        b"From: Alice <alice@example.test>\r\n"
        b"To: Team: bob@example.test, Carol <carol@example.test>;, dave@example.test\r\n"
        b"Cc: undisclosed-recipients:;\r\n"
        b"Subject: groups\r\n\r\nbody\r\n"
    )
    _env, s = _one(raw)
    out = s.cmd("a FETCH 1 (ENVELOPE)")  # type: ignore[attr-defined]
    assert out == (
        b'* 1 FETCH (ENVELOPE (NIL "groups" '
        b'(("Alice" NIL "alice" "example.test")) (("Alice" NIL "alice" "example.test")) '
        b'(("Alice" NIL "alice" "example.test")) '
        b'((NIL NIL "Team" NIL)(NIL NIL "bob" "example.test")("Carol" NIL "carol" "example.test")'
        b'(NIL NIL NIL NIL)(NIL NIL "dave" "example.test")) '
        b'((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL)) '
        b"NIL NIL NIL))\r\na OK FETCH completed\r\n"
    )


def test_fetch_flags_of_runs_and_scattered_messages():
    """FETCH n:m (FLAGS) and a scattered set give the same lines, numbered by sequence."""
    env = Env()
    for n in range(1, 6):
        env.deliver(b"Subject: %d\r\n\r\nx\r\n" % n, flags=["\\Seen"] if n % 2 else [])
    s = env.selected_session()
    expected = {
        n: b"* %d FETCH (FLAGS (%s))\r\n" % (n, b"\\Recent \\Seen" if n % 2 else b"\\Recent")
        for n in range(1, 6)
    }
    assert s.cmd("a FETCH 2:4 (FLAGS)") == b"".join(expected[n] for n in (2, 3, 4)) + (
        b"a OK FETCH completed\r\n"
    )
    assert s.cmd("b FETCH 1,3,5 (FLAGS)") == b"".join(expected[n] for n in (1, 3, 5)) + (
        b"b OK FETCH completed\r\n"
    )
    assert s.cmd("c UID FETCH 4:* (FLAGS)") == (
        b"* 4 FETCH (UID 4 FLAGS (\\Recent))\r\n* 5 FETCH (UID 5 FLAGS (\\Recent \\Seen))\r\n"
        b"c OK FETCH completed\r\n"
    )
