"""The hardened ESMTP server protocol (RFC 5321 and its extensions).

A subclass of twisted.mail.smtp.ESMTP that replaces its input handling and
command set, fixing defects 2-6 of ARCHITECTURE.md:

* 2: input is framed here, not by LineReceiver: an over-long command line
  is discarded up to its end and answered ``500 5.5.2``; an over-long DATA
  line never leaves DATA mode (spool.DataSink); buffers are bounded.
* 3: after ``220`` to STARTTLS, any plaintext already received is thrown
  away (RFC 3207 §4.2, CVE-2011-0411); STARTTLS is not offered inside TLS.
* 4: AUTH is only offered and accepted on TLS (or loopback when the
  listener allows it); malformed responses get ``501``; empty passwords
  never reach a checker.
* 5: commands run strictly one after another, so pipelined replies keep
  command order even when checks are asynchronous (RFC 2920 §3.1); any
  internal failure after DATA is a temporary ``451 4.3.0``.
* 6: EHLO advertises and implements PIPELINING, SIZE, 8BITMIME, SMTPUTF8,
  ENHANCEDSTATUSCODES, STARTTLS, AUTH, CHUNKING, DSN; MAIL/RCPT parameters
  are parsed and checked; NOOP, VRFY, EXPN, HELP exist.

The listener policy (MX or submission) is a separate object (inbound.py,
submission.py); delivery goes to an IDeliveryTarget (the router).
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from twisted.cred.error import LoginFailed
from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from mailserv.address import (
    Address,
    AddressError,
    parse_params,
    parse_path,
    path_end,
    xtext_decode,
)
from mailserv.auth import sasl
from mailserv.envelope import Envelope, Message, Recipient, Session
from mailserv.errors import SMTPReply, smtp_reply_for
from mailserv.filters.base import Action
from mailserv.filters.chain import FilterChain
from mailserv.smtp.mime import check_structure
from mailserv.smtp.spool import DataSink

log = Logger()

COMMAND, DATA, BDAT, AUTH, CLOSED = "command", "data", "bdat", "auth", "closed"

_SKIP = b"\0skip"  # _next_line: input consumed, no command to run

HTTP_VERBS = frozenset({b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS", b"DELETE"})

NEED_HELO = SMTPReply(503, "5.5.1", "Error: send HELO/EHLO first")
SYNTAX = SMTPReply(501, "5.5.4", "Syntax error in parameters or arguments")
TEMP_ERROR = SMTPReply(451, "4.3.0", "Local error in processing, try again later")


@dataclass
class ServerSettings:
    """Everything a listener configures about the protocol (LIMITS.md defaults)."""

    hostname: str
    listener_name: str = "smtp"
    protocol: str = "smtp"  # "smtp" (MX) | "submission"
    tls_mode: str = "starttls"  # none | starttls | implicit
    spool_dir: str = "."
    max_message_size: int = 10_240_000
    max_recipients: int = 1000
    max_line: int = 2048
    max_auth_line: int = 12_288
    max_data_line: int = 998
    max_header_size: int = 102_400
    max_received: int = 100
    max_mime_depth: int = 100
    max_mime_parts: int = 10_000
    max_messages_per_connection: int = 1000
    idle_timeout: float = 300.0
    min_data_rate: float = 500.0
    soft_error_limit: int = 10
    hard_error_limit: int = 20
    error_delay: float = 1.0
    auth_failure_delay: float = 2.0
    allow_plaintext_auth: str = "loopback"  # never | loopback | always
    require_auth: bool = False
    add_auth_user_to_received: bool = False
    min_free_factor: float = 1.5
    max_pending_input: int = 256 * 1024
    spool_memory_limit: int = 128 * 1024  # larger messages are spooled to a file


@dataclass
class ServerContext:
    """What a server protocol instance works with (built once per listener)."""

    settings: ServerSettings
    reactor: Any
    router: Any  # IDeliveryTarget
    chain: FilterChain
    policy: Any  # inbound.InboundPolicy | submission.SubmissionPolicy
    auth: Any = None  # SaslAuth (or a fake): mechanisms(secure), new(name), login(creds, ip)
    tls_options: Callable[[], Any] | None = None
    threads: Any = None  # ThreadPools: MIME checks of spooled messages run in "disk"
    on_close: Callable[[Any], None] | None = None


class _Transaction:
    """One MAIL ... final reply."""

    def __init__(self, envelope: Envelope, delivery: Any) -> None:
        self.envelope = envelope
        self.delivery = delivery
        self.sink: DataSink | None = None
        self.bdat_error: SMTPReply | None = None


def run_now(coro: Coroutine[Any, Any, Any]) -> defer.Deferred[Any] | None:
    """Run a command's coroutine at once; a Deferred only if it has to wait.

    Awaiting a Deferred that has already fired returns its result on the spot
    (``Deferred.__iter__``), so a command whose checks answer synchronously
    (cached routes, in-memory filters, an empty pipeline) completes here
    without ``ensureDeferred``'s machinery.  When the coroutine waits for a
    Deferred that has not fired, it is resumed from that Deferred's callbacks;
    the returned Deferred fires (or fails) with the coroutine's outcome.
    Returns None when the coroutine completed (its value is not used) and a
    failed Deferred when it raised before waiting.
    """
    try:
        pending = coro.send(None)
    except StopIteration:
        return None
    except BaseException:
        return defer.fail()
    done: defer.Deferred[Any] = defer.Deferred()

    def resume(result: Any) -> None:
        # A success is re-read by the awaiting Deferred.__iter__ itself; a failure is
        # raised at the await.  Either way it is consumed: the chain goes on with None.
        try:
            if isinstance(result, Failure):
                nxt = result.throwExceptionIntoGenerator(coro)  # type: ignore[arg-type]
            else:
                nxt = coro.send(None)
        except StopIteration as stop:
            done.callback(stop.value)
            return None
        except BaseException:
            done.errback()
            return None
        nxt.addBoth(resume)
        return None

    pending.addBoth(resume)
    return done


def _tls_details(transport: Any) -> tuple[str, str | None]:
    try:
        conn = transport.getHandle()
        version = conn.get_protocol_version_name()
        cipher = conn.get_cipher_name()
        if version and version != "Unknown":
            return str(version), cipher
    except Exception:  # noqa: S110 - best effort: the transport may not be TLS yet
        pass
    return "TLS", None


class SMTPServer(smtp.ESMTP):
    """The hardened ESMTP protocol; one instance per connection."""

    transport: Any

    def __init__(self, context: ServerContext) -> None:
        super().__init__()
        self.ctx = None  # Twisted's own STARTTLS is never used
        self.context = context
        self.settings = context.settings
        self.host = self.settings.hostname.encode("idna")
        self._reactor = context.reactor
        self._inbuf = bytearray()
        self._mode = COMMAND
        self._busy = False
        self._processing = False
        self._discarding = False
        self._paused = False
        self._timer: Any = None
        self._deadline = 0.0
        self._errors = 0
        self._messages = 0
        self._txn: _Transaction | None = None
        self._auth_state: Any = None
        self._tls = False
        self._tls_known = False
        self._draining = False
        self.session: Session | None = None

    # ------------------------------------------------------------------
    # Connection life cycle

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        host = getattr(peer, "host", str(peer))
        port = getattr(peer, "port", 0)
        self._tls = ISSLTransport.providedBy(self.transport)
        self.session = Session(
            id=secrets.token_hex(6),
            listener=self.settings.listener_name,
            protocol=self.settings.protocol,
            peer_host=host,
            peer_port=port,
            local_host=self.settings.hostname,
        )
        if hasattr(self.transport, "setTcpNoDelay"):
            try:
                self.transport.setTcpNoDelay(True)
            except OSError:
                pass
        self._arm_timer(self.settings.idle_timeout)
        self._busy = True
        d = self.context.chain.connect(self.session)
        d.addCallback(self._connect_checked)
        d.addErrback(self._unexpected)

    def _connect_checked(self, result: Any) -> None:
        verdict = result.verdict
        if verdict.refuses:
            reply = verdict.smtp_reply()
            if verdict.action is Action.REJECT:
                reply = SMTPReply(554, reply.enhanced, reply.text)
            self._send(reply.code, reply.enhanced, reply.text)
            self._close()
            return
        self._send(220, "", f"{self.settings.hostname} ESMTP mailserv")
        self._resume(None)

    def connectionLost(self, reason: Failure = smtp.protocol.connectionDone) -> None:  # type: ignore[assignment]
        self._mode = CLOSED
        self._cancel_timer()
        if self._txn is not None:
            self._abort_transaction()
        if self.context.on_close is not None:
            self.context.on_close(self)

    def drain(self) -> None:
        """Shutdown (IDrainable via the service): finish the transaction in progress,
        then ``421 4.3.2`` and close (RFC 5321 §3.8)."""
        self._draining = True
        self._maybe_finish_drain()

    def _maybe_finish_drain(self) -> None:
        if self._draining and self._mode == COMMAND and not self._busy and self._txn is None:
            self._send(421, "4.3.2", f"{self.settings.hostname} Service shutting down")
            self._close()

    def _close(self) -> None:
        self._mode = CLOSED
        self._inbuf.clear()
        self._cancel_timer()
        self.transport.loseConnection()

    # ------------------------------------------------------------------
    # Timers: idle/command timeout and minimum data rate (LIMITS.md)

    def _arm_timer(self, seconds: float) -> None:
        self._deadline = self._reactor.seconds() + seconds
        if self._timer is not None and self._timer.active():
            self._timer.reset(seconds)
        else:
            self._timer = self._reactor.callLater(seconds, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._mode == CLOSED:
            return
        if self._busy and self._mode != AUTH:
            # Our own work (delivery, filters) is not the client's fault.
            self._arm_timer(self.settings.idle_timeout)
            return
        self._send(421, "4.4.2", f"{self.settings.hostname} Error: timeout exceeded")
        self._close()

    def _data_progress(self, count: int) -> None:
        """Extend the data deadline by 1 s per ``min_data_rate`` bytes (smtpd_min_data_rate)."""
        now = self._reactor.seconds()
        deadline = min(
            now + self.settings.idle_timeout,
            self._deadline + count / self.settings.min_data_rate,
        )
        if deadline > self._deadline:
            self._arm_timer(deadline - now)

    # ------------------------------------------------------------------
    # Replies

    def _send(self, code: int, enhanced: str, text: str, *more: str) -> None:
        """Write one (possibly multi-line) reply; RFC 2034 codes on every line."""
        if self._mode == CLOSED and code not in (421, 221, 554):
            return
        if not more and "\r" not in text and "\n" not in text:  # the usual one-line reply
            line = f"{code} {enhanced} {text}\r\n" if enhanced else f"{code} {text}\r\n"
            self.transport.write(line.encode("utf-8"))
            return
        # A reply text (a filter's, say) must never break the framing.
        lines = [line.replace("\r", " ").replace("\n", " ") for line in (text, *more)]
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            code_text = f"{code}{sep}{enhanced} " if enhanced else f"{code}{sep}"
            out.append(f"{code_text}{line}\r\n")
        self.transport.write("".join(out).encode("utf-8"))

    def _reply(self, reply: SMTPReply) -> None:
        self._send(reply.code, reply.enhanced, reply.text)

    def sendCode(self, code: int, message: bytes = b"") -> None:
        """Twisted's entry point, kept working for inherited paths."""
        self._send(code, "", message.decode("utf-8", "replace"))

    def _bad_command(self, reply: SMTPReply) -> Any:
        """Count an error (Postfix smtpd_soft/hard_error_limit); delay or disconnect.

        The count is also in ``session.notes["errors"]`` for filters (the tarpit).
        """
        self._errors += 1
        if self.session is not None:
            self.session.notes["errors"] = self._errors
        if self._errors >= self.settings.hard_error_limit:
            self._send(421, "4.7.0", f"{self.settings.hostname} Error: too many errors")
            self._close()
            return None
        if self._errors > self.settings.soft_error_limit:
            d: defer.Deferred[None] = defer.Deferred()
            self._reactor.callLater(self.settings.error_delay, d.callback, None)
            d.addCallback(lambda _: self._reply(reply))
            return d
        self._reply(reply)
        return None

    # ------------------------------------------------------------------
    # Input framing

    def dataReceived(self, data: bytes) -> None:
        if self._mode == CLOSED:
            return
        self._inbuf += data
        if self._busy:
            if len(self._inbuf) > self.settings.max_pending_input and not self._paused:
                self._paused = True
                self.transport.pauseProducing()
            return
        self._process()

    def _resume(self, _: Any) -> None:
        self._busy = False
        if self._mode == CLOSED:
            return
        self._maybe_finish_drain()
        if self._mode == CLOSED:
            return
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        if not self._processing:
            self._process()

    def _wait(self, d: defer.Deferred[Any] | None) -> None:
        """Hold further input until ``d`` fires: one command at a time (RFC 2920)."""
        if d is None:
            return
        self._busy = True
        d.addErrback(self._unexpected)
        d.addBoth(self._resume)

    def _unexpected(self, failure: Failure) -> None:
        log.failure("unexpected error in SMTP session", failure)
        if self._mode != CLOSED:
            if self._mode in (DATA, BDAT):
                self._mode = COMMAND
            self._reply(TEMP_ERROR)

    def _process(self) -> None:
        self._processing = True
        try:
            while not self._busy and self._mode != CLOSED and self._inbuf:
                if self._mode == DATA:
                    self._feed_data()
                elif self._mode == BDAT:
                    self._feed_bdat()
                else:
                    line = self._next_line()
                    if line is None:
                        break
                    if line is not _SKIP:
                        self._wait(self._line(line))
                if self._draining:  # a command that completed at once ends nothing else
                    self._maybe_finish_drain()
        finally:
            self._processing = False

    def _line_limit(self) -> int:
        if self._mode == AUTH or self._inbuf[:5].upper() == b"AUTH ":
            return self.settings.max_auth_line
        return self.settings.max_line

    def _next_line(self) -> bytes | None:
        """The next complete command line, or None; over-long lines are discarded whole."""
        limit = self._line_limit()
        nl = self._inbuf.find(b"\n")
        if self._discarding:
            if nl < 0:
                self._inbuf.clear()
                return None
            del self._inbuf[: nl + 1]
            self._discarding = False
            self._wait(self._bad_command(SMTPReply(500, "5.5.2", "Error: line too long")))
            return _SKIP
        if nl < 0:
            if len(self._inbuf) > limit + 2:
                # No end of line in sight: drop what we have and the rest of the line.
                self._inbuf.clear()
                self._discarding = True
            return None
        line = bytes(self._inbuf[:nl])
        del self._inbuf[: nl + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > limit:
            self._wait(self._bad_command(SMTPReply(500, "5.5.2", "Error: line too long")))
            return _SKIP
        self._arm_timer(self.settings.idle_timeout)
        return line

    # ------------------------------------------------------------------
    # Command dispatch

    def _line(self, line: bytes) -> defer.Deferred[Any] | None:
        if self._mode == AUTH:
            return self._auth_response(line)
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        session = self.session
        assert session is not None
        if verb in HTTP_VERBS or (verb.endswith(b":") and not arg.startswith(b"<")):
            self._send(554, "5.5.0", "Error: this is an SMTP server")
            self._close()
            return None
        if self._inbuf and not session.esmtp and verb not in (b"QUIT",):
            # Pipelining without having seen PIPELINING in an EHLO reply
            # (RFC 2920 §3.1; Postfix smtpd_forbid_unauth_pipelining).
            self._send(554, "5.5.0", "Error: SMTP protocol synchronization")
            self._close()
            return None
        handler = getattr(self, "smtp_" + verb.decode("ascii", "replace"), None)
        if handler is None or not verb.isalpha():
            return self._bad_command(SMTPReply(500, "5.5.2", "Error: command not recognized"))
        try:
            text = arg.decode("utf-8")
        except UnicodeDecodeError:
            return self._bad_command(SMTPReply(500, "5.5.2", "Error: invalid UTF-8 in command"))
        result: defer.Deferred[Any] | None = handler(text.strip(" "))
        return result

    # ------------------------------------------------------------------
    # Session commands

    def _ehlo_lines(self) -> list[str]:
        s = self.settings
        lines = [
            "PIPELINING",
            f"SIZE {s.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
        ]
        if self._can_starttls():
            lines.append("STARTTLS")
        mechanisms = self._auth_mechanisms()
        if mechanisms:
            lines.append("AUTH " + " ".join(mechanisms))
        lines += ["CHUNKING", "DSN"]
        if self.session is not None and self.session.tls:
            lines.append("REQUIRETLS")  # RFC 8689 §4.1: only on a TLS session
        return lines

    def _can_starttls(self) -> bool:
        return (
            self.settings.tls_mode == "starttls"
            and not self._tls
            and self.context.tls_options is not None
            and ITLSTransport.providedBy(self.transport)
        )

    def _auth_allowed(self) -> bool:
        assert self.session is not None
        if self._tls:
            return True
        mode = self.settings.allow_plaintext_auth
        return mode == "always" or (mode == "loopback" and self.session.is_loopback)

    def _auth_mechanisms(self) -> list[str]:
        if self.context.auth is None or not self._auth_allowed():
            return []
        if self.session is not None and self.session.auth_user is not None:
            return []
        return list(self.context.auth.mechanisms(True))

    def _note_tls(self) -> None:
        if self._tls and not self._tls_known and self.session is not None:
            version, cipher = _tls_details(self.transport)
            self.session.tls_version, self.session.tls_cipher = version, cipher
            self._tls_known = cipher is not None

    def _do_helo(self, arg: str, esmtp: bool) -> defer.Deferred[Any] | None:
        if not arg or " " in arg or not arg.isprintable():
            return self._bad_command(
                SMTPReply(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname")
            )
        assert self.session is not None
        self._abort_transaction()
        self._note_tls()
        self.session.helo = arg
        self.session.esmtp = False
        d = self.context.chain.helo(self.session)

        def checked(result: Any) -> None:
            verdict = result.verdict
            if verdict.refuses:
                self._refuse(verdict)
                return
            assert self.session is not None
            self.session.esmtp = esmtp
            first = f"{self.settings.hostname} Hello {arg} [{self.session.peer_host}]"
            if esmtp:
                self._send(250, "", first, *self._ehlo_lines())
            else:
                self._send(250, "", first)

        return d.addCallback(checked)

    def smtp_EHLO(self, arg: str) -> defer.Deferred[Any] | None:
        return self._do_helo(arg, True)

    def smtp_HELO(self, arg: str) -> defer.Deferred[Any] | None:
        return self._do_helo(arg, False)

    def smtp_NOOP(self, arg: str) -> None:
        self._send(250, "2.0.0", "OK")

    def smtp_RSET(self, arg: str) -> defer.Deferred[Any] | None:
        if arg:
            return self._bad_command(SYNTAX)
        self._abort_transaction()
        self._send(250, "2.0.0", "OK")
        return None

    def smtp_VRFY(self, arg: str) -> defer.Deferred[Any] | None:
        if not arg:
            return self._bad_command(SMTPReply(501, "5.5.4", "Syntax: VRFY address"))
        self._send(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")
        return None

    def smtp_EXPN(self, arg: str) -> None:
        self._send(502, "5.5.1", "EXPN not available")

    def smtp_HELP(self, arg: str) -> None:
        self._send(
            214,
            "2.0.0",
            "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY STARTTLS AUTH",
            "See RFC 5321",
        )

    def smtp_QUIT(self, arg: str) -> None:
        self._send(221, "2.0.0", f"{self.settings.hostname} closing connection")
        self._close()

    def _refuse(self, verdict: Any) -> None:
        reply = verdict.smtp_reply()
        self._reply(reply)
        if verdict.action is Action.DISCONNECT:
            self._close()

    # ------------------------------------------------------------------
    # STARTTLS (RFC 3207)

    def smtp_STARTTLS(self, arg: str) -> defer.Deferred[Any] | None:
        if arg:
            return self._bad_command(SMTPReply(501, "5.5.4", "Syntax: STARTTLS"))
        if self._tls:
            return self._bad_command(SMTPReply(503, "5.5.1", "Error: TLS already active"))
        if not self._can_starttls():
            return self._bad_command(SMTPReply(502, "5.5.1", "Error: command not implemented"))
        if self._txn is not None:
            return self._bad_command(SMTPReply(503, "5.5.1", "Error: MAIL transaction in progress"))
        assert self.context.tls_options is not None
        self._send(220, "2.0.0", "Ready to start TLS")
        # RFC 3207 §4.2 / CVE-2011-0411: nothing sent before the handshake counts.
        self._inbuf.clear()
        self.transport.startTLS(self.context.tls_options())
        self._tls = True
        self._tls_known = False
        assert self.session is not None
        self.session.helo = None
        self.session.esmtp = False
        self.session.auth_user = None
        return None

    # ------------------------------------------------------------------
    # AUTH (RFC 4954)

    def smtp_AUTH(self, arg: str) -> defer.Deferred[Any] | None:
        assert self.session is not None
        if not self.session.esmtp:
            return self._bad_command(NEED_HELO)
        if self.session.auth_user is not None:
            return self._bad_command(SMTPReply(503, "5.5.1", "Error: already authenticated"))
        if self._txn is not None:
            return self._bad_command(SMTPReply(503, "5.5.1", "Error: MAIL transaction in progress"))
        auth = self.context.auth
        if auth is None:
            return self._bad_command(SMTPReply(502, "5.5.1", "Error: authentication not enabled"))
        if not self._auth_allowed():
            return self._bad_command(
                SMTPReply(538, "5.7.11", "Encryption required for requested authentication")
            )
        name, _, initial = arg.partition(" ")
        if name.upper() not in auth.mechanisms(True):
            return self._bad_command(SMTPReply(504, "5.5.4", "Unrecognized authentication type"))
        try:
            self._auth_state = auth.new(name.upper())
            response = sasl.decode_response(initial) if initial else None
        except KeyError:
            return self._bad_command(SMTPReply(504, "5.5.4", "Unrecognized authentication type"))
        except sasl.SASLError as exc:
            return self._auth_error(exc)
        self._mode = AUTH
        return self._auth_next(self._auth_state.start(response))

    def _auth_error(self, exc: Exception) -> Any:
        self._auth_state = None
        self._mode = COMMAND
        if isinstance(exc, sasl.SASLCancelled):
            return self._bad_command(SMTPReply(501, "5.0.0", "Authentication aborted"))
        return self._bad_command(SMTPReply(501, "5.5.2", "Malformed authentication data"))

    def _auth_response(self, line: bytes) -> Any:
        """A client line during the exchange (RFC 4954 §4)."""
        try:
            data = sasl.decode_response(line)
        except sasl.SASLError as exc:
            return self._auth_error(exc)
        return self._auth_next(self._auth_state.step(data))

    def _auth_next(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        def answered(result: Any) -> Any:
            if isinstance(result, sasl.Challenge):
                self._send(334, "", sasl.encode_challenge(result.data).decode("ascii"))
                return None
            self._auth_state = None
            self._mode = COMMAND
            return self._login(result)

        def failed(failure: Failure) -> Any:
            if failure.check(sasl.SASLError):
                return self._auth_error(failure.value)  # type: ignore[arg-type]
            self._auth_state = None
            self._mode = COMMAND
            log.failure("SASL exchange failed", failure)
            self._send(454, "4.7.0", "Temporary authentication failure")
            return None

        return d.addCallbacks(answered, failed)

    def _login(self, credentials: Any) -> Any:
        assert self.session is not None and self.context.auth is not None
        password = getattr(credentials, "password", None)
        if password is not None and not password:
            # Defect 4: an empty password never reaches a checker.
            d: defer.Deferred[Any] = defer.Deferred()
            self._reactor.callLater(self.settings.auth_failure_delay, d.callback, None)
            return d.addCallback(lambda _: self._auth_failed())
        d = defer.maybeDeferred(self.context.auth.login, credentials, self.session.peer_host)

        def ok(user: str) -> None:
            assert self.session is not None
            self.session.auth_user = user
            self._send(235, "2.7.0", "Authentication successful")

        def failed(failure: Failure) -> Any:
            if failure.check(LoginFailed):
                return self._auth_failed()
            log.failure("authentication backend failure", failure)
            self._send(454, "4.7.0", "Temporary authentication failure")
            return None

        return d.addCallbacks(ok, failed)

    def _auth_failed(self) -> Any:
        return self._bad_command(SMTPReply(535, "5.7.8", "Authentication credentials invalid"))

    # ------------------------------------------------------------------
    # MAIL (RFC 5321 §4.1.1.2 with SIZE, BODY, SMTPUTF8, RET, ENVID, AUTH)

    def _parse_command_path(self, arg: str, prefix: str) -> tuple[str, dict[str, str | None]]:
        if arg[: len(prefix)].upper() != prefix:
            raise AddressError("syntax")
        rest = arg[len(prefix) :].lstrip(" ")
        # Find the end of the path to split off the parameters.
        end = path_end(rest)
        path, params = rest[:end], rest[end:]
        return path, parse_params(params.strip(" "))

    def smtp_MAIL(self, arg: str) -> Any:
        session = self.session
        assert session is not None
        if session.helo is None:
            return self._bad_command(NEED_HELO)
        if self._txn is not None:
            return self._bad_command(SMTPReply(503, "5.5.1", "Error: nested MAIL command"))
        if self.settings.require_auth and session.auth_user is None:
            return self._bad_command(SMTPReply(530, "5.7.0", "Authentication required"))
        if self._messages >= self.settings.max_messages_per_connection:
            self._send(421, "4.7.0", f"{self.settings.hostname} Error: too many messages")
            self._close()
            return None
        try:
            path, params = self._parse_command_path(arg, "FROM:")
        except AddressError:
            return self._bad_command(SMTPReply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
        try:
            envelope = self._envelope(params)
        except SMTPReply as reply:
            return self._bad_command(reply)
        try:
            sender, _ = parse_path(path, allow_utf8=envelope.smtputf8)
        except AddressError:
            if not envelope.smtputf8 and not path.isascii():
                return self._bad_command(
                    SMTPReply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
                )
            return self._bad_command(SMTPReply(501, "5.1.7", "Bad sender address syntax"))
        envelope.mail_from = sender
        s = self.settings
        limit = max(envelope.size or 0, s.max_message_size)
        if envelope.size is not None and envelope.size > s.max_message_size:
            self._reply(SMTPReply(552, "5.3.4", "Message size exceeds fixed limit"))
            return None
        if not _enough_space(s.spool_dir, limit * s.min_free_factor, self._reactor.seconds()):
            self._reply(SMTPReply(452, "4.3.1", "Insufficient system storage"))
            return None
        return run_now(self._mail(envelope))

    def _envelope(self, params: dict[str, str | None]) -> Envelope:
        assert self.session is not None
        env = Envelope(id=f"{self.session.id}.{self._messages + 1}", mail_from=None)
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    raise SYNTAX
                env.size = int(value)
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    raise SMTPReply(501, "5.5.4", "Unsupported BODY type")
                env.body = value.upper()
            elif key == "SMTPUTF8":
                if value is not None:
                    raise SYNTAX
                env.smtputf8 = True
            elif key == "RET":
                if value is None or value.upper() not in ("FULL", "HDRS"):
                    raise SMTPReply(501, "5.5.4", "Syntax: RET=FULL or RET=HDRS")
                env.ret = value.upper()
            elif key == "ENVID":
                try:
                    env.envid = xtext_decode(value or "")
                except AddressError:
                    raise SMTPReply(501, "5.5.4", "Bad ENVID") from None
                if not value or len(env.envid) > 100:
                    raise SMTPReply(501, "5.5.4", "Bad ENVID")
            elif key == "AUTH":
                # RFC 4954 §5: trusted only from an authenticated session.
                try:
                    decoded = xtext_decode(value or "")
                except AddressError:
                    raise SYNTAX from None
                env.auth = decoded if self.session.auth_user is not None else "<>"
            elif key == "REQUIRETLS":
                # RFC 8689 §4.1: no value; only on a session protected by TLS.
                if value is not None:
                    raise SYNTAX
                if not self.session.tls:
                    raise SMTPReply(530, "5.7.10", "REQUIRETLS needs a TLS session")
                env.requiretls = True
            else:
                raise SMTPReply(555, "5.5.4", f"Unsupported parameter {key}")
        return env

    async def _mail(self, envelope: Envelope) -> None:
        session = self.session
        assert session is not None
        try:
            refusal = await defer.maybeDeferred(self.context.policy.check_sender, session, envelope)
            if refusal is not None:
                self._reply(refusal)
                return
            result = await self.context.chain.sender(session, envelope)
            if result.verdict.refuses:
                self._refuse(result.verdict)
                return
            envelope.add_headers.extend(result.headers)
            envelope.verdicts.extend(result.trail)
            delivery = await defer.maybeDeferred(self.context.router.start_delivery, envelope)
        except Exception as exc:
            log.failure("MAIL FROM failed", Failure(exc))
            self._reply(smtp_reply_for(exc))
            return
        self._txn = _Transaction(envelope, delivery)
        self._messages += 1
        self._send(250, "2.1.0", "Sender OK")

    # ------------------------------------------------------------------
    # RCPT (RFC 5321 §4.1.1.3 with NOTIFY and ORCPT, RFC 3461 §4)

    def smtp_RCPT(self, arg: str) -> Any:
        txn = self._txn
        if txn is None:
            return self._bad_command(SMTPReply(503, "5.5.1", "Error: need MAIL command"))
        try:
            path, params = self._parse_command_path(arg, "TO:")
        except AddressError:
            return self._bad_command(SMTPReply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
        notify: tuple[str, ...] | None = None
        orcpt: str | None = None
        for key, value in params.items():
            if key == "NOTIFY":
                items = tuple((value or "").upper().split(","))
                allowed = {"SUCCESS", "FAILURE", "DELAY"}
                if not (items == ("NEVER",) or (items and set(items) <= allowed)):
                    return self._bad_command(SMTPReply(501, "5.5.4", "Bad NOTIFY parameter"))
                notify = items
            elif key == "ORCPT":
                kind, semi, addr = (value or "").partition(";")
                try:
                    decoded = xtext_decode(addr)
                except AddressError:
                    decoded = ""
                if not semi or not kind or not decoded or len(decoded) > 500:
                    return self._bad_command(SMTPReply(501, "5.5.4", "Bad ORCPT parameter"))
                orcpt = f"{kind};{decoded}"
            else:
                return self._bad_command(SMTPReply(555, "5.5.4", f"Unsupported parameter {key}"))
        smtputf8 = txn.envelope.smtputf8
        try:
            if path[1:-1].lower() == "postmaster" and path.startswith("<"):
                # RFC 5321 §4.1.1.3: <Postmaster> without a domain.
                address: Address | None = Address("postmaster", self._primary_domain())
            else:
                address, _ = parse_path(path, allow_utf8=smtputf8)
        except AddressError:
            if not smtputf8 and not path.isascii():
                return self._bad_command(
                    SMTPReply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
                )
            return self._bad_command(SMTPReply(501, "5.1.3", "Bad recipient address syntax"))
        if address is None:
            return self._bad_command(SMTPReply(501, "5.1.3", "Bad recipient address syntax"))
        if len(txn.envelope.recipients) >= self.settings.max_recipients:
            self._send(452, "4.5.3", "Error: too many recipients")
            return None
        rcpt = Recipient(address, notify, orcpt)
        return run_now(self._rcpt(txn, rcpt))

    def _primary_domain(self) -> str:
        router = self.context.router
        domains = sorted(getattr(router, "domains", ()) or ())
        return domains[0] if domains else self.settings.hostname

    async def _rcpt(self, txn: _Transaction, rcpt: Recipient) -> Any:
        session = self.session
        assert session is not None
        try:
            result = await self.context.chain.recipient(session, txn.envelope, rcpt)
            if result.verdict.refuses:
                verdict = result.verdict
                if verdict.action is Action.DISCONNECT:
                    self._refuse(verdict)
                    return None
                return self._bad_command(verdict.smtp_reply())
            await defer.maybeDeferred(txn.delivery.add_recipient, rcpt)
        except SMTPReply as reply:
            return self._bad_command(reply)
        except Exception as exc:
            log.failure("RCPT TO failed", Failure(exc))
            self._reply(smtp_reply_for(exc))
            return None
        if self._txn is not txn:
            return None
        txn.envelope.add_headers.extend(result.headers)
        txn.envelope.verdicts.extend(result.trail)
        txn.envelope.recipients.append(rcpt)
        self._send(250, "2.1.5", "Recipient OK")
        return None

    # ------------------------------------------------------------------
    # DATA (RFC 5321 §4.1.1.4) and BDAT (RFC 3030)

    def _ready_for_data(self) -> SMTPReply | None:
        if self._txn is None:
            return SMTPReply(503, "5.5.1", "Error: need MAIL command")
        if not self._txn.envelope.recipients:
            return SMTPReply(554, "5.5.1", "Error: no valid recipients")
        return None

    def _new_sink(self, dot_stuffed: bool) -> DataSink:
        s = self.settings
        return DataSink(
            s.spool_dir,
            s.max_message_size,
            max_line=s.max_data_line,
            max_header=s.max_header_size,
            dot_stuffed=dot_stuffed,
            memory_limit=s.spool_memory_limit,
        )

    def smtp_DATA(self, arg: str) -> Any:
        if arg:
            return self._bad_command(SMTPReply(501, "5.5.4", "Syntax: DATA"))
        refusal = self._ready_for_data()
        if refusal is not None:
            return self._bad_command(refusal)
        assert self._txn is not None
        if self._txn.sink is not None:
            return self._bad_command(SMTPReply(503, "5.5.1", "Error: BDAT transaction in progress"))
        try:
            self._txn.sink = self._new_sink(dot_stuffed=True)
        except OSError:
            log.failure("cannot create spool file")
            self._reply(TEMP_ERROR)
            return None
        self._mode = DATA
        self._arm_timer(self.settings.idle_timeout)
        self._send(354, "", "End data with <CR><LF>.<CR><LF>")
        return None

    def _feed_data(self) -> None:
        txn = self._txn
        assert txn is not None and txn.sink is not None
        data = bytes(self._inbuf)
        self._inbuf.clear()
        consumed = txn.sink.feed(data)
        self._data_progress(len(data) if consumed is None else consumed)
        if consumed is None:
            return
        self._inbuf += data[consumed:]
        self._mode = COMMAND
        self._arm_timer(self.settings.idle_timeout)
        self._wait(run_now(self._end_of_data(txn)))

    def smtp_BDAT(self, arg: str) -> Any:
        parts = arg.split(" ")
        last = len(parts) == 2 and parts[1].upper() == "LAST"
        if not (len(parts) == 1 or last) or not parts[0].isdigit() or len(parts[0]) > 18:
            # The size is unknown, so the rest of the stream cannot be framed.
            self._send(501, "5.5.4", "Syntax: BDAT size [LAST]")
            self._close()
            return None
        self._bdat_left = int(parts[0])
        self._bdat_last = last
        self._bdat_refusal = self._ready_for_data()
        txn = self._txn
        if self._bdat_refusal is None and txn is not None and txn.sink is None:
            try:
                txn.sink = self._new_sink(dot_stuffed=False)
            except OSError:
                log.failure("cannot create spool file")
                self._bdat_refusal = TEMP_ERROR
        self._mode = BDAT
        self._arm_timer(self.settings.idle_timeout)
        if self._bdat_left == 0:
            return self._bdat_chunk_done()
        return None

    def _feed_bdat(self) -> None:
        take = min(self._bdat_left, len(self._inbuf))
        chunk = bytes(self._inbuf[:take])
        del self._inbuf[:take]
        self._bdat_left -= take
        self._data_progress(take)
        txn = self._txn
        if self._bdat_refusal is None and txn is not None and txn.sink is not None:
            txn.sink.feed(chunk)
        if self._bdat_left == 0:
            self._wait(self._bdat_chunk_done())

    def _bdat_chunk_done(self) -> Any:
        self._mode = COMMAND
        self._arm_timer(self.settings.idle_timeout)
        if self._bdat_refusal is not None:
            return self._bad_command(self._bdat_refusal)
        txn = self._txn
        assert txn is not None and txn.sink is not None
        if not self._bdat_last:
            if txn.sink.error is not None:
                # RFC 3030 §2: the transaction has failed; later chunks get the same reply.
                self._reply(txn.sink.error)
            else:
                self._send(250, "2.0.0", f"{txn.sink.size} octets received")
            return None
        txn.sink.finish_bdat()
        return run_now(self._end_of_data(txn))

    async def _end_of_data(self, txn: _Transaction) -> None:
        """Check, filter, deliver durably, then reply (RFC 5321 §4.1.1.4, §6.1)."""
        started = time.monotonic()
        sink = txn.sink
        assert sink is not None and self.session is not None
        session, envelope = self.session, txn.envelope
        self._txn = None
        message: Message | None = None
        reply: SMTPReply
        try:
            message = sink.finish()
            received = len(message.header("Received"))
            if received > self.settings.max_received:
                raise SMTPReply(554, "5.4.6", "Too many Received headers: mail loop")
            problem = await self._mime_problem(message)
            if problem:
                text = "MIME nesting too deep" if problem == "nesting" else "Too many MIME parts"
                raise SMTPReply(554, "5.6.0", text)
            refusal = await defer.maybeDeferred(
                self.context.policy.check_message, session, envelope, message
            )
            if refusal is not None:
                raise refusal
            result = await self.context.chain.message(session, envelope, message)
            envelope.verdicts.extend(result.trail)
            if result.verdict.refuses:
                if result.verdict.action is Action.DISCONNECT:
                    raise _Disconnect(result.verdict.smtp_reply())
                raise result.verdict.smtp_reply()
            if result.verdict.action is Action.DISCARD:  # accept, deliver nothing (Postfix)
                await self._cleanup(txn, message)
                reply = SMTPReply(250, "2.0.0", f"Ok: queued as {envelope.id}")
                self._reply(reply)
                self._log(envelope, reply, message, started)
                return
            if result.verdict.action is Action.QUARANTINE:
                envelope.quarantine = result.verdict.reason or "quarantined"
            envelope.add_headers.extend(result.headers)
            message.prefix = self._prefix(envelope, message)
            await defer.maybeDeferred(txn.delivery.body, message)
            outcome = await defer.maybeDeferred(txn.delivery.commit)
            failures = [r for r in outcome.values() if r is not None]
            if failures:
                temporary = [r for r in failures if r.temporary]
                reply = temporary[0] if temporary else failures[0]
            else:
                reply = SMTPReply(250, "2.0.0", f"Ok: queued as {envelope.id}")
        except _Disconnect as exc:
            reply = exc.reply
            self._reply(reply)
            self._close()
            await self._cleanup(txn, message)
            self._log(envelope, reply, message, started)
            return
        except SMTPReply as exc:
            reply = exc
        except Exception as exc:
            log.failure("end of data failed", Failure(exc))
            reply = smtp_reply_for(exc)
        if reply.code >= 400:
            await self._cleanup(txn, message)
        elif message is not None:
            message.discard()
        self._reply(reply)
        self._log(envelope, reply, message, started)

    async def _mime_problem(self, message: Message) -> str:
        """LIMITS.md MIME nesting/parts, for multipart messages only."""
        if not any(
            v.lstrip().lower().startswith(b"multipart/") for v in message.header("Content-Type")
        ):
            return ""
        s = self.settings

        def check() -> str:
            with message.open() as f:
                return check_structure(f, s.max_mime_depth, s.max_mime_parts)

        if message.path is None or self.context.threads is None:
            return check()
        result: str = await self.context.threads.run("disk", check)
        return result

    async def _cleanup(self, txn: _Transaction, message: Message | None) -> None:
        try:
            await defer.maybeDeferred(txn.delivery.abort)
        except Exception:
            log.failure("abort failed")
        if message is not None:
            message.discard()
        elif txn.sink is not None:
            txn.sink.discard()

    def _abort_transaction(self) -> None:
        txn, self._txn = self._txn, None
        if txn is None:
            return
        if txn.sink is not None:
            txn.sink.discard()
        try:
            d = defer.maybeDeferred(txn.delivery.abort)
            d.addErrback(lambda f: log.failure("abort failed", f))
        except Exception:
            log.failure("abort failed")

    # ------------------------------------------------------------------
    # Trace header and transaction log

    def _prefix(self, envelope: Envelope, message: Message) -> bytes:
        headers = list(envelope.add_headers)
        out = [f"{name}: {value}\r\n" for name, value in headers]
        out.append(self.received_header(envelope))
        out.extend(f"{name}: {value}\r\n" for name, value in envelope.msa_headers)
        return "".join(out).encode("utf-8")

    def received_header(self, envelope: Envelope) -> str:
        """RFC 5321 §4.4 trace line; protocol names of RFC 3848 and RFC 6531 §3.7.3."""
        session = self.session
        assert session is not None
        self._note_tls()
        if envelope.smtputf8:
            proto = "UTF8SMTP"
        elif session.esmtp:
            proto = "ESMTP"
        else:
            proto = "SMTP"
        if session.tls:
            proto += "S"
        if session.auth_user is not None and session.esmtp:
            proto += "A"
        helo = session.helo or "unknown"
        peer = session.peer_host
        literal = f"IPv6:{peer}" if ":" in peer else peer
        tls = ""
        if session.tls:
            tls = f"\r\n\t(using {session.tls_version}"
            tls += f" with cipher {session.tls_cipher})" if session.tls_cipher else ")"
        auth = ""
        if session.auth_user is not None and self.settings.add_auth_user_to_received:
            auth = f"\r\n\t(Authenticated sender: {session.auth_user})"
        rcpt = ""
        if len(envelope.recipients) == 1:
            rcpt = f"\r\n\tfor <{envelope.recipients[0].address}>"
        date = _rfc5322_date()
        return (
            f"Received: from {helo} ([{literal}]){tls}{auth}\r\n"
            f"\tby {self.settings.hostname} (mailserv) with {proto} id {envelope.id}"
            f"{rcpt}; {date}\r\n"
        )

    def _log(
        self, envelope: Envelope, reply: SMTPReply, message: Message | None, started: float
    ) -> None:
        session = self.session
        assert session is not None
        log.info(
            "smtp transaction {id} from={sender} rcpts={count} size={size} reply={reply}",
            id=envelope.id,
            peer=session.peer_host,
            helo=session.helo,
            tls=session.tls_version,
            auth_user=session.auth_user,
            sender=envelope.sender,
            rcpts=[str(r.address) for r in envelope.recipients],
            count=len(envelope.recipients),
            verdicts=list(envelope.verdicts),
            size=message.size if message is not None else None,
            reply=f"{reply.code} {reply.enhanced}",
            duration=round(time.monotonic() - started, 6),
            listener=session.listener,
        )


_DATE: list[Any] = [None, ""]  # (second, its RFC 5322 date): one formatdate per second


def _rfc5322_date() -> str:
    """The current time as an RFC 5322 date-time (UTC), as ``email.utils.formatdate``."""
    now = time.time()
    second = int(now)
    if _DATE[0] != second:
        _DATE[0], _DATE[1] = second, formatdate(second, localtime=False)
    return str(_DATE[1])


class _Disconnect(Exception):
    def __init__(self, reply: SMTPReply) -> None:
        super().__init__(str(reply))
        self.reply = reply


_FREE_SPACE: dict[str, tuple[float, int]] = {}


def _enough_space(path: str, needed: float, now: float) -> bool:
    """LIMITS.md: refuse new mail when free space is below 1.5 times the message size.

    statvfs is asked at most once a second per directory.
    """
    cached = _FREE_SPACE.get(path)
    if cached is None or now - cached[0] > 1.0:
        try:
            st = os.statvfs(path)
        except OSError:
            return True
        cached = (now, st.f_bavail * st.f_frsize)
        _FREE_SPACE[path] = cached
    return cached[1] >= needed


class SaslAuth:
    """SMTP AUTH on top of mailserv.auth: mechanisms, exchanges and throttled login."""

    def __init__(self, portal: Any, hostname: str, throttle: Any = None) -> None:
        self.portal = portal
        self.hostname = hostname
        self.throttle = throttle

    def mechanisms(self, secure: bool) -> list[str]:
        return list(sasl.mechanisms_for(self.portal, secure))

    def new(self, name: str) -> Any:
        return sasl.new_mechanism(name, self.hostname, self.portal)

    def login(self, credentials: Any, client_ip: str) -> defer.Deferred[str]:
        from mailserv.interfaces import IMailUser

        if self.throttle is not None:
            d = self.throttle.login(self.portal, credentials, client_ip, IMailUser)
        else:
            d = self.portal.login(credentials, None, IMailUser)
        return d.addCallback(lambda result: str(result[1].user.name))
