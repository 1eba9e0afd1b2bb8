"""Receiving message data: bulk scanning of DATA/BDAT input, streamed to a spool file.

``DataSink`` takes the raw bytes after ``354`` (or of BDAT chunks) in
whatever pieces TCP delivers, and works on whole buffers, not one callback
per line: it finds the end of data (only ``CRLF.CRLF``, RFC 5321 §4.1.1.4),
removes dot-stuffing (§4.5.2), detects bare CR and bare LF (never end of
data; the message is refused, SMTP smuggling CVE-2023-51764), over-long
lines (RFC 5322 §2.1.1: 998 characters), the size limit (RFC 1870) and the
header size limit, and writes the data to a file in the spool directory in
chunks.  Memory stays bounded by the input chunk plus one line.
"""

from __future__ import annotations

import os
import re
import secrets
from typing import BinaryIO

from mailserv.envelope import Message, parse_header_section
from mailserv.errors import SMTPReply

TOO_BIG = SMTPReply(552, "5.3.4", "Message size exceeds fixed limit")
HEADER_TOO_BIG = SMTPReply(552, "5.3.4", "Message header size exceeds limit")
BARE_LINE_END = SMTPReply(550, "5.5.2", "Message contains bare CR or bare LF, refused")
LINE_TOO_LONG = SMTPReply(554, "5.6.0", "Message contains a line longer than 998 characters")

_END = b"\r\n.\r\n"


