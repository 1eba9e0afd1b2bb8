"""The hardened SMTP client: one connection to one remote MX (RFC 5321).

Not twisted.mail.smtp.ESMTPClient: that client dot-stuffs per 16 KiB chunk so a
"." line on a chunk boundary goes out unstuffed (defect 1 of ARCHITECTURE.md)
and silently falls back to plaintext when STARTTLS is stripped (defect 7).

``SMTPClientProtocol`` is a small reply parser with one Deferred per command
(replies are matched to commands in order, which is all PIPELINING needs,
RFC 2920 §3.1) and a timer per command (RFC 5321 §4.5.3.2).  ``DotStuffer``
stuffs across any chunk boundary (RFC 5321 §4.5.2).  ``Session`` drives one
connection through greeting, EHLO/HELO, STARTTLS and any number of
transactions (connection reuse).
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

MAX_REPLY_LINE = 4096  # RFC 5321 §4.5.3.1.5 says 512; be lenient, but bounded
MAX_REPLY_LINES = 1000
_DONE = Failure(ConnectionDone())


@dataclass(frozen=True)
class Timeouts:
    """RFC 5321 §4.5.3.2 client timeouts, in seconds."""

    connect: float = 60.0
    greeting: float = 300.0
    command: float = 300.0  # EHLO, MAIL, RCPT, RSET, STARTTLS
    data_init: float = 120.0
    block: float = 180.0
    final_dot: float = 600.0
    quit: float = 10.0


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: the code and its text lines."""

    code: int
    lines: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def enhanced(self, default: str = "") -> str:
        """The RFC 3463 enhanced status code of the reply, or ``default``."""
        first = self.lines[0].split(" ", 1)[0] if self.lines else ""
        parts = first.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and first[0] in "245":
            return first
        return default

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()


class SMTPClientError(Exception):
    """A connection-level failure: timeout, lost connection, protocol violation, TLS.

    ``tls_failed``: the TLS handshake (or the EHLO right after it) failed, which
    opportunistic TLS may answer with a plaintext retry (RFC 7435 §4).
    """

    def __init__(
        self,
        message: str,
        enhanced: str = "4.4.2",
        permanent: bool = False,
        tls_failed: bool = False,
    ) -> None:
        super().__init__(message)
        self.enhanced = enhanced
        self.permanent = permanent
        self.tls_failed = tls_failed


class DotStuffer:
    """RFC 5321 §4.5.2 transparency across chunk boundaries (defect 1).

    Every line that begins with "." gets one more, wherever the chunk
    boundaries fall: the state (were we at the start of a line?) is carried
    from one chunk to the next.  Bare LF in the input is sent as CRLF so the
    peer never sees a line ending that it might take differently.
    """

    def __init__(self) -> None:
        self.at_line_start = True
        self.last_cr = False

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        # Normalise bare LF to CRLF (a CR at the end of the previous chunk counts).
        if b"\n" in chunk:
            lead_lf = chunk.startswith(b"\n") and self.last_cr
            body = chunk[1:] if lead_lf else chunk
            body = body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            chunk = (b"\n" + body) if lead_lf else body
        out = chunk.replace(b"\n.", b"\n..")
        if self.at_line_start and out.startswith(b"."):
            out = b"." + out
        self.at_line_start = out.endswith(b"\n")
        self.last_cr = out.endswith(b"\r")
        return out

    def end(self) -> bytes:
        """The end-of-data sequence, completing the last line if it was not."""
        if self.at_line_start:
            return b".\r\n"
        if self.last_cr:
            return b"\n.\r\n"
        return b"\r\n.\r\n"


class _Waiter:
    __slots__ = ("deferred", "timer", "what")

    def __init__(self, deferred: defer.Deferred[Reply], timer: Any, what: str) -> None:
        self.deferred = deferred
        self.timer = timer
        self.what = what


