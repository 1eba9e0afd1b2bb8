"""Byte-stuffing of message content for RETR and TOP (RFC 1939 §3).

Twisted's POP3 stuffs each 16 KiB chunk on its own, so a "." line that
starts right at a chunk boundary goes out unstuffed and ends the response
early: the rest of the message is then read by the client as further
responses (ARCHITECTURE.md defect 1).  ``Stuffer`` keeps the state that
crosses chunk boundaries (start of line, a CR waiting for its LF) and gives
the same bytes whatever the chunking.
"""

from __future__ import annotations


class Stuffer:
    """Turns message bytes into the multi-line response body.

    Line ends become CRLF, every line that starts with "." gets one more
    (RFC 1939 §3), and ``finish`` returns the termination octets ("." CRLF,
    preceded by a CRLF when the message does not end with one).

    With ``body_lines`` set it implements TOP (RFC 1939 §7): the header, the
    blank line and at most that many lines of the body; ``done`` turns true
    once they have been produced, and further input is ignored.
    """

    def __init__(self, body_lines: int | None = None) -> None:
        self._at_line_start = True
        self._pending_cr = False
        self._body_lines = body_lines
        self._in_body = False
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        """Transform the next chunk of the message."""
        if self.done or not chunk:
            return b""
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            # A CR at the end may be the first half of a CRLF split across chunks.
            self._pending_cr = True
            chunk = chunk[:-1]
            if not chunk:
                return b""
        data = chunk.replace(b"\r\n", b"\n")
        if self._body_lines is not None:
            data = self._limit(data)
        if not data:
            return b""
        out = data.replace(b"\n", b"\r\n").replace(b"\n.", b"\n..")
        if self._at_line_start and out.startswith(b"."):
            out = b"." + out
        self._at_line_start = out.endswith(b"\n")
        return out

    def _limit(self, data: bytes) -> bytes:
        """Cut ``data`` (LF line ends) after the header and ``body_lines`` body lines."""
        assert self._body_lines is not None
        pos = 0
        at_start = self._at_line_start
        while pos < len(data):
            if not self._in_body:
                if at_start and data.startswith(b"\n", pos):
                    # The empty line that ends the header (RFC 5322 §2.1).
                    self._in_body = True
                    if self._body_lines == 0:
                        self.done = True
                        return data[: pos + 1]
                    pos += 1
                    at_start = True
                    continue
            nl = data.find(b"\n", pos)
            if nl < 0:
                return data
            pos = nl + 1
            at_start = True
            if self._in_body:
                self._body_lines -= 1
                if self._body_lines == 0:
                    self.done = True
                    return data[:pos]
        return data

    def finish(self) -> bytes:
        """The end of the response: any held CR, a CRLF if needed, then "." CRLF."""
        out = b""
        if self._pending_cr and not self.done:
            self._pending_cr = False
            out = b"\r"
            self._at_line_start = False
        if not self._at_line_start:
            out += b"\r\n"
        self._at_line_start = True
        return out + b".\r\n"


def stuff(message: bytes, body_lines: int | None = None) -> bytes:
    """The whole multi-line body of a RETR (or TOP) response for ``message``."""
    if body_lines is None:
        return b"".join(stuff_parts(message))
    s = Stuffer(body_lines)
    return s.feed(message) + s.finish()


def stuff_parts(message: bytes) -> tuple[bytes, bytes]:
    """RETR's multi-line body of a whole message as (stuffed content, termination octets).

    The same bytes as ``Stuffer`` (whatever the chunking) in at most four passes
    over the message, most often two counts and one search: a message with
    CRLF line ends only is not copied unless it has a line starting with ".".
    """
    data = message
    if data.count(b"\n") != data.count(b"\r\n"):  # bare LF: line ends become CRLF
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if b"\n." in data:
        data = b"\n..".join(data.split(b"\n."))  # faster than replace() for a 2-octet pattern
    if data.startswith(b"."):
        data = b"." + data
    if not data or data.endswith(b"\n"):
        return data, b".\r\n"
    return data, b"\r\n.\r\n"
