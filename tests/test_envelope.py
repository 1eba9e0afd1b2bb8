"""Session, Envelope, Message and header parsing (mailserv.envelope)."""

from __future__ import annotations

from pathlib import Path

from mailserv.address import Address
from mailserv.envelope import Envelope, Message, Recipient, Session, parse_header_section


def test_header_section_unfolds_and_skips_garbage() -> None:
    headers = parse_header_section(
        b"Subject: one\r\n two\r\nFrom:  a@b\r\nnot a header\r\nX-Empty:\r\n\r\n"
    )
    assert headers == [("Subject", b"one\r\n two"), ("From", b"a@b"), ("X-Empty", b"")]


def test_message_in_memory_and_on_disk(tmp_path: Path) -> None:
    m = Message(None, 5, [("Subject", b"x")], prefix=b"P: 1\r\n", data=b"hello")
    assert b"".join(m.iter_chunks()) == b"P: 1\r\nhello"
    assert m.header("subject") == [b"x"]
    m.discard()
    path = tmp_path / "m.eml"
    path.write_bytes(b"body")
    m2 = Message(str(path), 4)
    with m2.open() as f:
        assert f.read() == b"body"
    m2.discard()
    assert not path.exists()
    m2.discard()  # idempotent


def test_header_values_by_any_case_in_order_after_changes() -> None:
    """``header`` answers from an index of the header section; a replaced or grown
    section (forged Authentication-Results removed, a header added) is seen."""
    m = Message(None, 0, [("Received", b"a"), ("From", b"x@y"), ("received", b"b")], data=b"")
    assert m.header("RECEIVED") == [b"a", b"b"]
    assert m.header("to") == []
    m.header("from").append(b"changed by the caller")
    assert m.header("From") == [b"x@y"]
    m.headers.append(("To", b"z@y"))
    assert m.header("to") == [b"z@y"]
    m.headers = [("From", b"other@y")]
    assert m.header("from") == [b"other@y"] and m.header("received") == []


def test_session_and_envelope() -> None:
    s = Session(id="x", listener="mx", protocol="smtp", peer_host="::1")
    assert s.is_loopback and not s.tls
    assert not Session(id="y", listener="mx", protocol="smtp", peer_host="192.0.2.1").is_loopback
    env = Envelope(id="x.1", mail_from=None)
    assert env.sender == ""
    env.mail_from = Address("a", "example.org")
    assert env.sender == "a@example.org"
    r1 = Recipient(Address("b", "example.org"))
    r2 = Recipient(Address("b", "example.org"))
    assert len({r1, r2}) == 2  # recipients are distinct RCPT commands, hashed by identity