@implementer(IPushProducer)
class SMTPClientProtocol(Protocol):
    """Reply parsing, command/reply matching, timeouts and flow control."""

    transport: Any

    def __init__(self, reactor: Any, timeouts: Timeouts) -> None:
        self.reactor = reactor
        self.timeouts = timeouts
        self._buffer = b""
        self._lines: list[str] = []
        self._waiters: deque[_Waiter] = deque()
        self._closed: Failure | None = None
        self._paused: defer.Deferred[None] | None = None
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.on_connect: Any = None  # called at the end of connectionMade (deliver.py)
        # The greeting's timer starts when the connection does (connectionMade).
        self.greeting = self._expect("greeting", None)

    # -- Twisted callbacks -------------------------------------------------

    def connectionMade(self) -> None:
        # Writes leave at once (mailserv.net.EagerClient); a small one right behind another
        # (the next pipelined MAIL after a ".") must not wait for a delayed ACK (Nagle).
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        self.transport.registerProducer(self, True)
        for waiter in self._waiters:
            if waiter.timer is None:
                waiter.timer = self.reactor.callLater(
                    self.timeouts.greeting, self._timed_out, waiter
                )
        if self.on_connect is not None:
            self.on_connect()

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_LINE:
                    self._violation("reply line too long")
                return
            raw, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
            if len(raw) > MAX_REPLY_LINE:
                self._violation("reply line too long")
                return
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
                self._violation(f"malformed reply line {line[:80]!r}")
                return
            self._lines.append(line[4:])
            if len(self._lines) > MAX_REPLY_LINES:
                self._violation("reply has too many lines")
                return
            if len(line) > 3 and line[3] == "-":
                continue
            reply = Reply(int(line[:3]), tuple(self._lines))
            self._lines = []
            if not self._waiters:
                self._violation(f"unexpected reply {reply}")
                return
            waiter = self._waiters.popleft()
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            waiter.deferred.callback(reply)
            if self._closed is not None:
                return

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self._closed is None:
            self._closed = Failure(SMTPClientError(f"connection lost: {reason.getErrorMessage()}"))
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            waiter.deferred.errback(self._closed)
        if self._paused is not None:
            paused, self._paused = self._paused, None
            paused.callback(None)
        if not self.lost.called:
            self.lost.callback(None)

    # -- IPushProducer: the transport tells us when its buffer is full -----

    def pauseProducing(self) -> None:
        if self._paused is None:
            self._paused = defer.Deferred()

    def resumeProducing(self) -> None:
        if self._paused is not None:
            paused, self._paused = self._paused, None
            paused.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()

    # -- commands ----------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def _expect(self, what: str, timeout: float | None) -> defer.Deferred[Reply]:
        d: defer.Deferred[Reply] = defer.Deferred()
        if self._closed is not None:
            d.errback(self._closed)
            return d
        waiter = _Waiter(d, None, what)
        if timeout is not None:
            waiter.timer = self.reactor.callLater(timeout, self._timed_out, waiter)
        self._waiters.append(waiter)
        return d

    def command(self, line: str, timeout: float | None = None) -> defer.Deferred[Reply]:
        """Send one command line; Deferred[Reply] (or SMTPClientError)."""
        d = self._expect(line.split(" ", 1)[0].upper(), timeout or self.timeouts.command)
        if self._closed is None:
            self.transport.write(line.encode("utf-8") + b"\r\n")
        return d

    def commands(self, lines: Sequence[tuple[str, float]]) -> list[defer.Deferred[Reply]]:
        """Send several commands in one write (RFC 2920 PIPELINING); one Deferred each."""
        deferreds = [self._expect(line.split(" ", 1)[0].upper(), t) for line, t in lines]
        if self._closed is None:
            self.transport.write(b"".join(line.encode("utf-8") + b"\r\n" for line, _ in lines))
        return deferreds

    async def send_body(
        self, chunks: AsyncIterator[bytes], sent: Callable[[], None] | None = None
    ) -> Reply:
        """Send the message, dot-stuffed, then "."; the final reply (RFC 5321 §4.1.1.4).

        ``sent`` is called once the "." is written, before its reply: the next
        transaction may be pipelined behind it (RFC 2920 §3.1).
        """
        stuffer = DotStuffer()
        held = b""  # the last chunk goes out with the "." in one write (one segment)
        async for chunk in chunks:
            if self._closed is not None:
                break
            if held:
                await self._write_block(held)
            held = stuffer.feed(chunk)
        if self._closed is not None:
            self._closed.raiseException()
        final = self._expect("DATA", self.timeouts.final_dot)
        self.transport.write(held + stuffer.end())
        if sent is not None:
            sent()
        return await final

    async def _write_block(self, data: bytes) -> None:
        """Write message data, waiting while the transport's buffer is full (block timeout)."""
        timer = self.reactor.callLater(self.timeouts.block, self._block_timed_out)
        try:
            self.transport.write(data)
            while self._paused is not None and self._closed is None:
                await self._paused
        finally:
            if timer.active():
                timer.cancel()

    async def send_bdat(self, chunks: AsyncIterator[bytes]) -> Reply:
        """Send the message as BDAT chunks (RFC 3030 §2), pipelined; the deciding reply.

        That is the first failure among the chunk replies, else the reply to
        ``BDAT n LAST``.  Data goes as it is: BDAT needs no dot-stuffing.
        """
        waiters: list[defer.Deferred[Reply]] = []
        pending: bytes | None = None
        async for chunk in chunks:
            if self._closed is not None:
                break
            if pending is not None:
                waiters.append(self._expect("BDAT", self.timeouts.block))
                self.transport.write(b"BDAT %d\r\n" % len(pending) + pending)
                while self._paused is not None and self._closed is None:
                    await self._paused
            pending = chunk
        if self._closed is not None:
            for w in waiters:
                w.addErrback(lambda _: None)
            self._closed.raiseException()
        last = pending or b""
        waiters.append(self._expect("BDAT", self.timeouts.final_dot))
        self.transport.write(b"BDAT %d LAST\r\n" % len(last) + last)
        replies = await defer.gatherResults(waiters, consumeErrors=True).addErrback(_first_error)
        return next((r for r in replies if not r.positive), replies[-1])

    def quit(self) -> None:
        """Send QUIT and close when it is answered (or after a short wait)."""
        if self._closed is not None:
            return
        d = self.command("QUIT", self.timeouts.quit)
        d.addBoth(lambda _: self.abort())

    def abort(self) -> None:
        if self.transport is not None and self._closed is None:
            self._closed = Failure(SMTPClientError("connection closed by us"))
        if self.transport is not None:
            self.transport.abortConnection()

    def _violation(self, message: str) -> None:
        self._closed = Failure(SMTPClientError(f"protocol error: {message}"))
        self.transport.abortConnection()

    def _timed_out(self, waiter: _Waiter) -> None:
        self._closed = Failure(SMTPClientError(f"timeout waiting for the {waiter.what} reply"))
        self.transport.abortConnection()

    def _block_timed_out(self) -> None:
        self._closed = Failure(SMTPClientError("timeout sending the message data"))
        self.transport.abortConnection()


