"""MIME nesting and parts limits (mailserv/smtp/mime.py)."""

from __future__ import annotations

import io
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

from mailserv.smtp.mime import check_structure


def _nested(depth: int) -> bytes:
    inner: MIMEMultipart | MIMEText = MIMEText("leaf")
    for i in range(depth):
        outer = MIMEMultipart(boundary=f"b{i}")
        outer.attach(inner)
        inner = outer
    return inner.as_bytes().replace(b"\n", b"\r\n")


def _lines(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)


def test_plain_and_ordinary_multipart() -> None:
    assert check_structure(_lines(b"Subject: x\r\n\r\n--not-a-boundary\r\nbody\r\n")) == ""
    assert check_structure(_lines(_nested(3))) == ""


def test_nesting_limit() -> None:
    assert check_structure(_lines(_nested(100)), max_depth=100) == ""
    assert check_structure(_lines(_nested(101)), max_depth=100) == "nesting"


def test_parts_limit() -> None:
    msg = MIMEMultipart(boundary="xyz")
    for _ in range(30):
        msg.attach(MIMEText("p"))
    data = msg.as_bytes().replace(b"\n", b"\r\n")
    assert check_structure(_lines(data), max_parts=30) == ""
    assert check_structure(_lines(data), max_parts=29) == "parts"


def test_folded_content_type_and_quoted_boundary() -> None:
    data = (
        b'Content-Type: multipart/mixed;\r\n\tboundary="a b"\r\n\r\npreamble\r\n'
        b"--a b\r\nContent-Type: text/plain\r\n\r\none\r\n--a b\r\n\r\ntwo\r\n--a b--\r\n"
    )
    assert check_structure(_lines(data), max_parts=2) == ""
    assert check_structure(_lines(data), max_parts=1) == "parts"
