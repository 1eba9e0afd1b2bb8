"""The objects one SMTP session passes down: Session, Envelope, Recipient, Message.

A Session lives as long as the connection; an Envelope is one transaction
(MAIL FROM ... end of data); a Message is the spooled body on disk.  Filters
and delivery targets read them; they never keep them after the transaction.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from mailserv.address import Address


@dataclass
class Session:
    """One SMTP connection: who the client is and what it has proven."""

    id: str
    listener: str
    protocol: str  # "smtp" | "submission"
    peer_host: str
    peer_port: int = 0
    helo: str | None = None
    esmtp: bool = False
    tls_version: str | None = None
    tls_cipher: str | None = None
    auth_user: str | None = None
    local_host: str = ""
    connected_at: float = field(default_factory=time.time)
    # Free-form notes filters may share within a connection (e.g. DNSBL result).
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def tls(self) -> bool:
        return self.tls_version is not None

    @property
    def is_loopback(self) -> bool:
        import ipaddress

        try:
            return ipaddress.ip_address(self.peer_host).is_loopback
        except ValueError:
            return False


@dataclass(eq=False)
class Recipient:
    """One RCPT TO with its DSN parameters (RFC 3461 §4.1, §4.2)."""

    address: Address
    notify: tuple[str, ...] | None = None  # ("NEVER",) or subset of SUCCESS/FAILURE/DELAY
    orcpt: str | None = None  # "rfc822;addr" as given (xtext-decoded)
    # Filled by the router/recipient filter: where this recipient's mail goes.
    route: Any = None

    def __str__(self) -> str:
        return str(self.address)


@dataclass
class Envelope:
    """One transaction: the sender, its parameters and the accepted recipients."""

    id: str
    mail_from: Address | None  # None: the null reverse-path <>
    size: int | None = None  # RFC 1870 SIZE= declared by the client
    body: str = "7BIT"  # 7BIT | 8BITMIME (RFC 6152)
    smtputf8: bool = False  # RFC 6531
    ret: str | None = None  # RFC 3461 RET=FULL|HDRS
    envid: str | None = None  # RFC 3461 ENVID (xtext-decoded)
    auth: str | None = None  # RFC 4954 AUTH= parameter of MAIL
    requiretls: bool = False  # RFC 8689 REQUIRETLS: relay only over verified TLS
    recipients: list[Recipient] = field(default_factory=list)
    # Headers filters ask to add, in order, as (name, value) text.
    add_headers: list[tuple[str, str]] = field(default_factory=list)
    # Headers a submission server adds below its Received (RFC 6409 §8: Date, Message-ID, Sender).
    msa_headers: list[tuple[str, str]] = field(default_factory=list)
    quarantine: str | None = None  # reason, when a filter quarantined the message
    verdicts: list[str] = field(default_factory=list)  # "filter:action" for the log
    started_at: float = field(default_factory=time.time)

    @property
    def sender(self) -> str:
        """The reverse-path as text, '' for <>."""
        return "" if self.mail_from is None else str(self.mail_from)


@dataclass
class Message:
    """A received message (the exact bytes, unstuffed, CRLF lines): in memory or spooled.

    ``headers`` is the parsed header section (name, raw value without the
    final CRLF); ``prefix`` are header lines the server adds in front of the
    stored message (Received, Date/Message-ID on submission, filter headers).
    """

    path: str | None  # None: the message is small and held in ``data``
    size: int
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    prefix: bytes = b""
    data: bytes | None = None
    # Every line end is CRLF (SMTP refuses bare CR and LF): a store reading it may take
    # the CRLF size to be the size instead of counting line ends (``crlf_only`` below).
    crlf: bool = False
    # Where the message starts in ``path`` (a queue entry's file begins with its envelope).
    offset: int = 0
    # ``headers`` by lowercased name, built at the first ``header`` call (a dozen per message
    # with a pipeline) and again when ``headers`` is replaced or grows.
    _by_name: tuple[Any, int, dict[str, list[bytes]]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def open(self) -> BinaryIO:
        """The bytes, from the start; marked ``crlf_only = True`` when ``crlf``."""
        source: Any = io.BytesIO(self.data or b"") if self.path is None else open(self.path, "rb")
        if self.offset:
            source.seek(self.offset)
        if self.crlf:
            source.crlf_only = True
        return source  # type: ignore[no-any-return]

    def header(self, name: str) -> list[bytes]:
        """The values of every header called ``name`` (case-insensitive), in order."""
        index = self._by_name
        if index is None or index[0] is not self.headers or index[1] != len(self.headers):
            by_name: dict[str, list[bytes]] = {}
            for hname, value in self.headers:
                by_name.setdefault(hname.lower(), []).append(value)
            index = self._by_name = (self.headers, len(self.headers), by_name)
        return list(index[2].get(name.lower(), ()))

    def iter_chunks(self, size: int = 65536) -> Iterator[bytes]:
        """The prefix then the spooled bytes, in chunks."""
        if self.prefix:
            yield self.prefix
        with self.open() as f:
            while chunk := f.read(size):
                yield chunk

    def discard(self) -> None:
        self.data = None
        if self.path is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def parse_header_section(data: bytes) -> list[tuple[str, bytes]]:
    """Split an RFC 5322 §2.2 header section into (name, unfolded raw value).

    Lines that are not ``name: value`` nor continuations are ignored here;
    the headers filter reports them.
    """
    out: list[tuple[str, bytes]] = []
    for line in data.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if out:
                name, value = out[-1]
                out[-1] = (name, value + b"\r\n" + line)
            continue
        raw_name, colon, value = line.partition(b":")
        raw_name = raw_name.strip(b" ")
        if not colon or not raw_name or b" " in raw_name or not raw_name.isascii():
            continue
        out.append((raw_name.decode("ascii"), value.lstrip(b" \t")))
    return out