@dataclass
class Extensions:
    """What the server advertised in its EHLO reply (RFC 5321 §4.1.1.1)."""

    esmtp: bool = False
    keywords: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, reply: Reply) -> Extensions:
        keywords: dict[str, str] = {}
        for line in reply.lines[1:]:
            keyword, _, params = line.strip().partition(" ")
            if keyword:
                keywords[keyword.upper()] = params
        return cls(True, keywords)

    def __contains__(self, keyword: str) -> bool:
        return keyword.upper() in self.keywords

    @property
    def size_limit(self) -> int | None:
        value = self.keywords.get("SIZE", "")
        return int(value) if value.isdigit() and int(value) > 0 else None


@dataclass
class Transaction:
    """One message for one connection: the envelope and where the data comes from.

    ``chunks`` is called once per attempt and yields the message bytes (CRLF
    lines, not yet dot-stuffed).  ``recipients`` are (address, notify, orcpt).
    """

    sender: str
    recipients: list[tuple[str, Sequence[str] | None, str | None]]
    chunks: Any  # Callable[[], AsyncIterator[bytes]]
    size: int = 0
    body: str = "7BIT"
    smtputf8: bool = False
    envid: str | None = None
    ret: str | None = None
    requiretls: bool = False  # RFC 8689


def synthetic(code: int, enhanced: str, text: str) -> Reply:
    """A reply made up by us (no server said it), e.g. a bounce for a missing extension."""
    return Reply(code, (f"{enhanced} {text}",))