def has_long_line(data: bytes, limit: int) -> bool:
    """True if a line of ``data`` (LF excluded) is longer than ``limit`` bytes.

    Checks one LF per block of ``(limit + 1) // 2`` bytes instead of looking at
    every line: a longer line always contains a whole block without an LF,
    and only then is the line around it measured.  About 2000 ``find`` calls
    per MiB of ordinary text, whatever its line lengths.
    """
    size = len(data)
    block = max(1, (limit + 1) // 2)
    find = data.find
    start = 0
    while start + block <= size:
        if find(b"\n", start, start + block) >= 0:
            start += block
            continue
        begin = data.rfind(b"\n", 0, start) + 1
        end = find(b"\n", start + block)
        if end < 0:
            end = size
        if end - begin > limit:
            return True
        start = end + 1
    return False


_BARE_CR = re.compile(rb"\r(?!\n)")
# A dot at a line start (a dot-stuffed line or the end marker).  sre finds it about
# three times faster than ``bytes.find``/``in`` (0.27 against 0.8 ms per MiB of text).
_DOT_AFTER_LF = re.compile(rb"\n\.")


def has_bare_line_end(data: bytes) -> bool:
    """True if ``data`` has a CR not followed by LF or an LF not preceded by CR.

    Without a bare CR every CR starts a CRLF pair, so there is a bare LF exactly
    when LFs outnumber CRs: one regular-expression search and two one-byte
    counts (0.9 ms per MiB; counting the two-byte CRLF alone costs 0.8).
    """
    return _BARE_CR.search(data) is not None or data.count(b"\n") != data.count(b"\r")


class DataSink:
    """Scans message data into a spool file; see the module docstring.

    ``feed(data)`` returns None while more data is expected, or the number
    of bytes of ``data`` consumed when the end of data was found (DATA mode
    only); the rest belongs to the next command.  ``finish()`` closes the file
    and returns the Message, or raises the SMTPReply that refuses it.
    """

    def __init__(
        self,
        spool_dir: str,
        max_size: int,
        max_line: int = 998,
        max_header: int = 102_400,
        dot_stuffed: bool = True,
        memory_limit: int = 128 * 1024,
    ) -> None:
        self.max_size = max_size
        self.max_header = max_header
        self.dot_stuffed = dot_stuffed
        # A line of at most max_line characters plus CR, before the LF.
        self._max_raw = max_line + 1
        self.spool_dir = spool_dir
        self.path = ""  # the spool file, named when the message outgrows memory_limit
        # Small messages stay in memory; past ``memory_limit`` they go to the spool file.
        self.memory_limit = memory_limit
        self._memory: bytearray | None = bytearray()
        self._file: BinaryIO | None = None
        self.size = 0
        self.error: SMTPReply | None = None
        self._tail = b""
        self._at_line_start = True  # the previous data ended with CRLF
        self._header = bytearray()
        self._in_header = True
        self.received = 0  # raw bytes fed (for the data rate)

    # -- scanning -----------------------------------------------------------

    def feed(self, data: bytes) -> int | None:
        """Process more raw input; see the class docstring."""
        self.received += len(data)
        old_tail = len(self._tail)
        buf = self._tail + data if self._tail else data
        dots = True  # "\n." may occur in buf (a dot-stuffed line or the end marker)
        if self.dot_stuffed:
            if self._at_line_start and buf.startswith(b".\r\n"):
                self._tail = b""
                self._region(b"")
                return 3 - old_tail
            # The end marker contains "\n.", so one search of the usual body
            # chunk rules out both the marker and dot-stuffed lines.
            dots = _DOT_AFTER_LF.search(buf) is not None
            end = buf.find(_END) if dots else -1
            if end >= 0:
                self._tail = b""
                self._region(buf[: end + 2])
                return end + 5 - old_tail
        cut = buf.rfind(b"\n")
        if cut < 0:
            region, self._tail = b"", buf
        else:
            region, self._tail = buf[: cut + 1], buf[cut + 1 :]
        if region:
            self._region(region, dots)
        if len(self._tail) > self._max_raw + 4:
            # An over-long line without its end yet: flag it, keep scanning
            # (never leave DATA mode), hold back at most the bytes that could
            # still start the end marker or be the CR of a CRLF.
            self._flag(LINE_TOO_LONG)
            keep = 4
            self._write(self._tail[:-keep], continuation=True)
            self._tail = self._tail[-keep:]
            self._at_line_start = False
        return None

    def _flag(self, reply: SMTPReply) -> None:
        if self.error is None:
            self.error = reply

    def _region(self, region: bytes, dots: bool = True) -> None:
        """Check and write complete lines (``region`` ends with LF, or is the final part).

        ``dots`` False: the caller knows that no line of ``region`` after the
        first starts with "." (nothing to unstuff).
        """
        if not region:
            return
        if has_bare_line_end(region):
            self._flag(BARE_LINE_END)
        if len(region) > self._max_raw and has_long_line(region, self._max_raw):
            self._flag(LINE_TOO_LONG)
        if self.dot_stuffed:
            if self._at_line_start and region[:1] == b".":
                region = region[1:]
            if dots and _DOT_AFTER_LF.search(region) is not None:
                region = region.replace(b"\n.", b"\n")
        self._write(region, continuation=False)
        self._at_line_start = region.endswith(b"\r\n")

    def _write(self, data: bytes, continuation: bool) -> None:
        if self._in_header:
            self._collect_header(data)
        self.size += len(data)
        if self.size > self.max_size:
            self._flag(TOO_BIG)
        if self.error is not None:
            return
        if self._memory is not None:
            self._memory += data
            if len(self._memory) <= self.memory_limit:
                return
            self.path = os.path.join(self.spool_dir, f"{secrets.token_hex(12)}.eml")
            self._file = open(self.path, "xb", buffering=65536)
            data, self._memory = bytes(self._memory), None
        if self._file is not None:
            self._file.write(data)

    def _collect_header(self, data: bytes) -> None:
        start = max(0, len(self._header) - 3)
        self._header += data
        if self._header.startswith(b"\r\n"):
            end = 0
        else:
            end = self._header.find(b"\r\n\r\n", start)
            if end >= 0:
                end += 2
        if end >= 0:
            del self._header[end:]
            self._in_header = False
        elif len(self._header) > self.max_header:
            self._flag(HEADER_TOO_BIG)
            self._in_header = False
        if len(self._header) > self.max_header:
            self._flag(HEADER_TOO_BIG)

    # -- completion ---------------------------------------------------------

    def finish_bdat(self) -> None:
        """BDAT LAST: the data is complete; a last line without CRLF is taken as is."""
        if self._tail:
            tail, self._tail = self._tail, b""
            if tail.count(b"\r") != tail.count(b"\r\n"):
                self._flag(BARE_LINE_END)
            if len(tail) > self._max_raw:
                self._flag(LINE_TOO_LONG)
            self._write(tail, continuation=False)

    def finish(self) -> Message:
        """Close the spool file; the Message, or raise the reply refusing it."""
        f, self._file = self._file, None
        if f is not None:
            f.close()
        if self.error is not None:
            self.discard()
            raise self.error
        headers = parse_header_section(bytes(self._header))
        if self._memory is not None:
            data, self._memory = bytes(self._memory), None
            return Message(None, self.size, headers, data=data, crlf=True)
        return Message(self.path, self.size, headers, crlf=True)

    def discard(self) -> None:
        self._memory = None
        f, self._file = self._file, None
        if f is not None:
            f.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
