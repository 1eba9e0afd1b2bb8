"""The POP3 server: RFC 1939, CAPA (RFC 2449), STLS (RFC 2595), AUTH (RFC 5034), APOP.

``POP3Server`` subclasses ``twisted.mail.pop3.POP3`` for its timeout and
transport plumbing but replaces the line handling, the command dispatch and
every command, because Twisted's cannot be fixed by overriding a hook
(ARCHITECTURE.md defects 1 and 8):

* RETR/TOP byte-stuffing survives any chunking (mailserv.pop3.content);
* ``DELE 0``, negative, huge or non-numeric message numbers get ``-ERR``;
* DELE only marks, deletion happens at QUIT (UPDATE state) and a dropped
  connection deletes nothing;
* STLS exists, and plaintext pipelined after it is discarded (RFC 2595 §4);
* SASL offers the auth layer's mechanisms, CAPA the RFC 2449 tags;
* the idle timeout is 10 minutes (RFC 1939 §3) and TCP_NODELAY is set;
* lines are limited to 512 octets (RFC 2449 §4) without losing sync, and
  pipelined commands wait in a bounded buffer (reading pauses) instead of an
  unbounded list.

The download path costs little per message: the replies to the commands of one
read are written together (up to OUTPUT_BATCH octets at a time; RFC 2449 §6.6
PIPELINING), small messages are read ahead in the ``disk`` pool before the
client asks for them (mailserv.pop3.mailbox: no thread round trip per
message), and QUIT waits for any read in flight, then commits and releases the
maildrop in one disk job.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Callable
from typing import IO, Any, Protocol

from twisted.cred import credentials as cred_credentials
from twisted.cred.error import LoginFailed
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.mail import pop3
from twisted.python.failure import Failure
from zope.interface import implementer

from mailserv.auth import sasl
from mailserv.errors import TemporaryFailure
from mailserv.pop3.content import Stuffer, stuff
from mailserv.pop3.mailbox import SMALL_MESSAGE, Content, Maildrop, MaildropInUse

log = Logger()

# RFC 2449 §4: "the maximum length of a command line is ... 512 octets" (LIMITS.md).
MAX_LINE = 512
# SASL responses (RFC 5034 §4) may be longer than a command line.
MAX_SASL_LINE = 12288
# Pipelined input kept while a command runs; reading pauses beyond it.
MAX_BUFFER = 64 * 1024
# RFC 1939 §3: an autologout timer "of at least 10 minutes".
IDLE_TIMEOUT = 600.0
# LIMITS.md: bad commands before the connection is closed.
MAX_BAD_BEFORE_LOGIN = 3
MAX_BAD_AFTER_LOGIN = 20
STREAM_CHUNK = 64 * 1024
# Replies to pipelined commands are collected and written once this many octets are waiting
# (and at the end of each read), instead of one write and one send per reply.
OUTPUT_BATCH = 64 * 1024

_NUMBER = re.compile(rb"[0-9]{1,10}\Z")

AUTHORIZATION = "AUTHORIZATION"
TRANSACTION = "TRANSACTION"
UPDATE = "UPDATE"


class AuthBackend(Protocol):
    """What the POP3 server needs from the auth layer (mailserv.pop3.PortalBackend)."""

    def login(self, credentials: Any, peer_host: str) -> defer.Deferred[Any]:
        """Deferred[mailserv.directory.User].

        Fails with LoginFailed once the failure delay has passed (and records
        nothing), or at once with TemporaryFailure when a backend is down.  A
        success records POP-before-SMTP for ``peer_host``.
        """

    def apop_enabled(self) -> bool:
        """Can a checker verify APOP (a plaintext-equivalent secret is available)?"""

    def apop_credentials(self, username: bytes, timestamp: bytes, digest: bytes) -> Any:
        """Credentials for ``APOP username digest`` (RFC 1939 §7)."""

    def mechanisms(self, secure: bool) -> list[str]:
        """SASL mechanisms to offer (cleartext ones only when ``secure``)."""

    def start_sasl(self, name: str) -> Any:
        """A new mailserv.auth.sasl.Mechanism for ``name``."""


def _as_bytes(value: int | bytes) -> bytes:
    return value if isinstance(value, bytes) else b"%d" % value


def _is_loopback(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


class POP3Factory(ServerFactory):
    """Builds POP3Server protocols for one listener.

    ``open_maildrop(user)`` returns Deferred[Maildrop] (locked INBOX);
    ``run_disk(fn, *args)`` runs blocking work in the disk pool;
    ``tls_options`` is None when STLS is not offered.
    """

    def __init__(
        self,
        *,
        reactor: Any,
        backend: AuthBackend,
        open_maildrop: Callable[[Any], defer.Deferred[Maildrop]],
        run_disk: Callable[..., defer.Deferred[Any]],
        hostname: str,
        tls_options: Callable[[], Any] | None = None,
        allow_plaintext_auth: str = "loopback",
        idle_timeout: float = IDLE_TIMEOUT,
        login_delay: int = 0,
        max_connections_per_ip: int = 50,
    ) -> None:
        self.reactor = reactor
        self.backend = backend
        self.open_maildrop = open_maildrop
        self.run_disk = run_disk
        self.hostname = hostname
        self.tls_options = tls_options
        self.allow_plaintext_auth = allow_plaintext_auth
        self.idle_timeout = idle_timeout
        self.login_delay = login_delay
        # user name -> reactor time of the last login (RFC 2449 §6.8 LOGIN-DELAY).
        self.last_login: dict[str, float] = {}
        self.max_connections_per_ip = max_connections_per_ip
        self.connections: dict[str, int] = {}

    def buildProtocol(self, addr: Any) -> POP3Server:  # type: ignore[override]
        p = POP3Server()
        p.factory = self
        # TimeoutMixin schedules with ``callLater``: the factory's reactor (a Clock in tests).
        p.callLater = self.reactor.callLater  # type: ignore[method-assign]
        return p


@implementer(IPushProducer)
class _MessageStreamer:
    """Streams a big message from a file read in the disk pool, honouring back-pressure."""

    def __init__(self, proto: POP3Server, fileobj: IO[bytes], stuffer: Stuffer) -> None:
        self._proto = proto
        self._file = fileobj
        self._stuffer = stuffer
        self._paused = False
        self._stopped = False
        self._reading = False
        self._looping = False
        self.done: defer.Deferred[None] = defer.Deferred()

    def start(self) -> defer.Deferred[None]:
        self._proto.transport.registerProducer(self, True)
        self._next()
        return self.done

    def _next(self) -> None:
        self._looping = True
        try:
            while not (self._paused or self._stopped or self._reading or self.done.called):
                self._reading = True
                d = self._proto.factory.run_disk(self._file.read, STREAM_CHUNK)
                d.addCallbacks(self._got, self._failed)
        finally:
            self._looping = False

    def _got(self, data: bytes) -> None:
        self._reading = False
        if self._stopped:
            self._finish(None)
            return
        transport = self._proto.transport
        if not data:
            transport.write(self._stuffer.finish())
            self._finish(None)
            return
        out = self._stuffer.feed(data)
        if self._stuffer.done:
            transport.write(out + self._stuffer.finish())
            self._finish(None)
            return
        self._proto.resetTimeout()
        transport.write(out)
        if not self._looping:
            self._next()

    def _failed(self, failure: Failure) -> None:
        self._reading = False
        log.failure("reading a message failed", failure)
        self._finish(failure)

    def _finish(self, failure: Failure | None) -> None:
        if self.done.called:
            return
        self._proto.transport.unregisterProducer()
        self._proto.factory.run_disk(self._file.close)
        if failure is not None:
            # The response is half sent: the only safe thing is to drop the connection.
            self._proto.transport.loseConnection()
        self.done.callback(None)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if not self._reading:
            self._next()

    def stopProducing(self) -> None:
        self._stopped = True
        if not self._reading:
            self._finish(None)


class POP3Server(pop3.POP3):
    """One POP3 session (RFC 1939 states AUTHORIZATION, TRANSACTION, UPDATE)."""

    factory: POP3Factory  # type: ignore[assignment]
    transport: Any
    timeOut: float = IDLE_TIMEOUT  # type: ignore[assignment]

    def __init__(self) -> None:
        self._inbuf = bytearray()
        self._busy = False
        self._processing = False
        self._paused = False
        self._discarding = False
        self._closing = False
        self._draining = False
        self._counted = False
        self._tls = False
        self.session_state = AUTHORIZATION
        self._user_arg: bytes | None = None
        self._sasl: Any = None  # the mailserv.auth.sasl.Mechanism awaiting a response
        self._bad = 0
        self.maildrop: Maildrop | None = None
        self.user: Any = None
        self._streamer: _MessageStreamer | None = None
        # Replies held while a read's commands run (flushed at the end, or at OUTPUT_BATCH).
        self._corked = False
        self._out: list[bytes] = []
        self._out_len = 0
        # Read-ahead jobs in the disk pool, the messages they read, who waits for them to end.
        self._reads = 0
        self._reading: set[int] = set()
        self._read_waiters: list[defer.Deferred[None]] = []

    # -- connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        """Send the greeting (RFC 1939 §4); it carries the APOP timestamp when APOP works."""
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, NotImplementedError, OSError):
            pass
        host = self._peer_host()
        count = self.factory.connections.get(host, 0) + 1
        self.factory.connections[host] = count
        self._counted = True
        if count > self.factory.max_connections_per_ip:
            self._err(b"[SYS/TEMP] Too many connections from your address.")
            self._close()
            return
        self.timeOut = self.factory.idle_timeout
        self.setTimeout(self.timeOut)
        if self.factory.backend.apop_enabled():
            self.magic = b"<%d.%s@%s>" % (
                os.getpid(),
                secrets.token_hex(12).encode("ascii"),
                self.factory.hostname.encode("ascii", "replace"),
            )
            self._ok(b"POP3 server ready " + self.magic)
        else:
            self.magic = None
            self._ok(b"POP3 server ready")

    def connectionLost(self, reason: Failure | None = None) -> None:
        """A dropped connection deletes nothing (RFC 1939 §6); the maildrop is released."""
        self._closing = True
        self.setTimeout(None)
        if self._counted:
            self._counted = False
            host = self._peer_host()
            left = self.factory.connections.get(host, 1) - 1
            if left > 0:
                self.factory.connections[host] = left
            else:
                self.factory.connections.pop(host, None)
        if self._streamer is not None:
            self._streamer.stopProducing()
        if self.session_state != UPDATE:
            # During UPDATE the expunge runs to its end and releases the maildrop itself.
            self._release()

    def drain(self) -> None:
        """Shutdown: finish the command in progress, then close without UPDATE.

        Nothing marked with DELE is removed (RFC 1939 §6: only QUIT does that);
        the client downloads again next time, which loses nothing.
        """
        self._draining = True
        if not self._busy and not self._closing:
            self._err(b"[SYS/TEMP] Server shutting down, try again later.")
            self._close()

    def timeoutConnection(self) -> None:
        """RFC 1939 §3 autologout: no UPDATE state, nothing is deleted."""
        if self._streamer is not None:
            # A client that stopped reading mid-message: no room for a reply.
            self._closing = True
            self.transport.abortConnection()
            return
        self._err(b"Disconnected for inactivity.")
        self._close()

    @property
    def secure(self) -> bool:
        return self._tls or ISSLTransport.providedBy(self.transport)

    def _peer_host(self) -> str:
        return str(getattr(self.transport.getPeer(), "host", ""))

    def _plaintext_ok(self) -> bool:
        """May cleartext credentials be used here (LIMITS.md; RFC 2595 §2.2)?"""
        policy = self.factory.allow_plaintext_auth
        if self.secure or policy == "always":
            return True
        return policy == "loopback" and _is_loopback(self._peer_host())

    def _release(self) -> None:
        """Hand the maildrop back (after any read in flight), without UPDATE."""
        maildrop, self.maildrop = self.maildrop, None
        if maildrop is not None:
            d = self._when_read()
            d.addCallback(lambda _: self.factory.run_disk(maildrop.close))
            d.addErrback(lambda f: log.failure("closing the maildrop failed", f))

    def _close(self) -> None:
        self._closing = True
        self._inbuf.clear()
        self._flush()
        self.transport.loseConnection()

    # -- responses -----------------------------------------------------------

    def _write(self, data: bytes) -> None:
        """Send a reply, or hold it while the commands of one read run."""
        if self._corked:
            self._out.append(data)
            self._out_len += len(data)
            if self._out_len >= OUTPUT_BATCH:
                self._flush()
        else:
            self.transport.write(data)

    def _flush(self) -> None:
        """Write the held replies (before STLS, a close or a streamed message, and per read)."""
        if self._out:
            out, self._out = self._out, []
            self._out_len = 0
            self.transport.writeSequence(out)

    def _ok(self, text: bytes = b"") -> None:
        self._write(b"+OK " + text + b"\r\n" if text else b"+OK\r\n")

    def _err(self, text: bytes) -> None:
        self._write(b"-ERR " + text + b"\r\n")

    def _bad_command(self, text: bytes) -> None:
        self._err(text)
        self._bad += 1
        limit = MAX_BAD_AFTER_LOGIN if self.maildrop is not None else MAX_BAD_BEFORE_LOGIN
        if self._bad >= limit:
            self._err(b"Too many bad commands.")
            self._close()

    # -- input ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._inbuf += data
        self._process()
        if self._busy and len(self._inbuf) > MAX_BUFFER and not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        self._corked = True
        handled = False
        inbuf = self._inbuf
        try:
            while not (self._busy or self._closing):
                limit = MAX_SASL_LINE if self._sasl is not None else MAX_LINE
                nl = inbuf.find(b"\n")
                if nl < 0:
                    if len(inbuf) >= limit:
                        # Too long already: answer now, skip to the end of the line.
                        inbuf.clear()
                        if not self._discarding:
                            self._discarding = True
                            self._line_too_long()
                    break
                line = bytes(inbuf[:nl])
                del inbuf[: nl + 1]
                if self._discarding:
                    self._discarding = False
                    continue
                if nl + 1 > limit:
                    self._line_too_long()
                    continue
                if line.endswith(b"\r"):
                    line = line[:-1]
                handled = True
                result = self._handle_line(line)
                if result is not None:
                    # Later lines wait; if it already fired, _command_done clears this at once.
                    self._busy = True
                    result.addBoth(self._command_done)
        finally:
            self._processing = False
            self._corked = False
            self._flush()
        if handled:
            self.resetTimeout()
        if not self._busy and self._paused and not self._closing:
            self._paused = False
            self.transport.resumeProducing()

    def _command_done(self, result: Any) -> None:
        if isinstance(result, Failure):
            self._unexpected(result)
        self._busy = False
        if self._draining:
            self.drain()
        elif not self._closing:
            self.resetTimeout()
            self._process()

    def _unexpected(self, failure: Failure) -> None:
        log.failure("POP3 command failed", failure)
        if not self._closing:
            self._err(b"[SYS/TEMP] Internal error, try again later.")

    def _line_too_long(self) -> None:
        if self._sasl is not None:
            self._sasl = None
            self._err(b"Authentication response too long.")
        else:
            self._bad_command(b"Line too long.")

    def _handle_line(self, line: bytes) -> defer.Deferred[Any] | None:
        if self._sasl is not None:
            return self._sasl_response(line)
        name, _, rest = line.partition(b" ")
        handler = _COMMANDS.get(name.upper())
        if handler is None:
            self._bad_command(b"Unknown command.")
            return None
        states, method = handler
        if self.session_state not in states:
            if self.session_state == AUTHORIZATION:
                self._bad_command(b"Not logged in.")
            else:
                self._bad_command(b"Command not valid in this state.")
            return None
        result: defer.Deferred[Any] | None = method(self, rest)
        return result

    # -- argument parsing ----------------------------------------------------

    def _words(self, rest: bytes, low: int, high: int) -> list[bytes] | None:
        words = rest.split()
        if not low <= len(words) <= high:
            self._bad_command(b"Wrong number of arguments.")
            return None
        return words

    def _message(self, word: bytes) -> int | None:
        """A message number that refers to a live message, or None after an -ERR (RFC 1939 §5)."""
        assert self.maildrop is not None
        if not _NUMBER.match(word):
            self._err(b"Invalid message number.")
            return None
        number = int(word)
        if not self.maildrop.exists(number):
            self._err(b"No such message.")
            return None
        if not self.maildrop.valid(number):
            self._err(b"Message is deleted.")
            return None
        return number

    # -- AUTHORIZATION state -------------------------------------------------

    def cmd_CAPA(self, rest: bytes) -> None:
        """RFC 2449 §5: the capabilities valid now."""
        if self._words(rest, 0, 0) is None:
            return
        caps = [b"TOP"]
        before_login = self.session_state == AUTHORIZATION
        plaintext = self._plaintext_ok()
        if before_login and plaintext:
            caps.append(b"USER")
        caps.append(b"UIDL")
        if before_login:
            mechs = self.factory.backend.mechanisms(plaintext)
            if mechs:
                caps.append(b"SASL " + " ".join(mechs).encode("ascii"))
        caps += [b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        if before_login and not self.secure and self.factory.tls_options is not None:
            caps.append(b"STLS")
        caps.append(b"EXPIRE NEVER")
        caps.append(b"LOGIN-DELAY %d" % self.factory.login_delay)
        caps.append(b"IMPLEMENTATION mailserv")
        self._write(
            b"+OK Capability list follows\r\n" + b"".join(c + b"\r\n" for c in caps) + b".\r\n"
        )

    def cmd_STLS(self, rest: bytes) -> None:
        """RFC 2595 §4: start TLS; anything the client pipelined after STLS is discarded."""
        if self._words(rest, 0, 0) is None:
            return
        if self.secure:
            self._err(b"TLS is already active.")
            return
        if self.factory.tls_options is None:
            self._err(b"TLS is not available.")
            return
        self._ok(b"Begin TLS negotiation now.")
        self._flush()  # the reply goes out in plaintext, before the handshake
        self._inbuf.clear()
        self._user_arg = None
        self.transport.startTLS(self.factory.tls_options())
        self._tls = True

    def cmd_USER(self, rest: bytes) -> None:
        """RFC 1939 §7 USER; refused before TLS unless allowed (RFC 2595 §2.2)."""
        self._user_arg = None
        if not self._plaintext_ok():
            self._err(
                b"[AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
            )
            return
        words = self._words(rest, 1, 1)
        if words is None:
            return
        self._user_arg = words[0]
        self._ok(b"Send your password.")

    def cmd_PASS(self, rest: bytes) -> defer.Deferred[Any] | None:
        """RFC 1939 §7 PASS: the argument is the rest of the line (it may contain spaces)."""
        user, self._user_arg = self._user_arg, None
        if user is None:
            self._bad_command(b"USER first.")
            return None
        # An empty password goes to the checker too, which refuses it after the delay.
        return self._login(cred_credentials.UsernamePassword(user, rest))

    def cmd_APOP(self, rest: bytes) -> defer.Deferred[Any] | None:
        """RFC 1939 §7 APOP name digest; only when the greeting carried a timestamp."""
        self._user_arg = None
        if self.magic is None:
            self._bad_command(b"APOP is not available.")
            return None
        words = self._words(rest, 2, 2)
        if words is None:
            return None
        name, digest = words
        return self._login(self.factory.backend.apop_credentials(name, self.magic, digest))

    def cmd_AUTH(self, rest: bytes) -> defer.Deferred[Any] | None:
        """RFC 5034 §4: AUTH mechanism [initial-response]; bare AUTH lists the mechanisms."""
        self._user_arg = None
        words = self._words(rest, 0, 2)
        if words is None:
            return None
        mechs = self.factory.backend.mechanisms(self._plaintext_ok())
        if not words:
            self._write(
                b"+OK\r\n" + b"".join(m.encode("ascii") + b"\r\n" for m in mechs) + b".\r\n"
            )
            return None
        name = words[0].upper().decode("ascii", "replace")
        if name not in mechs:
            self._err(b"Unsupported authentication mechanism.")
            return None
        mechanism = self.factory.backend.start_sasl(name)
        initial: bytes | None = None
        if len(words) == 2:
            try:
                initial = sasl.decode_response(words[1])  # "=" is empty (RFC 5034 §4)
            except sasl.SASLError as exc:
                self._sasl_error(exc)
                return None
        return self._sasl_next(mechanism, mechanism.start(initial))

    def _sasl_response(self, line: bytes) -> defer.Deferred[Any] | None:
        mechanism, self._sasl = self._sasl, None
        try:
            response = sasl.decode_response(line)  # "*" cancels (RFC 5034 §4)
        except sasl.SASLError as exc:
            self._sasl_error(exc)
            return None
        return self._sasl_next(mechanism, mechanism.step(response))

    def _sasl_next(self, mechanism: Any, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        def answer(result: Any) -> defer.Deferred[Any] | None:
            if isinstance(result, sasl.Challenge):
                self._sasl = mechanism
                self._write(b"+ " + sasl.encode_challenge(result.data) + b"\r\n")
                return None
            return self._login(result)

        def failed(failure: Failure) -> None:
            failure.trap(sasl.SASLError)
            self._sasl_error(failure.value or sasl.SASLError())

        return d.addCallbacks(answer, failed)

    def _sasl_error(self, exc: BaseException) -> None:
        self._sasl = None
        if isinstance(exc, sasl.SASLCancelled):
            self._err(b"Authentication cancelled.")
        else:
            self._err(b"Malformed authentication exchange.")

    # -- login ---------------------------------------------------------------

    def _login(self, creds: Any) -> defer.Deferred[Any]:
        d = self.factory.backend.login(creds, self._peer_host())
        d.addCallbacks(self._logged_in, self._login_failed)
        return d

    def _login_failed(self, failure: Failure) -> None:
        if self._closing:
            return
        if failure.check(TemporaryFailure):
            self._err(b"[SYS/TEMP] Authentication service unavailable, try again later.")
        elif failure.check(LoginFailed):
            # The throttle has already waited the failure delay.
            self._err(b"[AUTH] Authentication failed.")
        else:
            log.failure("POP3 login failed unexpectedly", failure)
            self._err(b"[SYS/TEMP] Internal error, try again later.")

    def _logged_in(self, user: Any) -> defer.Deferred[Any] | None:
        if self._closing:
            return None
        delay = self.factory.login_delay
        now = self.factory.reactor.seconds()
        last = self.factory.last_login.get(user.name)
        if delay and last is not None and now - last < delay:
            # RFC 2449 §8.1.2: logging in too soon.
            self._err(b"[LOGIN-DELAY] Wait %d seconds between logins." % delay)
            return None
        d = self.factory.open_maildrop(user)
        d.addCallbacks(self._opened, self._open_failed, callbackArgs=(user,))
        return d

    def _opened(self, maildrop: Maildrop, user: Any) -> defer.Deferred[Any] | None:
        if self._closing:
            self.factory.run_disk(maildrop.close)
            return None
        self.maildrop = maildrop
        self.user = user
        self.session_state = TRANSACTION
        self._bad = 0
        self.factory.last_login[user.name] = self.factory.reactor.seconds()
        count, octets = maildrop.stat()
        self._ok(b"Logged in, %d messages (%d octets)." % (count, octets))
        log.info("pop3 login {user} from {peer}", user=user.name, peer=self._peer_host())
        return None

    def _open_failed(self, failure: Failure) -> None:
        if failure.check(MaildropInUse):
            self._err(b"[IN-USE] Mailbox is locked by another POP3 session.")
        elif failure.check(TemporaryFailure):
            self._err(b"[SYS/TEMP] Mailbox unavailable, try again later.")
        elif failure.check(PermissionError):
            log.failure("cannot open the maildrop", failure)
            self._err(b"[SYS/PERM] Mailbox cannot be opened.")
        else:
            log.failure("cannot open the maildrop", failure)
            self._err(b"[SYS/TEMP] Mailbox unavailable, try again later.")

    # -- TRANSACTION state ---------------------------------------------------

    def cmd_STAT(self, rest: bytes) -> None:
        """RFC 1939 §5 STAT: count and size of the messages not marked deleted."""
        if self._words(rest, 0, 0) is None:
            return
        assert self.maildrop is not None
        self._ok(b"%d %d" % self.maildrop.stat())

    def cmd_LIST(self, rest: bytes) -> None:
        """RFC 1939 §5 LIST [msg]: scan listings."""
        assert self.maildrop is not None
        self._listing(
            rest, b"+OK %d messages (%d octets)" % self.maildrop.stat(), self.maildrop.size
        )

    def cmd_UIDL(self, rest: bytes) -> None:
        """RFC 1939 §7 UIDL [msg]: unique-id listings."""
        assert self.maildrop is not None
        self._listing(rest, b"+OK", self.maildrop.uidl)

    def _listing(self, rest: bytes, header: bytes, value: Callable[[int], int | bytes]) -> None:
        """One line for message ``rest`` or a multi-line list of every live message."""
        words = self._words(rest, 0, 1)
        if words is None:
            return
        assert self.maildrop is not None
        if words:
            number = self._message(words[0])
            if number is not None:
                self._ok(b"%d %s" % (number, _as_bytes(value(number))))
            return
        lines = [b"%d %s\r\n" % (n, _as_bytes(value(n))) for n, _, _ in self.maildrop.listing()]
        self._write(header + b"\r\n" + b"".join(lines) + b".\r\n")

    def cmd_RETR(self, rest: bytes) -> defer.Deferred[Any] | None:
        """RFC 1939 §5 RETR msg: the whole message, byte-stuffed."""
        words = self._words(rest, 1, 1)
        if words is None:
            return None
        number = self._message(words[0])
        if number is None:
            return None
        assert self.maildrop is not None
        return self._send(number, b"%d octets" % self.maildrop.size(number), None)

    def cmd_TOP(self, rest: bytes) -> defer.Deferred[Any] | None:
        """RFC 1939 §7 TOP msg n: the header, the blank line and n lines of the body."""
        words = self._words(rest, 2, 2)
        if words is None:
            return None
        if not _NUMBER.match(words[1]):
            self._err(b"Invalid number of lines.")
            return None
        number = self._message(words[0])
        if number is None:
            return None
        return self._send(number, b"Top of message follows", int(words[1]))

    def _send(
        self, number: int, status: bytes, body_lines: int | None
    ) -> defer.Deferred[Any] | None:
        """Send message ``number`` (all of it, or TOP's part); None when sent at once."""
        maildrop = self.maildrop
        assert maildrop is not None
        if maildrop.size(number) > SMALL_MESSAGE:
            return self._send_big(maildrop, number, status, body_lines)
        keep = body_lines is not None  # TOP leaves the content for the RETR that usually follows
        content = maildrop.take_cached(number, keep)
        if content is not None:
            self._send_content(status, content, body_lines)
            self._prefetch(maildrop, number)
            return None
        if number in self._reading:
            # A read in flight (a prefetch) brings it: look again when it ends.
            d = self._when_read()
            d.addCallback(
                lambda _: None if self._closing else self._send(number, status, body_lines)
            )
            return d

        def send_small(_: object) -> None:
            content = maildrop.take_cached(number, keep)
            if self._closing:
                return
            if content is None:  # read, but marked deleted meanwhile: cannot happen while busy
                self._err(b"[SYS/TEMP] Cannot read the message, try again later.")
                return
            self._send_content(status, content, body_lines)

        d = self._read(maildrop, maildrop.read_ahead(number), required=True)
        d.addCallbacks(send_small, self._read_failed)
        return d

    def _send_content(self, status: bytes, content: Content, body_lines: int | None) -> None:
        """The whole response for a message in memory, as one write (or held with the others)."""
        data, body, end = content
        head = b"+OK " + status + b"\r\n"
        if body_lines is not None:
            self._write(head + stuff(data, body_lines))
            return
        if self._corked:
            self._out += (head, body, end)
            self._out_len += len(head) + len(body) + len(end)
            if self._out_len >= OUTPUT_BATCH:
                self._flush()
        else:
            self.transport.writeSequence((head, body, end))

    # -- read-ahead ------------------------------------------------------------

    def _read(self, maildrop: Maildrop, numbers: list[int], required: bool) -> defer.Deferred[None]:
        """Read messages ``numbers`` into the maildrop's cache in one disk job.

        With ``required`` the job fails when the first message cannot be read;
        the others are skipped when they are gone.  At most one background read
        runs at a time, beside at most one read a RETR waits for.
        """
        uids = [maildrop.uid(n) for n in numbers]
        self._reads += 1
        self._reading.update(numbers)
        d = self.factory.run_disk(maildrop.read_messages, uids, required)

        def got(found: dict[int, Content]) -> None:
            for n, uid in zip(numbers, uids, strict=True):
                content = found.get(uid)
                if content is not None:
                    maildrop.remember(n, content)

        def ended(result: Any) -> Any:
            self._reads -= 1
            self._reading.difference_update(numbers)
            if self._reads:
                return result
            waiters, self._read_waiters = self._read_waiters, []
            for waiter in waiters:
                waiter.callback(None)
            if not (required or self._closing or self._reads) and self.maildrop is maildrop:
                # Go on reading ahead (unless QUIT or a close waited for this read).
                self._start_prefetch(maildrop, maildrop.prefetch_more())
            return result

        return d.addCallback(got).addBoth(ended)

    def _prefetch(self, maildrop: Maildrop, number: int) -> None:
        """Read the next messages in the background before the cache runs out."""
        if not self._reads:
            self._start_prefetch(maildrop, maildrop.prefetch(number))

    def _start_prefetch(self, maildrop: Maildrop, numbers: list[int]) -> None:
        if numbers:
            d = self._read(maildrop, numbers, required=False)
            d.addErrback(lambda f: log.failure("reading ahead failed", f))

    def _when_read(self) -> defer.Deferred[None]:
        """Fires once no read is in flight (whatever its outcome)."""
        if not self._reads:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._read_waiters.append(d)
        return d

    def _send_big(
        self, maildrop: Maildrop, number: int, status: bytes, body_lines: int | None
    ) -> defer.Deferred[Any]:
        """Stream a message too big to hold, with back-pressure."""
        run_disk = self.factory.run_disk

        def send_big(fileobj: IO[bytes]) -> defer.Deferred[None] | None:
            if self._closing:
                run_disk(fileobj.close)
                return None
            self._ok(status)
            self._flush()  # the streamer writes to the transport itself
            self._streamer = _MessageStreamer(self, fileobj, Stuffer(body_lines))
            return self._streamer.start().addBoth(self._streamed)

        d = run_disk(maildrop.open_message, maildrop.uid(number))
        d.addCallbacks(send_big, self._read_failed)
        return d

    def _streamed(self, result: Any) -> Any:
        self._streamer = None
        return result

    def _read_failed(self, failure: Failure) -> None:
        if self._closing:
            return
        if failure.check(KeyError, FileNotFoundError):
            self._err(b"Message was removed by another session.")
        else:
            log.failure("reading a message failed", failure)
            self._err(b"[SYS/TEMP] Cannot read the message, try again later.")

    def cmd_DELE(self, rest: bytes) -> None:
        """RFC 1939 §5 DELE msg: mark only; the message goes at QUIT (UPDATE state)."""
        words = self._words(rest, 1, 1)
        if words is None:
            return
        number = self._message(words[0])
        if number is None:
            return
        assert self.maildrop is not None
        self.maildrop.mark_deleted(number)
        self._ok(b"Message %d deleted." % number)

    def cmd_NOOP(self, rest: bytes) -> None:
        """RFC 1939 §5 NOOP."""
        if self._words(rest, 0, 0) is not None:
            self._ok()

    def cmd_RSET(self, rest: bytes) -> None:
        """RFC 1939 §5 RSET: unmark every message marked deleted."""
        if self._words(rest, 0, 0) is None:
            return
        assert self.maildrop is not None
        self.maildrop.reset()
        self._ok(b"%d messages (%d octets)." % self.maildrop.stat())

    def cmd_QUIT(self, rest: bytes) -> defer.Deferred[Any] | None:
        """RFC 1939 §6: in TRANSACTION, enter UPDATE and remove the marked messages."""
        if self.session_state == AUTHORIZATION:
            self._ok(b"Logging out.")
            self._close()
            return None
        maildrop, self.maildrop = self.maildrop, None
        assert maildrop is not None
        self.session_state = UPDATE
        self._inbuf.clear()
        wanted = len(maildrop) - maildrop.stat()[0]
        # One disk job commits and releases the maildrop (lock released before the reply, so
        # the client may log in again at once), after any read still in flight.
        d = self._when_read()
        d.addCallback(lambda _: self.factory.run_disk(maildrop.update))

        def committed(removed: Any) -> None:
            # Messages another session removed meanwhile are gone all the same.
            self._finish_update(b"+OK Logging out, %d messages deleted.\r\n" % wanted)

        def failed(failure: Failure) -> None:
            log.failure("POP3 UPDATE failed", failure)
            self._finish_update(b"-ERR [SYS/TEMP] Deleted messages were not removed.\r\n")

        return d.addCallbacks(committed, failed)

    def _finish_update(self, reply: bytes) -> None:
        if not self._closing:
            self._write(reply)
            self._close()


_STATES: dict[str, tuple[str, ...]] = {
    "CAPA": (AUTHORIZATION, TRANSACTION),
    "QUIT": (AUTHORIZATION, TRANSACTION),
    "STLS": (AUTHORIZATION,),
    "USER": (AUTHORIZATION,),
    "PASS": (AUTHORIZATION,),
    "APOP": (AUTHORIZATION,),
    "AUTH": (AUTHORIZATION,),
    "STAT": (TRANSACTION,),
    "LIST": (TRANSACTION,),
    "UIDL": (TRANSACTION,),
    "RETR": (TRANSACTION,),
    "TOP": (TRANSACTION,),
    "DELE": (TRANSACTION,),
    "NOOP": (TRANSACTION,),
    "RSET": (TRANSACTION,),
}
# Command name (upper case) -> (states where it is valid, handler); RFC 1939 §3.
_COMMANDS: dict[bytes, tuple[tuple[str, ...], Callable[..., Any]]] = {
    name.encode("ascii"): (states, getattr(POP3Server, "cmd_" + name))
    for name, states in _STATES.items()
}