class Session:
    """One connection to one MX: greeting, EHLO/HELO, STARTTLS, then transactions.

    ``tls``: "may" (STARTTLS whenever offered, RFC 3207; RFC 7435 opportunistic),
    "encrypt" (TLS required, any certificate), "verify" (TLS required and the
    certificate must be valid for ``verify_names``, MTA-STS RFC 8461 §4.2) or
    "dane" (TLS required and the certificate must match ``tlsa``, RFC 7672).
    """

    def __init__(
        self,
        protocol: SMTPClientProtocol,
        helo_name: str,
        mx_host: str,
        tls: str = "may",
        tls_context: Any = None,
        verify_names: Sequence[str] = (),
        tlsa: Sequence[Any] = (),
        auth: tuple[str, str] | None = None,
    ) -> None:
        self.protocol = protocol
        self.auth = auth
        self.helo_name = helo_name
        self.mx_host = mx_host
        self.tls = tls
        self.tls_context = tls_context
        self.verify_names = list(verify_names) or [mx_host]
        self.tlsa = list(tlsa)
        self.extensions = Extensions()
        self.secure = False
        self.tls_info = ""
        self.transactions = 0

    @property
    def tls_required(self) -> bool:
        return self.tls in ("encrypt", "verify", "dane")

    async def open(self) -> None:
        """Greeting, EHLO (HELO fallback), STARTTLS.  Raises SMTPClientError.

        A 5xx greeting means this host refuses mail: the caller tries the next MX
        (RFC 5321 §3.1, §5.1).
        """
        p = self.protocol
        greeting = await p.greeting
        if not greeting.positive:
            raise SMTPClientError(
                f"{self.mx_host} greeted with {greeting}",
                greeting.enhanced("4.4.1" if greeting.temporary else "5.4.1"),
            )
        await self._hello()
        if "STARTTLS" in self.extensions and self.tls_context is not None:
            reply = await p.command("STARTTLS")
            if reply.code != 220:
                if self.tls_required:
                    raise SMTPClientError(
                        f"{self.mx_host} refused STARTTLS ({reply}) and TLS is required", "4.7.5"
                    )
            else:
                p.transport.startTLS(self.tls_context.for_host(self.mx_host))
                self.secure = True
                try:
                    await self._hello()  # RFC 3207 §4.2: forget what was learnt before TLS
                except SMTPClientError as exc:
                    raise SMTPClientError(
                        f"{self.mx_host}: TLS handshake failed: {exc}", "4.7.5", tls_failed=True
                    ) from None
                self._check_peer()
        elif self.tls_required:
            # Defect 7: never fall back to plaintext where a policy requires TLS.
            raise SMTPClientError(
                f"{self.mx_host} does not offer STARTTLS and TLS is required ({self.tls})",
                "4.7.5",
            )
        if self.auth is not None:
            await self._authenticate(*self.auth)

    async def _authenticate(self, user: str, password: str) -> None:
        """RFC 4954 AUTH PLAIN (or LOGIN) to a smarthost; never over plaintext."""
        import base64

        if not self.secure:
            raise SMTPClientError(f"{self.mx_host}: no AUTH without TLS", "4.7.5")
        mechanisms = self.extensions.keywords.get("AUTH", "").upper().split()
        p = self.protocol
        if "PLAIN" in mechanisms:
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            reply = await p.command(f"AUTH PLAIN {token}")
        elif "LOGIN" in mechanisms:
            reply = await p.command("AUTH LOGIN")
            if reply.code == 334:
                reply = await p.command(base64.b64encode(user.encode()).decode())
            if reply.code == 334:
                reply = await p.command(base64.b64encode(password.encode()).decode())
        else:
            raise SMTPClientError(f"{self.mx_host} offers no AUTH PLAIN or LOGIN", "4.7.0")
        if reply.code != 235:
            # Postfix defers on SASL failures: a password problem is fixed by the operator.
            raise SMTPClientError(f"{self.mx_host}: authentication failed: {reply}", "4.7.0")

    async def _hello(self) -> None:
        p = self.protocol
        reply = await p.command(f"EHLO {self.helo_name}")
        if reply.code == 250:
            self.extensions = Extensions.parse(reply)
            return
        if p.closed:
            raise SMTPClientError(f"{self.mx_host} closed the connection after EHLO")
        if self.secure:
            raise SMTPClientError(f"{self.mx_host} refused EHLO after STARTTLS: {reply}")
        reply = await p.command(f"HELO {self.helo_name}")
        if reply.code != 250:
            raise SMTPClientError(
                f"{self.mx_host} refused HELO: {reply}",
                reply.enhanced("4.4.1" if reply.temporary else "5.5.1"),
            )
        self.extensions = Extensions()

    def _check_peer(self) -> None:
        """Check the certificate after the handshake (RFC 7672 §3, RFC 8461 §4.2)."""
        from mailserv.queue import dane

        connection = self.protocol.transport.getHandle()
        version = connection.get_protocol_version_name()
        cipher = connection.get_cipher_name()
        self.tls_info = f"{version} {cipher}"
        if self.tls == "dane":
            chain = connection.get_peer_cert_chain(as_cryptography=True) or []
            problem = dane.match(self.tlsa, chain, self.verify_names)
            if problem:
                raise SMTPClientError(f"DANE: {self.mx_host}: {problem}", "4.7.5")
        elif self.tls == "verify":
            problem = dane.verify_pkix(connection, self.verify_names)
            if problem:
                raise SMTPClientError(f"{self.mx_host}: certificate: {problem}", "4.7.5")

    async def send(
        self, txn: Transaction, sent: Callable[[], None] | None = None
    ) -> dict[str, Reply]:
        """Send one message; the reply that decides each recipient (RFC 5321 §3.3).

        ``sent`` is called when the whole message is written and only its final
        reply is outstanding (DATA with PIPELINING: the next one may follow at once).
        """
        p = self.protocol
        ext = self.extensions
        rcpts = [r[0] for r in txn.recipients]
        needs_utf8 = txn.smtputf8 and (
            not txn.sender.isascii() or not all(r.isascii() for r in rcpts)
        )
        problem: Reply | None = None
        if needs_utf8 and "SMTPUTF8" not in ext:
            problem = synthetic(
                553, "5.6.7", f"{self.mx_host} does not support SMTPUTF8 (RFC 6531)"
            )
        elif txn.body == "8BITMIME" and "8BITMIME" not in ext:
            problem = synthetic(554, "5.6.3", f"{self.mx_host} does not support 8BITMIME")
        elif ext.size_limit is not None and txn.size > ext.size_limit:
            problem = synthetic(
                552, "5.3.4", f"message size {txn.size} exceeds the limit of {self.mx_host}"
            )
        elif txn.requiretls and not (self.secure and "REQUIRETLS" in ext):
            # RFC 8689 §4.2.1: only over verified TLS to a server that offers REQUIRETLS.
            problem = synthetic(
                550, "5.7.10", f"REQUIRETLS: {self.mx_host} does not support REQUIRETLS"
            )
        if problem is not None:
            return dict.fromkeys(rcpts, problem)
        self.transactions += 1
        mail = f"MAIL FROM:<{txn.sender}>"
        if "SIZE" in ext:
            mail += f" SIZE={txn.size}"
        if txn.body == "8BITMIME":
            mail += " BODY=8BITMIME"
        if needs_utf8:
            mail += " SMTPUTF8"
        if txn.requiretls:
            mail += " REQUIRETLS"
        dsn = "DSN" in ext
        if dsn and txn.ret:
            mail += f" RET={txn.ret}"
        if dsn and txn.envid:
            from mailserv.address import xtext_encode

            mail += f" ENVID={xtext_encode(txn.envid)}"
        rcpt_lines = []
        for address, notify, orcpt in txn.recipients:
            line = f"RCPT TO:<{address}>"
            if dsn and notify:
                line += f" NOTIFY={','.join(notify)}"
            if dsn and orcpt:
                from mailserv.address import xtext_encode

                kind, _, value = orcpt.partition(";")
                line += f" ORCPT={kind};{xtext_encode(value)}"
            rcpt_lines.append(line)
        t = p.timeouts
        results: dict[str, Reply] = {}
        data_reply: Reply | None = None
        if "PIPELINING" in ext and "CHUNKING" in ext:
            # RFC 3030 §4.2 with RFC 2920: MAIL, every RCPT and the BDAT chunks in one
            # stream: no 354 round trip, and no dot-stuffing at all.
            waiting = p.commands([(mail, t.command)] + [(r, t.command) for r in rcpt_lines])
            # No ``sent`` here: when every RCPT is refused an RSET follows the chunks,
            # which must not land in a transaction pipelined behind them.
            final_d = defer.ensureDeferred(p.send_bdat(txn.chunks()))
            try:
                replies = await defer.gatherResults(waiting, consumeErrors=True).addErrback(
                    _first_error
                )
            except BaseException:
                final_d.addErrback(lambda _: None)  # the same lost connection
                raise
            final = await final_d
            mail_reply, rcpt_replies = replies[0], replies[1:]
            if not mail_reply.positive:
                return dict.fromkeys(rcpts, mail_reply)
            for address, reply in zip(rcpts, rcpt_replies, strict=True):
                results[address] = final if reply.positive else reply
            if not any(r.positive for r in rcpt_replies) and not p.closed:
                await p.command("RSET")  # the BDATs were refused: start clean
            return results
        if "PIPELINING" in ext:
            # RFC 2920 §3.1: MAIL, every RCPT and DATA in one group.
            lines = [(mail, t.command)] + [(r, t.command) for r in rcpt_lines]
            lines.append(("DATA", t.data_init))
            replies = await defer.gatherResults(p.commands(lines), consumeErrors=True).addErrback(
                _first_error
            )
            mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
        else:
            mail_reply = await p.command(mail)
            rcpt_replies = []
            if mail_reply.positive:
                for line in rcpt_lines:
                    rcpt_replies.append(await p.command(line))
        if not mail_reply.positive:
            if data_reply is not None and data_reply.code == 354:
                p.abort()  # a broken pipelining server: never send data it did not ask for
            elif not p.closed:
                await p.command("RSET")
            return dict.fromkeys(rcpts, mail_reply)
        accepted = []
        for address, reply in zip(rcpts, rcpt_replies, strict=True):
            if reply.positive:
                accepted.append(address)
            else:
                results[address] = reply
        if not accepted:
            if data_reply is not None and data_reply.code == 354:
                p.abort()
            elif not p.closed:
                await p.command("RSET")
            return results
        if data_reply is None:
            data_reply = await p.command("DATA", t.data_init)
        if data_reply.code != 354:
            results.update(dict.fromkeys(accepted, data_reply))
            if not p.closed:
                await p.command("RSET")
            return results
        final = await p.send_body(txn.chunks(), sent if "PIPELINING" in ext else None)
        results.update(dict.fromkeys(accepted, final))
        return results


def _first_error(failure: Failure) -> Failure:
    """gatherResults wraps the first failure in FirstError: unwrap it."""
    if failure.check(defer.FirstError):
        value: Any = failure.value
        return value.subFailure  # type: ignore[no-any-return]
    return failure
