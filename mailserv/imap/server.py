"""A hardened IMAP4rev1 server (RFC 3501) with the extensions modern clients use.

Purpose-built on ``twisted.internet.protocol.Protocol`` rather than a subclass
of ``twisted.mail.imap4.IMAP4Server``: the defects of ARCHITECTURE.md item 9
sit in that class's line/literal state machine, its recursive parser, its
regex LIST matching and its synchronous account calls, which is most of the
class.  Here:

- framing (lines and literals) is bounded: 8 KiB lines before login, 64 KiB
  commands after, APPEND up to APPENDLIMIT (RFC 7889), spooled to a temporary
  file; non-synchronising literals are LITERAL- (4096 octets, RFC 7888) before
  login and LITERAL+ after it, under the same bounds as synchronising ones; a
  too-large one is refused at once and its octets dropped (RFC 7888 section 4);
- the tokenizer is iterative with a nesting limit (parser.py);
- every store call runs in the ``disk`` thread pool;
- STARTTLS drops whatever the client pipelined after it (CVE-2011-0411 class);
- LIST patterns are matched by an NFA (account.Pattern), never a regex.
"""

from __future__ import annotations

import email.utils
import functools
import io
import re
import tempfile
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import LoginFailed
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailserv.auth import sasl
from mailserv.auth.usernames import InvalidUsername, acceptable_password, normalize_username
from mailserv.errors import (
    FolderExists,
    InvalidFolderName,
    NoSuchFolder,
    QuotaExceeded,
    TemporaryFailure,
)
from mailserv.imap import account as acct
from mailserv.imap import fetch as fetchmod
from mailserv.imap import search as searchmod
from mailserv.imap.mailbox import ChangeHub, SelectedMailbox, SharedFolder, flags_item, locked
from mailserv.imap.parser import (
    Args,
    Atom,
    Literal,
    LiteralFile,
    ParseError,
    Token,
    as_bytes,
    format_set,
    literal_marker,
    parse_seqset,
    resolve_seqset,
    strip_marker,
    tokenize,
)

log = Logger()

SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
FETCH_CHUNK = 100
FETCH_CHUNK_NO_DATA = 2000  # FLAGS, UID, sizes, dates: built on the reactor, about 2 ms a 1000
MAX_LITERALS = 8  # per command other than APPEND
MAX_APPEND_MESSAGES = 32  # messages in one MULTIAPPEND (RFC 3502), each up to APPENDLIMIT
FETCH_CHUNK_BYTES = 4 << 20  # message octets read per disk job of a FETCH
CLOSE_GRACE = 0.5  # seconds between a TLS close_notify and dropping the TCP connection
_UNSAFE_TEXT = re.compile(r"[^\x20-\x7e]")
_TAG_CHARS = frozenset(
    b"!#$&'+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[^_`abcdefghijklmnopqrstuvwxyz|}~"
)


@dataclass
class Settings:
    """Limits of one IMAP listener (LIMITS.md)."""

    max_line_unauth: int = 8192
    max_command: int = 65536
    max_nonsync_literal: int = 4096  # LITERAL- (RFC 7888 section 5): before login, or always
    literal_plus: bool = True  # LITERAL+ after login, bounded like synchronising literals
    max_append: int = 10_240_000
    bad_commands_unauth: int = 3
    bad_commands_auth: int = 20
    login_timeout: float = 60.0
    idle_timeout: float = 1800.0
    idle_poll: float = 0.5
    max_connections_per_user_ip: int = 10
    allow_plaintext_auth: str = "loopback"  # never | loopback | always
    auth_failure_delay: float = 2.0
    spool_threshold: int = 1 << 20
    server_name: str = "mailserv"


@dataclass
class Context:
    """What a session needs from the running service (MailService, or a fake in tests)."""

    reactor: Any
    auth: Any  # login(creds, host) -> Deferred[User]; mechanisms(secure); start_sasl(name)
    store_for: Callable[[Any], Any]
    run: Callable[..., defer.Deferred[Any]]  # run(fn, *args) in the disk pool
    hub: ChangeHub
    settings: Settings = field(default_factory=Settings)
    tls_options: Callable[[], Any] | None = None


class ImapError(Exception):
    """Ends a command with a tagged NO or BAD: ``status`` and text with its response code."""

    def __init__(self, status: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def _no(text: str) -> ImapError:
    return ImapError("NO", text)


def _quote(value: str | bytes) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _is_loopback(peer: Any) -> bool:
    host = getattr(peer, "host", "")
    return (
        host.startswith("127.")
        or host in ("::1", "::ffff:127.0.0.1")
        or host.startswith("::ffff:127.")
    )


def _parse_date_time(raw: bytes) -> float:
    """APPEND date-time ``"dd-Mon-yyyy hh:mm:ss +zzzz"`` (RFC 3501 section 9)."""
    text = raw.decode("ascii", "replace").strip()
    try:
        day, rest = text.split("-", 1)
        parsed = email.utils.parsedate_tz(f"{day.strip()} {rest.replace('-', ' ', 1)}")
    except ValueError:
        parsed = None
    if parsed is None:
        raise ParseError("invalid date-time")
    return float(email.utils.mktime_tz(parsed))


@implementer(IPushProducer)
class IMAPServer(Protocol):
    """One IMAP session (RFC 3501 section 3: not authenticated, authenticated, selected)."""

    transport: Any

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.reactor = ctx.reactor
        self.state = "notauth"
        self.buffer = bytearray()
        self.fragments: list[bytes | LiteralFile] = []
        self.command_size = 0
        self.literal_left = 0
        self.literal_sink: Any = None
        self.literal_spooled = False
        self.discard_left = 0
        self.discarding_command = False
        self.skip_line = False
        self.busy = False
        self.closed = False
        self.reading_paused = False
        self.bad_count = 0
        self.line_handler: Callable[[bytes], None] | None = None
        self.timeout_call: Any = None
        self.user: Any = None
        self.account: acct.AsyncAccount | None = None
        self.selected: SelectedMailbox | None = None
        self.selected_key: tuple[str, str] | None = None
        self.dirty = False
        self.condstore = False
        self.qresync = False
        self.utf8 = False  # ENABLE UTF8=ACCEPT (RFC 6855): names travel as UTF-8
        self.conn_key: tuple[str, str] | None = None
        self.idle_tag: bytes | None = None
        self.idle_call: Any = None
        self.idle_syncing: defer.Deferred[Any] | None = None
        self.write_paused: defer.Deferred[None] | None = None
        self.is_paused = False
        self.abort_call: Any = None

    # ------------------------------------------------------------------
    # Connection

    @property
    def secure(self) -> bool:
        return ISSLTransport.providedBy(self.transport)

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.send_line(
            b"* OK [CAPABILITY " + self.capabilities() + b"] " + self._server_name() + b" ready."
        )
        self._reset_timeout()

    def _server_name(self) -> bytes:
        return self.settings.server_name.encode("ascii", "replace")

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.closed = True
        if self.abort_call is not None and self.abort_call.active():
            self.abort_call.cancel()
        if self.timeout_call is not None and self.timeout_call.active():
            self.timeout_call.cancel()
        self._stop_idle_poll()
        self._deselect()
        self._release_connection()
        self._drop_literal()
        if self.write_paused is not None:
            d, self.write_paused = self.write_paused, None
            d.callback(None)

    # IPushProducer: the transport tells us when its write buffer is full.
    def pauseProducing(self) -> None:
        self.is_paused = True

    def resumeProducing(self) -> None:
        self.is_paused = False
        if self.write_paused is not None:
            d, self.write_paused = self.write_paused, None
            d.callback(None)

    def stopProducing(self) -> None:
        self.closed = True

    def _drain(self) -> defer.Deferred[None]:
        if not self.is_paused or self.closed:
            return defer.succeed(None)
        if self.write_paused is None:
            self.write_paused = defer.Deferred()
        return self.write_paused

    def send_line(self, line: bytes) -> None:
        if not self.closed:
            self.transport.write(line + b"\r\n")

    def send_lines(self, lines: list[bytes]) -> None:
        if lines and not self.closed:
            self.transport.write(b"\r\n".join(lines) + b"\r\n")

    def close(self, bye: bytes | None = None) -> None:
        if bye is not None:
            self.send_line(b"* BYE " + bye)
        self.closed = True
        self._release_connection()
        self.transport.loseConnection()
        # Over TLS, loseConnection waits for the client's close_notify; clients such as
        # mbsync wait for the TCP close instead.  Drop the connection once the output
        # (BYE, the tagged reply, our close_notify) has had time to leave.
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None and self.secure:
            self.abort_call = self.reactor.callLater(CLOSE_GRACE, _abort_quietly, abort)

    def _release_connection(self) -> None:
        """Free this session's place in the per user and IP count (at LOGOUT, not later)."""
        if self.conn_key is not None:
            self.ctx.hub.remove_connection(self.conn_key)
            self.conn_key = None

    def _reset_timeout(self) -> None:
        if self.timeout_call is not None and self.timeout_call.active():
            self.timeout_call.cancel()
        delay = (
            self.settings.login_timeout if self.state == "notauth" else self.settings.idle_timeout
        )
        self.timeout_call = self.reactor.callLater(delay, self._timed_out)

    def _timed_out(self) -> None:
        self.close(b"Autologout; idle for too long")

    def capabilities(self) -> bytes:
        caps = ["IMAP4rev1", "SASL-IR", "LITERAL+" if self._literal_plus() else "LITERAL-"]
        caps.extend(["ID", "ENABLE", "IDLE"])
        if self.state == "notauth":
            if not self.secure and self.ctx.tls_options is not None:
                caps.append("STARTTLS")
            if not self._plaintext_allowed():
                caps.append("LOGINDISABLED")
            # without TLS only the challenge mechanisms (CRAM-MD5, SCRAM) are offered
            caps.extend("AUTH=" + m for m in self._mechanisms())
        else:
            caps.extend(
                [
                    "NAMESPACE", "UIDPLUS", "MOVE", "UNSELECT", "CHILDREN", "SPECIAL-USE",
                    "LIST-EXTENDED", "LIST-STATUS", "QUOTA", "QUOTA=RES-STORAGE",
                    "QUOTA=RES-MESSAGE", f"APPENDLIMIT={self.settings.max_append}",
                    "CONDSTORE", "QRESYNC", "ESEARCH", "SORT", "SORT=DISPLAY",
                    "THREAD=ORDEREDSUBJECT", "THREAD=REFERENCES", "STATUS=SIZE", "UTF8=ACCEPT",
                    "BINARY", "MULTIAPPEND",
                ]
            )  # fmt: skip
        return " ".join(caps).encode("ascii")

    def _literal_plus(self) -> bool:
        """RFC 7888: LITERAL+ once authenticated (a non-synchronising literal is then bounded
        like a synchronising one: APPENDLIMIT, the command limit); LITERAL- (4096 octets)
        before, where the limits are small.  Never both at once (section 5)."""
        return self.settings.literal_plus and self.state != "notauth"

    def _plaintext_allowed(self) -> bool:
        mode = self.settings.allow_plaintext_auth
        if self.secure or mode == "always":
            return True
        return mode == "loopback" and _is_loopback(self.transport.getPeer())

    def _mechanisms(self) -> list[str]:
        return list(self.ctx.auth.mechanisms(self._plaintext_allowed()))

    # ------------------------------------------------------------------
    # Framing: lines and literals

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        self.buffer += data
        self._process()

    def _line_limit(self) -> int:
        return (
            self.settings.max_line_unauth if self.state == "notauth" else self.settings.max_command
        )

    def _process(self) -> None:
        while self.buffer and not self.closed and not self.busy:
            if self.discard_left:
                n = min(self.discard_left, len(self.buffer))
                del self.buffer[:n]
                self.discard_left -= n
                continue
            if self.literal_left:
                self._read_literal()
                continue
            if self.skip_line:
                idx = self.buffer.find(b"\n")
                if idx < 0:
                    self.buffer.clear()
                    return
                del self.buffer[: idx + 1]
                self.skip_line = False
                continue
            idx = self.buffer.find(b"\n")
            if idx < 0:
                if len(self.buffer) > self._line_limit():
                    self._line_too_long()
                return
            if idx > self._line_limit():
                self._line_too_long()
                continue
            line = bytes(self.buffer[:idx])
            del self.buffer[: idx + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            self._reset_timeout()
            if self.line_handler is not None:
                self.line_handler(line)
            else:
                self._command_line(line)
        if self.busy and len(self.buffer) > self.settings.max_command * 4:
            # the client keeps sending while a command runs: stop reading until we catch up
            if not self.reading_paused:
                self.reading_paused = True
                self.transport.pauseProducing()
        elif self.reading_paused and not self.busy:
            self.reading_paused = False
            self.transport.resumeProducing()

    def _line_too_long(self) -> None:
        """Reply BAD, drop everything up to the end of that line and stay in sync."""
        idx = self.buffer.find(b"\n")
        if idx >= 0:
            del self.buffer[: idx + 1]
        else:
            self.buffer.clear()
            self.skip_line = True
        self._drop_literal()
        self.fragments = []
        self.command_size = 0
        self.send_line(b"* BAD Command line too long")
        self._count_bad()

    def _drop_literal(self) -> None:
        if self.literal_sink is not None and self.literal_spooled:
            self.literal_sink.close()
        self.literal_sink = None
        self.literal_left = 0
        for frag in self.fragments:
            if isinstance(frag, LiteralFile):
                frag.file.close()

    def _read_literal(self) -> None:
        n = min(self.literal_left, len(self.buffer))
        chunk = bytes(self.buffer[:n])
        del self.buffer[:n]
        self.literal_left -= n
        if self.literal_spooled:
            self.literal_sink.write(chunk)
        else:
            self.literal_sink.extend(chunk)
        if self.literal_left == 0:
            sink, self.literal_sink = self.literal_sink, None
            if self.literal_spooled:
                self.fragments.append(LiteralFile(sink, sink.tell()))
            else:
                self.fragments.append(bytes(sink))

    def _command_line(self, line: bytes) -> None:
        if self.discarding_command:
            # the rest of a refused command: its further non-synchronising literals too
            marker = literal_marker(line)
            if marker is not None and marker[1]:
                self.discard_left = marker[0]
            else:
                self.discarding_command = False
            return
        self.command_size += len(line)
        marker = literal_marker(line)
        if marker is None:
            self.fragments.append(line)
            fragments, self.fragments = self.fragments, []
            self.command_size = 0
            self._dispatch(fragments)
            return
        size, nonsync = marker
        first = self.fragments[0] if self.fragments else line
        assert isinstance(first, bytes)
        words = first.split(b" ", 3)
        tag = words[0] if words and _valid_tag(words[0]) else b"*"
        is_append = len(words) > 1 and words[1].upper() == b"APPEND"
        literals = len(self.fragments) // 2  # the ones already read
        problem = None
        if nonsync and size > 2 * max(self.settings.max_append, self.settings.max_command):
            # RFC 7888 section 4, second choice: no limit admits it; rather than read it
            # all to stay in sync, say why and close
            self._drop_literal()
            self.fragments = []
            self.close(b"[TOOBIG] Literal too large")
            return
        if self.state == "notauth" and size > self.settings.max_line_unauth:
            problem = b"BAD Literal too large before login"
        elif is_append and size > self.settings.max_append:
            problem = b"NO [TOOBIG] Message too large"
        elif (not is_append and self.command_size + size > self.settings.max_command) or (
            self.command_size > self.settings.max_command
        ):
            problem = b"BAD [TOOBIG] Command too long" if nonsync else b"BAD Command too long"
        elif literals >= (MAX_APPEND_MESSAGES + 1 if is_append else MAX_LITERALS):
            problem = b"BAD Too many literals in one command"
        elif nonsync and not self._literal_plus() and size > self.settings.max_nonsync_literal:
            # RFC 7888 section 5: LITERAL- allows at most 4096 octets without "+"; the
            # refusal carries TOOBIG (RFC 4469)
            problem = b"BAD [TOOBIG] Non-synchronising literal too large"
        if problem is not None:
            # RFC 7888 section 4, first choice: refuse at once, then read and drop the
            # octets the client sends anyway, so the next command is read in sync
            self._drop_literal()
            self.fragments = []
            self.command_size = 0
            if nonsync:
                # the client sends the literal anyway: drop it and the rest of that command
                self.discard_left = size
                self.discarding_command = True
            self.send_line(tag + b" " + problem)
            if problem.startswith(b"BAD"):
                self._count_bad()
            return
        self.fragments.append(strip_marker(line))
        if not is_append:
            self.command_size += size
        self.literal_left = size
        # what the command's literals hold in memory stays under the threshold (MULTIAPPEND)
        held = sum(len(f) for f in self.fragments[1::2] if isinstance(f, bytes))
        self.literal_spooled = held + size > self.settings.spool_threshold
        self.literal_sink = tempfile.TemporaryFile() if self.literal_spooled else bytearray()
        if size == 0:
            self.literal_left = 0
            self.fragments.append(b"")
            self.literal_sink = None
        if not nonsync:
            self.send_line(b"+ Ready for literal data")

    def _count_bad(self) -> None:
        self.bad_count += 1
        limit = (
            self.settings.bad_commands_unauth
            if self.state == "notauth"
            else self.settings.bad_commands_auth
        )
        if self.bad_count >= limit:
            self.close(b"Too many invalid commands")

    # ------------------------------------------------------------------
    # Dispatch

    def _dispatch(self, fragments: list[bytes | LiteralFile]) -> None:
        first = fragments[0]
        assert isinstance(first, bytes)
        if not first.strip() and len(fragments) == 1:
            return  # empty line: ignore, as Dovecot does
        tag_text, _, rest = first.partition(b" ")
        if not _valid_tag(tag_text):
            _close_literals(fragments)
            self.send_line(b"* BAD Invalid tag")
            self._count_bad()
            return
        tag = tag_text
        name, _, rest = rest.partition(b" ")
        command = name.upper().decode("ascii", "replace")
        uid = False
        if command == "UID":
            sub, _, rest = rest.partition(b" ")
            command = sub.upper().decode("ascii", "replace")
            uid = True
            if command not in _UID_COMMANDS:
                _close_literals(fragments)
                self._finish(tag, "BAD", "Unknown UID command", bad=True)
                return
        handler = _COMMANDS.get(command)
        if handler is None or not command:
            _close_literals(fragments)
            self._finish(tag, "BAD", "Unknown command", bad=True)
            return
        method_name, states = handler
        if self.state not in states:
            _close_literals(fragments)
            self._finish(tag, "BAD", f"{command} not allowed now", bad=True)
            return
        try:
            tokens = tokenize([rest, *fragments[1:]])
        except ParseError as exc:
            _close_literals(fragments)
            self._finish(tag, "BAD", str(exc), bad=True)
            return
        args = Args(tokens)
        self.busy = True
        result: Any = None
        try:
            method = getattr(self, method_name)
            result = method(tag, args, uid) if command in _UID_COMMANDS else method(tag, args)
        except Exception as exc:
            self._command_failed(tag, command, Failure(exc))
            return
        finally:
            if not (command == "APPEND" and isinstance(result, defer.Deferred)):
                _close_literals(fragments)  # an APPEND in flight closes its own
        if isinstance(result, defer.Deferred):
            result.addCallbacks(
                lambda r: self._command_done(tag, command, r),
                lambda f: self._command_failed(tag, command, f),
            )
        else:
            self._command_done(tag, command, result)

    def _command_done(self, tag: bytes, command: str, result: Any) -> None:
        if result is None:  # the handler wrote its own completion (IDLE, AUTHENTICATE, LOGOUT)
            return
        status, text = result
        d = self._sync_if_dirty(command)
        d.addCallback(lambda _: self._finish(tag, status, text))
        d.addErrback(lambda f: self._command_failed(tag, command, f))

    def _command_failed(self, tag: bytes, command: str, failure: Failure) -> None:
        exc = failure.value
        if isinstance(exc, ImapError):
            self._finish(tag, exc.status, exc.text, bad=exc.status == "BAD")
        elif isinstance(exc, ParseError):
            self._finish(tag, "BAD", str(exc), bad=True)
        elif isinstance(exc, fetchmod.UnknownCTE):
            # RFC 3516 section 4.3
            self._finish(tag, "NO", "[UNKNOWN-CTE] Cannot decode the part's transfer encoding")
        elif isinstance(exc, InvalidFolderName):
            self._finish(tag, "NO", f"[CANNOT] Invalid mailbox name: {exc}")
        elif isinstance(exc, NoSuchFolder):
            self._finish(tag, "NO", "[NONEXISTENT] No such mailbox")
        elif isinstance(exc, FolderExists):
            self._finish(tag, "NO", "[ALREADYEXISTS] Mailbox already exists")
        elif isinstance(exc, QuotaExceeded):
            self._finish(tag, "NO", "[OVERQUOTA] Quota exceeded")
        elif isinstance(exc, TemporaryFailure):
            self._finish(tag, "NO", "[UNAVAILABLE] Temporary failure, try again later")
        else:
            log.failure("IMAP {command} failed", failure, command=command)
            self._finish(tag, "NO", "[SERVERBUG] Internal error, the failure was logged")

    def _finish(self, tag: bytes, status: str, text: str, bad: bool = False) -> None:
        # response text is 7-bit and never carries the client's control characters back
        safe = _UNSAFE_TEXT.sub("?", text).encode("ascii", "replace")
        self.send_line(tag + b" " + status.encode("ascii") + b" " + safe)
        self.busy = False
        if bad:
            self._count_bad()
        if not self.closed and self.buffer:
            self.reactor.callLater(0, self._process)
        elif self.reading_paused:
            self.reading_paused = False
            self.transport.resumeProducing()

    # ------------------------------------------------------------------
    # Store helpers

    def run(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return self.ctx.run(fn, *args)

    def run_write(
        self, folders: list[SharedFolder | None], fn: Callable[..., Any], *args: Any
    ) -> defer.Deferred[Any]:
        """``run`` a store write on open folders after the other sessions' writes to them
        (ChangeHub.serial); the write patches their listings."""
        present = [f for f in folders if f is not None]
        if not present:
            return self.ctx.run(fn, *args)
        return self.ctx.hub.serial(
            [f.key for f in present], lambda: self.ctx.run(locked, present, False, fn, *args)
        )

    def _release_after(self, result: Any, shared: SharedFolder) -> Any:
        """Give back a SharedFolder held for one command (closing it may block: thread pool)."""
        self.run(self.ctx.hub.release, shared).addErrback(
            lambda f: log.failure("closing a folder failed", f)
        )
        return result

    def _hub_key(self, folder: str) -> tuple[str, str]:
        return (str(getattr(self.user, "name", self.user)), folder)

    def _on_change(self) -> None:
        self.dirty = True
        if self.idle_tag is not None:
            self._idle_poll()

    def _deselect(self) -> None:
        if self.selected is not None:
            shared = self.selected.shared
            if self.selected_key is not None:
                self.ctx.hub.unsubscribe(self.selected_key, self._on_change)
            self.selected = None
            self.selected_key = None
            if shared is not None:
                self.run(self.ctx.hub.release, shared).addErrback(
                    lambda f: log.failure("closing a folder failed", f)
                )
            if self.state == "selected":
                self.state = "auth"

    def _notify(self, folder: str) -> None:
        self.ctx.hub.changed(self._hub_key(folder), self._on_change)

    def _sync(self, allow_expunge: bool = True, force: bool = False) -> defer.Deferred[None]:
        """Report what changed in the selected mailbox since the client last heard.

        ``force`` looks for changes made outside this process (NOOP, CHECK, IDLE);
        otherwise the shared view's event log is enough (changes by our own sessions).
        """
        sel = self.selected
        if sel is None or sel.shared is None:
            return defer.succeed(None)
        self.dirty = False
        shared = sel.shared
        now = self.reactor.seconds()
        if force and self.ctx.hub.writing(shared.key):
            # a write is in progress: it looks at the store and marks the view stale
            # if something changed outside; do not queue a refresh behind it
            force = False
        if shared.fresh(force, now):
            self._report(sel, allow_expunge)
            return defer.succeed(None)
        d = self.ctx.hub.serial([shared.key], lambda: self.run(_refresh_view, shared, force, now))
        return d.addCallback(lambda _: self._report(sel, allow_expunge))

    def _report(self, sel: SelectedMailbox, allow_expunge: bool) -> None:
        """Send the changes of the shared view since ``sel.version`` (reactor)."""
        if self.selected is not sel or self.closed or sel.shared is None:
            return
        version, events, listing = sel.shared.since(sel.version)
        key = self.selected_key
        assert key is not None

        def claim(uids: list[int]) -> set[int]:
            return self.ctx.hub.claim_recent(key, uids, not sel.readonly)

        if listing is not None:
            lines = sel.diff(listing, self.condstore, self.qresync, claim, allow_expunge)
        elif events is not None:
            if not events and not (allow_expunge and sel.pending_gone):
                return
            lines = sel.replay(events, self.condstore, self.qresync, claim, allow_expunge)
        else:
            self.dirty = True  # the view is being listed again: report at the next command
            return
        sel.version = version
        if sel.pending_gone:
            self.dirty = True  # expunges held back: report them next time
        self.send_lines(lines)

    def _sync_if_dirty(self, command: str) -> defer.Deferred[None]:
        if self.selected is None or not self.dirty:
            return defer.succeed(None)
        # RFC 3501 section 7.4.1: no EXPUNGE during FETCH, STORE, SEARCH (non-UID forms)
        return self._sync(allow_expunge=command not in ("FETCH", "STORE", "SEARCH"))

    def _require_account(self) -> acct.AsyncAccount:
        assert self.account is not None
        return self.account

    def _mailbox_name(self, tok: Token) -> str:
        return acct.wire_to_name(as_bytes(tok, "mailbox"), self.utf8)

    def _mailbox_wire(self, name: str) -> bytes:
        return _quote(acct.name_to_wire(name, self.utf8))

    # ------------------------------------------------------------------
    # Any state (RFC 3501 section 6.1)

    def do_capability(self, tag: bytes, args: Args) -> tuple[str, str]:
        args.end()
        self.send_line(b"* CAPABILITY " + self.capabilities())
        return ("OK", "CAPABILITY completed")

    def do_noop(self, tag: bytes, args: Args) -> Any:
        args.end()
        if self.selected is not None:
            return self._sync(force=True).addCallback(lambda _: ("OK", "NOOP completed"))
        return ("OK", "NOOP completed")

    def do_logout(self, tag: bytes, args: Args) -> None:
        args.end()
        self.send_line(b"* BYE Logging out")
        self.send_line(tag + b" OK LOGOUT completed")
        self.state = "logout"
        self.busy = False
        self.close()

    def do_id(self, tag: bytes, args: Args) -> tuple[str, str]:
        """RFC 2971: the client's parameters are read and ignored; we say who we are."""
        tok = args.next("ID parameters")
        if not (isinstance(tok, list) or (isinstance(tok, Atom) and tok.upper() == "NIL")):
            raise ParseError("ID takes a list or NIL")
        if isinstance(tok, list) and len(tok) > 60:
            raise ParseError("too many ID fields")
        args.end()
        self.send_line(b'* ID ("name" "mailserv" "vendor" "mailserv")')
        return ("OK", "ID completed")

    # ------------------------------------------------------------------
    # Not authenticated (RFC 3501 section 6.2)

    def do_starttls(self, tag: bytes, args: Args) -> None:
        args.end()
        if self.secure or self.ctx.tls_options is None:
            raise ImapError("BAD", "TLS is already active" if self.secure else "TLS not available")
        # RFC 3501 section 6.2.1 / CVE-2011-0411: anything pipelined after STARTTLS is dropped
        self.buffer.clear()
        self.fragments = []
        self.send_line(tag + b" OK Begin TLS negotiation now")
        self.transport.startTLS(self.ctx.tls_options())
        self.busy = False
        return None

    def do_login(self, tag: bytes, args: Args) -> Any:
        user = args.astring("user name")
        password = args.astring("password")
        args.end()
        if not self._plaintext_allowed():
            raise ImapError("NO", "[PRIVACYREQUIRED] Use STARTTLS before LOGIN")
        return self._authenticate(user, password)

    def _authenticate(self, user: bytes, password: bytes) -> defer.Deferred[Any]:
        """LOGIN: the auth layer's throttled portal login (RFC 3501 section 6.2.3)."""
        try:
            name = normalize_username(user)
        except InvalidUsername:
            name = ""
        pw = acceptable_password(password)
        if not name or pw is None:
            # refused before any backend sees it, after the same delay as a wrong password
            d: defer.Deferred[Any] = defer.Deferred()
            self.reactor.callLater(self.settings.auth_failure_delay, d.errback, LoginFailed())
            return d.addErrback(self._login_failed)
        return self._login(UsernamePassword(name.encode("utf-8"), pw))

    def _login(self, credentials: Any) -> defer.Deferred[Any]:
        d = self.ctx.auth.login(credentials, self._peer_host())
        return d.addCallbacks(self._logged_in, self._login_failed)

    def _peer_host(self) -> str:
        return str(getattr(self.transport.getPeer(), "host", ""))

    def _login_failed(self, failure: Failure) -> Any:
        if failure.check(ImapError):
            return failure
        if failure.check(TemporaryFailure):
            raise ImapError("NO", "[UNAVAILABLE] Authentication service unavailable")
        if not failure.check(LoginFailed):
            log.failure("IMAP login failed unexpectedly", failure)
            raise ImapError("NO", "[UNAVAILABLE] Internal error, try again later")
        # the throttle has already waited the failure delay
        raise ImapError("NO", "[AUTHENTICATIONFAILED] Authentication failed")

    def _logged_in(self, user: Any) -> Any:
        if self.closed:
            return None
        key = (str(getattr(user, "name", user)), self._peer_host())
        if not self.ctx.hub.add_connection(key, self.settings.max_connections_per_user_ip):
            raise ImapError("NO", "[LIMIT] Too many connections for this user and address")
        self.conn_key = key
        store = self.ctx.store_for(user)
        d = self.run(store.open, user)

        def opened(account: Any) -> tuple[str, str]:
            self.user = user
            self.account = acct.AsyncAccount(account, self.run)
            self.state = "auth"
            self.bad_count = 0
            self._reset_timeout()
            return ("OK", "[CAPABILITY " + self.capabilities().decode() + "] Logged in")

        return d.addCallback(opened)

    def do_authenticate(self, tag: bytes, args: Args) -> Any:
        """RFC 3501 section 6.2.2 with SASL-IR (RFC 4959), mechanisms of mailserv.auth.sasl."""
        mech = args.atom("mechanism").upper()
        initial = args.next() if args.more() else None
        args.end()
        if mech in sasl.CLEARTEXT and not self._plaintext_allowed():
            raise ImapError("NO", "[PRIVACYREQUIRED] Use STARTTLS before AUTHENTICATE " + mech)
        if mech not in self._mechanisms():
            raise ImapError("NO", "Unsupported authentication mechanism")
        mechanism = self.ctx.auth.start_sasl(mech)
        data: bytes | None = None
        if initial is not None:
            try:
                data = sasl.decode_response(as_bytes(initial))  # "=" is empty (RFC 4959)
            except sasl.SASLError as exc:
                raise ImapError("BAD", "Malformed authentication exchange") from exc
        done: defer.Deferred[Any] = defer.Deferred()
        self._sasl_next(mechanism, mechanism.start(data), done)
        return done

    def _sasl_next(self, mechanism: Any, d: defer.Deferred[Any], done: defer.Deferred[Any]) -> None:
        def answer(result: Any) -> None:
            if isinstance(result, sasl.Challenge):
                self.send_line(b"+ " + sasl.encode_challenge(result.data))
                self.line_handler = lambda line: self._sasl_line(mechanism, line, done)
                self.busy = False
                if self.buffer:
                    self.reactor.callLater(0, self._process)
                return
            self._login(result).chainDeferred(done)

        def failed(failure: Failure) -> None:
            if failure.check(sasl.SASLCancelled):
                done.errback(ImapError("BAD", "AUTHENTICATE cancelled"))
            elif failure.check(sasl.SASLError):
                done.errback(ImapError("BAD", "Malformed authentication exchange"))
            else:
                done.errback(failure)

        d.addCallbacks(answer, failed)

    def _sasl_line(self, mechanism: Any, line: bytes, done: defer.Deferred[Any]) -> None:
        self.line_handler = None
        self.busy = True
        try:
            response = sasl.decode_response(line)  # "*" cancels (RFC 3501 section 6.2.2)
        except sasl.SASLError as exc:
            self._sasl_next(mechanism, defer.fail(exc), done)
            return
        self._sasl_next(mechanism, mechanism.step(response), done)

    # ------------------------------------------------------------------
    # Authenticated (RFC 3501 section 6.3)

    def do_enable(self, tag: bytes, args: Args) -> tuple[str, str]:
        """RFC 5161."""
        enabled = []
        if not args.more():
            raise ParseError("ENABLE needs a capability")
        while args.more():
            cap = args.atom("capability").upper()
            if cap == "UTF8=ACCEPT" and not self.utf8:
                self.utf8 = True
                enabled.append(cap)
            elif cap in ("CONDSTORE", "QRESYNC") and not getattr(self, cap.lower()):
                setattr(self, cap.lower(), True)
                if cap == "QRESYNC" and not self.condstore:
                    self.condstore = True
                enabled.append(cap)
        self.send_line(b"* ENABLED" + b"".join(b" " + c.encode() for c in enabled))
        return ("OK", "ENABLE completed")

    def do_namespace(self, tag: bytes, args: Args) -> tuple[str, str]:
        """RFC 2342: one personal namespace, no others."""
        args.end()
        self.send_line(b'* NAMESPACE (("" "/")) NIL NIL')
        return ("OK", "NAMESPACE completed")

    def do_select(self, tag: bytes, args: Args, readonly: bool = False) -> Any:
        name = self._mailbox_name(args.next("mailbox"))
        params: list[Token] = args.optional_list() or []
        args.end()
        condstore = False
        qresync: list[Token] | None = None
        i = 0
        while i < len(params):
            p = str(params[i]).upper() if isinstance(params[i], Atom) else ""
            if p == "CONDSTORE":
                condstore = True
            elif p == "QRESYNC" and i + 1 < len(params) and isinstance(params[i + 1], list):
                if not self.qresync:
                    raise ImapError("BAD", "QRESYNC is not enabled")
                qresync = params[i + 1]  # type: ignore[assignment]
                i += 1
            else:
                raise ParseError("unknown SELECT parameter")
            i += 1
        if self.selected is not None:
            self._deselect()
            if self.qresync:
                self.send_line(b"* OK [CLOSED] Previous mailbox closed")
        if condstore:
            self.condstore = True
        d = self._run_on_folder(_select_shared, name)
        return d.addCallback(lambda r: self._selected(name, readonly, r, qresync))

    def do_examine(self, tag: bytes, args: Args) -> Any:
        return self.do_select(tag, args, readonly=True)

    def _selected(
        self,
        name: str,
        readonly: bool,
        result: tuple[SharedFolder, list[Any], tuple[int, int], int],
        qresync: list[Token] | None,
    ) -> Any:
        shared, messages, (uidnext, highest), version = result
        if self.closed or self.state == "notauth":
            self.run(self.ctx.hub.release, shared)
            return None
        sel = SelectedMailbox(name, shared.box, readonly, messages)
        sel.shared = shared
        sel.version = version
        key = self._hub_key(name)
        sel.recent = self.ctx.hub.claim_recent(key, sel.uids, not readonly)
        self.selected = sel
        self.selected_key = key
        self.ctx.hub.subscribe(key, self._on_change)
        self.state = "selected"
        keywords = sorted({k for m in messages for k in acct.flags_of(m)} - set(SYSTEM_FLAGS))
        flag_list = " ".join([*SYSTEM_FLAGS, *keywords])
        lines = [
            f"* FLAGS ({flag_list})".encode(),
            (
                b"* OK [PERMANENTFLAGS ()] Read-only mailbox"
                if readonly
                else f"* OK [PERMANENTFLAGS ({flag_list} \\*)] Flags permitted".encode()
            ),
            b"* %d EXISTS" % len(sel),
            b"* %d RECENT" % len(sel.recent),
        ]
        for seq, uid in enumerate(sel.uids, 1):
            if "\\Seen" not in acct.flags_of(sel.info[uid]):
                lines.append(b"* OK [UNSEEN %d] First unseen" % seq)
                break
        lines.append(b"* OK [UIDVALIDITY %d] UIDs valid" % sel.uidvalidity)
        lines.append(b"* OK [UIDNEXT %d] Predicted next UID" % uidnext)
        lines.append(b"* OK [HIGHESTMODSEQ %d] Highest" % highest)
        done = (
            "OK",
            "[READ-ONLY] EXAMINE completed" if readonly else "[READ-WRITE] SELECT completed",
        )
        if qresync is None:
            self.send_lines(lines)
            return done
        uidvalidity, modseq, known = _qresync_params(qresync)
        if uidvalidity != sel.uidvalidity:
            self.send_lines(lines)
            return done
        d = self.run(_expunged_since, sel.box, modseq)

        def resync(expunged: list[int] | None) -> tuple[str, str]:
            lines.extend(self._qresync_lines(sel, modseq, known, expunged))
            self.send_lines(lines)
            return done

        return d.addCallback(resync)

    def _qresync_lines(
        self,
        sel: SelectedMailbox,
        modseq: int,
        known: list[tuple[int, int]] | None,
        expunged: list[int] | None,
    ) -> list[bytes]:
        """RFC 7162 section 3.2.5.1: VANISHED (EARLIER) and flags changed since a modseq.

        ``expunged`` is the store's history of UIDs expunged after ``modseq``
        (IMailbox.expunged_since); without one, every UID of ``known`` that is
        missing is reported (a superset, which the client must accept).
        """
        if expunged is not None:
            vanished = _in_uid_ranges(expunged, known, sel) if known is not None else expunged
            vanished = [u for u in vanished if not sel.seq_of(u)]
        elif known is not None:
            vanished = _missing_uids(known, sel)
        else:
            vanished = []
        lines = []
        if vanished:
            lines.append(b"* VANISHED (EARLIER) " + format_set(sorted(set(vanished))).encode())
        for uid in sel.uids:
            if int(sel.info[uid].modseq) > modseq:
                lines.append(sel.flags_response(uid, True, with_uid=True))
        return lines

    def do_create(self, tag: bytes, args: Args) -> Any:
        raw = as_bytes(args.next("mailbox"))
        args.end()
        name = acct.wire_to_name(raw.rstrip(b"/") or raw, self.utf8)
        if name == "INBOX":
            raise ImapError("NO", "[ALREADYEXISTS] INBOX always exists")
        return self._folder_op("CREATE", "create_folder", name)

    def do_delete(self, tag: bytes, args: Args) -> Any:
        name = self._mailbox_name(args.next("mailbox"))
        args.end()
        if name == "INBOX":
            raise ImapError("NO", "[CANNOT] INBOX cannot be deleted")
        if self.selected is not None and self.selected.name == name:
            self._deselect()
        return self._folder_op("DELETE", "delete_folder", name)

    def _run_on_folder(self, fn: Callable[..., Any], name: str) -> defer.Deferred[Any]:
        """``fn(hub, key, account, name, now)`` in the disk pool (SELECT, STATUS)."""
        account = self._require_account().account
        return self.run(
            fn, self.ctx.hub, self._hub_key(name), account, name, self.reactor.seconds()
        )

    def _folder_op(self, command: str, method: str, *args: Any) -> defer.Deferred[Any]:
        """One IMailAccount call for CREATE, DELETE, RENAME (store errors map to NO codes)."""
        d = self._require_account().call(method, *args)
        return d.addCallback(lambda _: ("OK", f"{command} completed"))

    def do_rename(self, tag: bytes, args: Args) -> Any:
        old = self._mailbox_name(args.next("mailbox"))
        new = self._mailbox_name(args.next("new name"))
        args.end()
        if new == "INBOX":
            raise ImapError("NO", "[ALREADYEXISTS] INBOX always exists")
        account = self._require_account()
        if old == "INBOX":
            # RFC 3501 section 6.3.5: the messages move to the new folder, INBOX stays (empty)
            shared = self.ctx.hub.hold(self._hub_key("INBOX"))
            d = self.run_write([shared], _rename_inbox, account.account, new, shared)
            if shared is not None:
                d.addBoth(self._release_after, shared)
            d.addCallback(lambda _: self._notify("INBOX"))
            return d.addCallback(lambda _: ("OK", "RENAME completed"))
        return self._folder_op("RENAME", "rename_folder", old, new)

    def do_subscribe(self, tag: bytes, args: Args, on: bool = True) -> Any:
        name = self._mailbox_name(args.next("mailbox"))
        args.end()
        return (
            self._require_account()
            .set_subscribed(name, on)
            .addCallback(lambda _: ("OK", ("SUBSCRIBE" if on else "UNSUBSCRIBE") + " completed"))
        )

    def do_unsubscribe(self, tag: bytes, args: Args) -> Any:
        return self.do_subscribe(tag, args, on=False)

    def do_list(self, tag: bytes, args: Args, lsub: bool = False) -> Any:
        """LIST with LIST-EXTENDED (RFC 5258), LIST-STATUS (RFC 5819), SPECIAL-USE (RFC 6154)."""
        selection: set[str] = set()
        if not lsub and isinstance(args.peek(), list):
            selection = {str(t).upper() for t in args.list()}
            # RFC 5258 section 3.1: unknown options and a lone RECURSIVEMATCH are errors
            if selection - {"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"}:
                raise ParseError("unknown LIST selection option")
            if "RECURSIVEMATCH" in selection and not selection & {"SUBSCRIBED", "SPECIAL-USE"}:
                raise ParseError("RECURSIVEMATCH needs another selection option")
        reference = as_bytes(args.next("reference")).decode("ascii", "replace")
        pat_tok = args.next("pattern")
        patterns = pat_tok if isinstance(pat_tok, list) else [pat_tok]
        returns: set[str] = set()
        status_items: list[str] = []
        if args.more():
            if lsub or args.atom("RETURN").upper() != "RETURN":
                raise ParseError("expected RETURN")
            opts = args.list()
            i = 0
            while i < len(opts):
                opt = str(opts[i]).upper()
                if opt == "STATUS":
                    i += 1
                    if i >= len(opts) or not isinstance(opts[i], list):
                        raise ParseError("STATUS needs a list")
                    status_items = [str(t).upper() for t in opts[i]]  # type: ignore[union-attr]
                    _check_status_items(status_items)
                else:
                    returns.add(opt)
                i += 1
        args.end()
        if lsub:
            selection = {"SUBSCRIBED"}
        if "SUBSCRIBED" in selection:
            returns.add("SUBSCRIBED")
        pattern_texts = [
            as_bytes(p).decode("utf-8" if self.utf8 else "ascii", "replace") for p in patterns
        ]
        if not pattern_texts:
            raise ParseError("empty pattern list")
        if pattern_texts == [""] and not lsub:
            self.send_line(b'* LIST (\\Noselect) "/" ""')
            return ("OK", "LIST completed")
        try:
            matchers = [
                acct.Pattern(
                    acct.canonical_pattern(reference, p if self.utf8 else acct.utf7.decode(p))
                )
                for p in pattern_texts
            ]
        except InvalidFolderName as exc:
            raise ParseError(str(exc)) from exc
        account = self._require_account()
        d = account.call("list_folders")
        need_subs = "SUBSCRIBED" in returns or lsub
        d.addCallback(
            lambda folders: (
                account.subscriptions() if need_subs else defer.succeed([])
            ).addCallback(lambda subs: (list(folders), list(subs)))
        )
        d.addCallback(
            lambda fs: self._list_lines(
                fs[0], fs[1], matchers, selection, returns, status_items, lsub
            )
        )
        return d

    def do_lsub(self, tag: bytes, args: Args) -> Any:
        return self.do_list(tag, args, lsub=True)

    def _list_lines(
        self,
        folders: list[str],
        subs: list[str],
        matchers: list[acct.Pattern],
        selection: set[str],
        returns: set[str],
        status_items: list[str],
        lsub: bool,
    ) -> Any:
        existing, implied = acct.with_parents([*folders, "INBOX"])
        subscribed = set(subs)
        everything = existing | implied
        recursive = "RECURSIVEMATCH" in selection and "SUBSCRIBED" in selection
        wanted = subscribed if "SUBSCRIBED" in selection else everything
        if recursive:
            # parents of subscribed folders are listed too, with CHILDINFO (RFC 5258 4.5)
            wanted = (
                wanted
                | acct.with_parents(subscribed)[1]
                | {n for n in everything if acct.has_children(n, subscribed)}
            )
        names = sorted(wanted, key=_folder_sort)
        word = b"LSUB" if lsub else b"LIST"
        out: list[tuple[bytes, str | None]] = []
        account = self._require_account().account
        for name in names:
            if not any(m.matches(name) for m in matchers):
                continue
            attrs: list[str] = []
            if name not in existing:
                attrs.append(
                    "\\NonExistent" if "SUBSCRIBED" in selection and not lsub else "\\Noselect"
                )
            if not lsub:
                attrs.append(
                    "\\HasChildren" if acct.has_children(name, everything) else "\\HasNoChildren"
                )
            if "SUBSCRIBED" in returns and name in subscribed and not lsub:
                attrs.append("\\Subscribed")
            role = acct.special_use(account, name)
            if role:
                attrs.append(role)
            elif "SPECIAL-USE" in selection:
                continue
            line = (
                b"* "
                + word
                + b" ("
                + " ".join(attrs).encode()
                + b') "/" '
                + self._mailbox_wire(name)
            )
            if recursive and acct.has_children(name, subscribed):
                line += b' ("CHILDINFO" ("SUBSCRIBED"))'
            out.append((line, name if status_items and name in existing else None))
        return self._send_list(out, status_items, lsub)

    @defer.inlineCallbacks
    def _send_list(
        self, out: list[tuple[bytes, str | None]], status_items: list[str], lsub: bool
    ) -> Any:
        for line, status_name in out:
            self.send_line(line)
            if status_name is not None:
                try:
                    yield self._status_line(status_name, status_items)
                except (NoSuchFolder, InvalidFolderName):
                    pass
        return ("OK", ("LSUB" if lsub else "LIST") + " completed")

    def do_status(self, tag: bytes, args: Args) -> Any:
        name = self._mailbox_name(args.next("mailbox"))
        items = [str(t).upper() for t in args.list("status items")]
        args.end()
        _check_status_items(items)
        return self._status_line(name, items).addCallback(lambda _: ("OK", "STATUS completed"))

    def _status_line(self, name: str, items: list[str]) -> defer.Deferred[None]:
        d = self._run_on_folder(_status_values, name)

        def send(values: dict[str, int]) -> None:
            if self.selected is not None and self.selected.name == name:
                values["RECENT"] = len(self.selected.recent)
            body = " ".join(f"{item} {values[item]}" for item in items)
            self.send_line(b"* STATUS " + self._mailbox_wire(name) + b" (" + body.encode() + b")")

        return d.addCallback(send)

    def do_append(self, tag: bytes, args: Args) -> Any:
        """RFC 3501 section 6.3.11 with MULTIAPPEND (RFC 3502: several messages, all or
        none), UIDPLUS (RFC 4315) and APPENDLIMIT (RFC 7889)."""
        name = self._mailbox_name(args.next("mailbox"))
        items: list[tuple[bytes | LiteralFile, list[str], float | None]] = []
        while True:
            items.append(self._append_message(args))
            if not args.more():
                break
        sources = [source for source, _, _ in items]
        if any((len(src) if isinstance(src, bytes) else src.size) == 0 for src in sources):
            raise ImapError("NO", "Empty message")
        account = self._require_account()
        shared = self.ctx.hub.hold(self._hub_key(name))
        stage = getattr(shared.box, "stage", None) if shared is not None else None
        staged: list[Any] = []
        if stage is None:
            d = self.run_write([shared], _append, account.account, name, items, shared)
        else:  # the messages written and fsynced before the folder's write turn
            d = self.run(_stage, stage, items, staged)
            acct = account.account
            d.addCallback(lambda ok: self.run_write([shared], _append, acct, name, ok, shared))

            def discard(failure: Failure) -> Any:
                return self.run(_discard, staged).addBoth(lambda _: failure)

            d.addErrback(discard)
        if shared is not None:
            d.addBoth(self._release_after, shared)

        def appended(result: tuple[int, list[int]]) -> Any:
            uidvalidity, uids = result
            self._notify(name)
            if self.selected is not None and self.selected.name == name:
                self.dirty = True
            return ("OK", f"[APPENDUID {uidvalidity} {format_set(uids)}] APPEND completed")

        def failed(failure: Failure) -> Any:
            if failure.check(NoSuchFolder):
                raise ImapError("NO", "[TRYCREATE] No such mailbox")
            return failure

        def cleanup(result: Any) -> Any:
            for source in sources:
                if isinstance(source, LiteralFile):
                    source.file.close()
            return result

        return d.addCallbacks(appended, failed).addBoth(cleanup)

    def _append_message(self, args: Args) -> tuple[bytes | LiteralFile, list[str], float | None]:
        """One ``append-message`` (RFC 3502 section 6.3.11): [flag-list] [date-time] literal."""
        flags: list[str] = []
        date: float | None = None
        tok = args.next("message")
        if isinstance(tok, list):
            flags = [f for f in _flag_list(tok) if f != "\\Recent"]
            tok = args.next("message")
        if isinstance(tok, bytes) and not isinstance(tok, Literal):
            date = _parse_date_time(tok)  # a date-time is always a quoted string
            tok = args.next("message")
        if isinstance(tok, Atom) and tok.upper() == "UTF8":
            # RFC 6855 section 4: UTF8 (~{n}<octets>), allowed once UTF8=ACCEPT is enabled
            wrapped = args.next("UTF8 message")
            if (
                not self.utf8
                or not isinstance(wrapped, list)
                or len(wrapped) != 2
                or wrapped[0] != "~"
            ):
                raise ParseError("expected UTF8 (~{n} message) after ENABLE UTF8=ACCEPT")
            tok = wrapped[1]
        elif isinstance(tok, Atom) and tok == "~":
            tok = args.next("message")  # literal8 (BINARY, RFC 3516 section 4.2)
        if not isinstance(tok, (Literal, LiteralFile)):
            raise ParseError("expected a message literal")
        return tok, flags, date

    # ------------------------------------------------------------------
    # Selected (RFC 3501 section 6.4)

    def _sel(self) -> SelectedMailbox:
        assert self.selected is not None
        return self.selected

    def do_check(self, tag: bytes, args: Args) -> Any:
        args.end()
        return self._sync(force=True).addCallback(lambda _: ("OK", "CHECK completed"))

    def do_close(self, tag: bytes, args: Args) -> Any:
        args.end()
        sel = self._sel()
        if sel.readonly:
            self._deselect()
            return ("OK", "CLOSE completed")
        now = self.reactor.seconds()
        d = self.run_write([sel.shared], _expunge_deleted, sel.shared, sel.box, now, None)

        def done(removed: list[int]) -> tuple[str, str]:
            if removed:
                self._notify(sel.name)
            self._deselect()
            return ("OK", "CLOSE completed")

        return d.addCallback(done)

    def do_unselect(self, tag: bytes, args: Args) -> tuple[str, str]:
        """RFC 3691."""
        args.end()
        self._deselect()
        return ("OK", "UNSELECT completed")

    def do_expunge(self, tag: bytes, args: Args, uid: bool = False) -> Any:
        uids: list[tuple[int, int]] | None = None
        if uid:
            uids = parse_seqset(args.atom("UID set"))
        args.end()
        sel = self._sel()
        if sel.readonly:
            raise ImapError("NO", "[READ-ONLY] Mailbox is read-only")
        allowed = sel.uids_for_uidset(uids) if uids is not None else None
        d = self.run_write(
            [sel.shared], _expunge_deleted, sel.shared, sel.box, self.reactor.seconds(), allowed
        )

        def done(removed: list[int]) -> Any:
            if removed:
                self._notify(sel.name)
            return self._sync().addCallback(lambda _: ("OK", "EXPUNGE completed"))

        return d.addCallback(done)

    def _resolve(self, text: str, uid: bool) -> list[int]:
        sel = self._sel()
        ranges = parse_seqset(text)
        if uid:
            return sel.uids_for_uidset(ranges)
        n = len(sel)
        for lo, hi in ranges:
            if (lo and lo > n) or (hi and hi > n):
                raise ImapError("BAD", "Invalid message sequence number")
        return sel.uids_for_seqs(ranges)

    def do_fetch(self, tag: bytes, args: Args, uid: bool = False) -> Any:
        """RFC 3501 section 6.4.5, CONDSTORE CHANGEDSINCE and QRESYNC VANISHED (RFC 7162)."""
        set_text = args.atom("sequence set")
        uids = self._resolve(set_text, uid)
        attrs = fetchmod.parse_attrs(args.next("fetch items"))
        changedsince: int | None = None
        vanished = False
        mods = args.optional_list()
        if mods is not None:
            i = 0
            while i < len(mods):
                m = str(mods[i]).upper()
                if m == "CHANGEDSINCE" and i + 1 < len(mods):
                    changedsince = int(str(mods[i + 1])) if str(mods[i + 1]).isdigit() else None
                    if changedsince is None:
                        raise ParseError("bad CHANGEDSINCE")
                    i += 2
                elif m == "VANISHED" and uid:
                    vanished = True
                    i += 1
                else:
                    raise ParseError("unknown FETCH modifier")
            if vanished and (changedsince is None or not self.qresync):
                raise ParseError("VANISHED needs CHANGEDSINCE and QRESYNC")
        args.end()
        sel = self._sel()
        if changedsince is not None:
            self.condstore = True
            uids = [u for u in uids if int(sel.info[u].modseq) > changedsince]

        def fetch(_: Any = None) -> Any:
            return self._fetch_chunks(
                sel,
                uids,
                attrs,
                want_uid=uid or any(a.name == "UID" for a in attrs),
                want_flags=any(a.name == "FLAGS" for a in attrs),
                want_modseq=changedsince is not None or any(a.name == "MODSEQ" for a in attrs),
                set_seen=not sel.readonly and any(a.sets_seen for a in attrs),
                needs_data=any(a.needs_data for a in attrs),
            )

        if changedsince is None or not vanished:
            return fetch()
        # RFC 7162 section 3.2.6: the UIDs of the set expunged since CHANGEDSINCE
        ranges = parse_seqset(set_text)

        def report(expunged: list[int] | None) -> None:
            if expunged is None:  # no history: every missing UID of the set
                gone = _missing_uids(ranges, sel)
            else:
                gone = _in_uid_ranges(expunged, ranges, sel)
            if gone:
                self.send_line(b"* VANISHED (EARLIER) " + format_set(gone).encode())

        return (
            self.run(_expunged_since, sel.box, changedsince).addCallback(report).addCallback(fetch)
        )

    def _fetch_chunks(
        self,
        sel: SelectedMailbox,
        uids: list[int],
        attrs: list[fetchmod.Attr],
        want_uid: bool,
        want_flags: bool,
        want_modseq: bool,
        set_seen: bool,
        needs_data: bool,
    ) -> defer.Deferred[Any]:
        result: defer.Deferred[Any] = defer.Deferred()
        state = {"pos": 0, "gone": False, "changed": False}
        only_view = all(a.name in ("FLAGS", "UID", "MODSEQ") for a in attrs)

        def next_chunk(_: Any = None) -> None:
            if self.closed or self.selected is not sel:
                result.callback(("NO", "Mailbox closed"))
                return
            pos = state["pos"]
            chunk = _next_chunk(uids, pos, sel, needs_data)
            if not chunk:
                if state["changed"]:
                    self._notify(sel.name)
                if state["gone"]:
                    result.callback(("NO", "[EXPUNGEISSUED] Some messages were expunged"))
                else:
                    result.callback(("OK", "FETCH completed"))
                return
            state["pos"] = pos + len(chunk)
            infos = [sel.info[u] for u in chunk]
            if set_seen:
                d = self.run_write(
                    [sel.shared], _fetch_work, sel.shared, sel.box, infos, attrs, needs_data, True
                )
            elif needs_data:
                d = self.run(_fetch_work, None, sel.box, infos, attrs, True, False)
            elif only_view and want_flags and not want_uid and not want_modseq:
                write_flags(chunk)  # FETCH 1:* (FLAGS), which clients send often
                d = defer.succeed(None)
            elif only_view:
                d = defer.succeed([(info, b"", False) for info in infos])
            else:
                d = defer.succeed(
                    [(info, fetchmod.build_items(attrs, info, None, {}), False) for info in infos]
                )
            d.addCallback(write)
            d.addCallback(lambda _: self._drain())
            d.addCallback(next_chunk)
            d.addErrback(result.errback)

        def write_flags(chunk: list[int]) -> None:
            info = sel.info
            recent = sel.recent
            first = bisect_left(sel.uids, chunk[0]) if chunk else 0
            if sel.uids[first : first + len(chunk)] != chunk:  # not a run of the view
                write([(info[u], b"", False) for u in chunk])
                return
            self.send_lines(
                [
                    b"* %d FETCH (%s)" % (seq, flags_item(info[u], u in recent))
                    for seq, u in enumerate(chunk, first + 1)
                ]
            )

        def write(rows: list[tuple[Any, bytes | None, bool]] | None) -> None:
            if rows is None:
                return  # written already
            out = []
            suids = sel.uids
            recent = sel.recent
            condstore = self.condstore
            j = 0
            for info, items, seen_set in rows:
                if items is None:
                    state["gone"] = True
                    continue
                uid = info.uid
                # the chunk is in UID order, like the view: walk along it for the numbers
                if j >= len(suids) or suids[j] != uid:
                    j = bisect_left(suids, uid)
                    if j >= len(suids) or suids[j] != uid:
                        j = 0
                        continue
                j += 1
                flags_now = want_flags
                if seen_set:
                    sel.record(info)
                    state["changed"] = True
                    flags_now = True
                parts = []
                if want_uid:
                    parts.append(b"UID %d" % uid)
                if items:
                    parts.append(items)
                if flags_now:
                    parts.append(flags_item(info, uid in recent))
                if want_modseq or (seen_set and condstore):
                    parts.append(b"MODSEQ (%d)" % int(info.modseq))
                out.append(b"* %d FETCH (%s)" % (j, b" ".join(parts)))
            self.send_lines(out)

        next_chunk()
        return result

    def do_store(self, tag: bytes, args: Args, uid: bool = False) -> Any:
        """RFC 3501 section 6.4.6 with UNCHANGEDSINCE (RFC 7162 section 3.1.3)."""
        uids = self._resolve(args.atom("sequence set"), uid)
        unchanged: int | None = None
        mods = args.optional_list()
        if mods is not None:
            if (
                len(mods) != 2
                or str(mods[0]).upper() != "UNCHANGEDSINCE"
                or not str(mods[1]).isdigit()
            ):
                raise ParseError("bad STORE modifier")
            unchanged = int(str(mods[1]))
            self.condstore = True
        item = args.atom("store item").upper()
        if item not in (
            "FLAGS",
            "+FLAGS",
            "-FLAGS",
            "FLAGS.SILENT",
            "+FLAGS.SILENT",
            "-FLAGS.SILENT",
        ):
            raise ParseError("bad STORE item")
        rest: list[Token] = []
        while args.more():
            rest.append(args.next())
        if len(rest) == 1 and isinstance(rest[0], list):
            rest = rest[0]
        flags = _flag_list(rest)
        sel = self._sel()
        if sel.readonly:
            raise ImapError("NO", "[READ-ONLY] Mailbox is read-only")
        mode = item[0] if item[0] in "+-" else "="
        silent = item.endswith(".SILENT")
        infos = [sel.info[u] for u in uids]
        d = self.run_write(
            [sel.shared], _store_flags, sel.shared, sel.box, infos, mode, flags, unchanged
        )

        def done(result: tuple[list[tuple[Any, bool]], list[int]]) -> tuple[str, str]:
            results, failed = result
            lines = []
            any_changed = False
            for info, changed in results:
                if changed:
                    sel.record(info)
                    any_changed = True
                if not sel.seq_of(info.uid):
                    continue
                if silent and not (changed and unchanged is not None):
                    continue
                lines.append(self._store_fetch_line(sel, info, uid))
            if any_changed:
                self._notify(sel.name)
            self.send_lines(lines)
            if failed:
                numbers = sorted(failed) if uid else sorted(sel.seq_of(u) for u in failed)
                return ("OK", f"[MODIFIED {format_set(numbers)}] Conditional STORE failed")
            return ("OK", "STORE completed")

        return d.addCallback(done)

    def _store_fetch_line(self, sel: SelectedMailbox, info: Any, uid: bool) -> bytes:
        parts = []
        if uid:
            parts.append(b"UID %d" % info.uid)
        parts.append(flags_item(info, info.uid in sel.recent))
        if self.condstore:
            parts.append(b"MODSEQ (%d)" % int(info.modseq))
        return b"* %d FETCH (" % sel.seq_of(info.uid) + b" ".join(parts) + b")"

    def do_copy(self, tag: bytes, args: Args, uid: bool = False, move: bool = False) -> Any:
        """COPY with COPYUID (RFC 4315) and MOVE (RFC 6851)."""
        uids = self._resolve(args.atom("sequence set"), uid)
        target = self._mailbox_name(args.next("mailbox"))
        args.end()
        sel = self._sel()
        if move and sel.readonly:
            raise ImapError("NO", "[READ-ONLY] Mailbox is read-only")
        if not uids:
            return ("OK", ("MOVE" if move else "COPY") + " completed (no messages)")
        target_shared = self.ctx.hub.hold(self._hub_key(target))
        if target_shared is not None and target_shared is sel.shared:
            self.ctx.hub.release(target_shared)  # never closes: we hold it too
            target_shared = None
            target_box_shared: SharedFolder | None = sel.shared
        else:
            target_box_shared = target_shared
        d = self.run_write(
            [sel.shared, target_shared],
            _copy,
            self._require_account().account,
            sel.shared,
            sel.box,
            target,
            uids,
            move,
            target_box_shared,
        )
        if target_shared is not None:
            d.addBoth(self._release_after, target_shared)

        def done(result: tuple[int, dict[int, int], list[int]]) -> Any:
            uidvalidity, mapping, _removed = result
            self._notify(target)
            src = sorted(mapping)
            code = (
                f"[COPYUID {uidvalidity} {format_set(src)} {format_set([mapping[u] for u in src])}]"
            )
            if target == sel.name:
                self.dirty = True
            if not move:
                return ("OK", f"{code} COPY completed")
            self.send_line(f"* OK {code} Moved".encode())
            self._notify(sel.name)
            return self._sync().addCallback(lambda _: ("OK", "MOVE completed"))

        def failed(failure: Failure) -> Any:
            if failure.check(NoSuchFolder):
                raise ImapError("NO", "[TRYCREATE] No such mailbox")
            return failure

        return d.addCallbacks(done, failed)

    def do_move(self, tag: bytes, args: Args, uid: bool = False) -> Any:
        return self.do_copy(tag, args, uid, move=True)

    def _candidates(
        self, sel: SelectedMailbox, uids: list[int] | None = None
    ) -> list[searchmod.Candidate]:
        wanted = sel.uids if uids is None else uids
        return [
            searchmod.Candidate(sel.seq_of(u), u, _ViewInfo(sel.info[u]), u in sel.recent)
            for u in wanted
        ]

    def do_search(self, tag: bytes, args: Args, uid: bool = False) -> Any:
        """SEARCH (RFC 3501 section 6.4.4) and ESEARCH RETURN options (RFC 4731)."""
        returns: list[str] | None = None
        if isinstance(args.peek(), Atom) and str(args.peek()).upper() == "RETURN":
            args.next()
            returns = [str(t).upper() for t in args.list("return options")]
            if not returns:
                returns = ["ALL"]
            for r in returns:
                if r not in ("MIN", "MAX", "ALL", "COUNT", "SAVE"):
                    raise ParseError("unknown RETURN option")
        tokens = args.tokens[args.pos :]
        try:
            program, _charset = searchmod.parse_program(tokens)
        except searchmod.BadCharset as exc:
            raise ImapError("NO", "[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset") from exc
        sel = self._sel()
        cands = self._candidates(sel)
        d = self.run(_search, sel.box, program, cands, len(sel), sel.uids[-1] if sel.uids else 0)

        def done(matches: list[searchmod.Candidate]) -> tuple[str, str]:
            numbers = [c.uid if uid else c.seq for c in matches]
            if self.condstore and any(_uses_modseq(program) for _ in [0]):
                top = max((int(c.info.modseq) for c in matches), default=0)
            else:
                top = 0
            if returns is None:
                line = b"* SEARCH" + b"".join(b" %d" % n for n in numbers)
                if top:
                    line += b" (MODSEQ %d)" % top
                self.send_line(line)
            else:
                parts = [b'* ESEARCH (TAG "' + tag + b'")']
                if uid:
                    parts.append(b"UID")
                if numbers:
                    if "MIN" in returns:
                        parts.append(b"MIN %d" % min(numbers))
                    if "MAX" in returns:
                        parts.append(b"MAX %d" % max(numbers))
                    if "ALL" in returns:
                        parts.append(b"ALL " + format_set(sorted(numbers)).encode())
                if "COUNT" in returns:
                    parts.append(b"COUNT %d" % len(numbers))
                if top:
                    parts.append(b"MODSEQ %d" % top)
                self.send_line(b" ".join(parts))
            return ("OK", "SEARCH completed")

        return d.addCallback(done)

    def do_sort(self, tag: bytes, args: Args, uid: bool = False) -> Any:
        """RFC 5256 section 3."""
        criteria = searchmod.parse_sort_criteria(args.next("sort criteria"))
        charset = as_bytes(args.next("charset")).decode("ascii", "replace").upper()
        if charset not in ("UTF-8", "US-ASCII"):
            raise ImapError("NO", "[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset")
        program, _ = searchmod.parse_program(args.tokens[args.pos :])
        sel = self._sel()
        cands = self._candidates(sel)
        d = self.run(
            _sort, sel.box, program, cands, len(sel), sel.uids[-1] if sel.uids else 0, criteria
        )

        def done(ordered: list[searchmod.Candidate]) -> tuple[str, str]:
            self.send_line(
                b"* SORT" + b"".join(b" %d" % (c.uid if uid else c.seq) for c in ordered)
            )
            return ("OK", "SORT completed")

        return d.addCallback(done)

    def do_thread(self, tag: bytes, args: Args, uid: bool = False) -> Any:
        """RFC 5256 section 4: ORDEREDSUBJECT and REFERENCES."""
        algorithm = args.atom("algorithm").upper()
        if algorithm not in ("ORDEREDSUBJECT", "REFERENCES"):
            raise ParseError("unknown threading algorithm")
        charset = as_bytes(args.next("charset")).decode("ascii", "replace").upper()
        if charset not in ("UTF-8", "US-ASCII"):
            raise ImapError("NO", "[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset")
        program, _ = searchmod.parse_program(args.tokens[args.pos :])
        sel = self._sel()
        cands = self._candidates(sel)
        for c in cands:
            c.number = c.uid if uid else c.seq
        d = self.run(
            _thread, sel.box, program, cands, len(sel), sel.uids[-1] if sel.uids else 0, algorithm
        )

        def done(text: bytes) -> tuple[str, str]:
            self.send_line(b"* THREAD" + (b" " + text if text else b""))
            return ("OK", "THREAD completed")

        return d.addCallback(done)

    def do_idle(self, tag: bytes, args: Args) -> Any:
        """RFC 2177: push EXISTS / EXPUNGE / FETCH while the client waits."""
        args.end()
        self.idle_tag = tag
        self.send_line(b"+ idling")
        self.line_handler = self._idle_line
        self.busy = False  # let _process read the DONE line
        if self.selected is not None:
            self._schedule_idle_poll()
        return None

    def _idle_line(self, line: bytes) -> None:
        tag = self.idle_tag
        self.line_handler = None
        self.idle_tag = None
        self._stop_idle_poll()
        self.busy = True
        assert tag is not None
        if line.strip().upper() != b"DONE":
            self._finish(tag, "BAD", "Expected DONE", bad=True)
            return
        pending = self.idle_syncing or defer.succeed(None)
        pending.addBoth(lambda _: self._command_done(tag, "IDLE", ("OK", "IDLE terminated")))

    def _schedule_idle_poll(self) -> None:
        self._stop_idle_poll()
        self.idle_call = self.reactor.callLater(self.settings.idle_poll, self._idle_poll)

    def _stop_idle_poll(self) -> None:
        if self.idle_call is not None and self.idle_call.active():
            self.idle_call.cancel()
        self.idle_call = None

    def _idle_poll(self) -> None:
        if self.idle_tag is None or self.closed or self.idle_syncing is not None:
            return
        d = self._sync(force=True)
        self.idle_syncing = d

        def done(result: Any) -> None:
            self.idle_syncing = None
            if self.idle_tag is not None and not self.closed:
                self._schedule_idle_poll()
            if isinstance(result, Failure):
                log.failure("IDLE refresh failed", result)

        d.addBoth(done)

    # ------------------------------------------------------------------
    # QUOTA (RFC 9208)

    def do_getquotaroot(self, tag: bytes, args: Args) -> Any:
        name = self._mailbox_name(args.next("mailbox"))
        args.end()
        self.send_line(b"* QUOTAROOT " + self._mailbox_wire(name) + b' ""')
        return self._quota_line().addCallback(lambda _: ("OK", "GETQUOTAROOT completed"))

    def do_getquota(self, tag: bytes, args: Args) -> Any:
        root = as_bytes(args.next("quota root"))
        args.end()
        if root != b"":
            raise ImapError("NO", "[NONEXISTENT] No such quota root")
        return self._quota_line().addCallback(lambda _: ("OK", "GETQUOTA completed"))

    def do_setquota(self, tag: bytes, args: Args) -> tuple[str, str]:
        raise ImapError("NO", "[NOPERM] Quota is set by the administrator")

    def _quota_line(self) -> defer.Deferred[None]:
        d = self._require_account().call("quota")

        def send(q: Any) -> None:
            used, limit, used_msgs, limit_msgs = q
            res = []
            if limit:
                res.append(f"STORAGE {(used + 1023) // 1024} {limit // 1024}")
            if limit_msgs:
                res.append(f"MESSAGE {used_msgs} {limit_msgs}")
            self.send_line(b'* QUOTA "" (' + " ".join(res).encode() + b")")

        return d.addCallback(send)


class _ViewInfo:
    """A MessageInfo seen through the session: flags include keywords."""

    __slots__ = ("flags", "internal_date", "modseq", "size", "uid")

    def __init__(self, info: Any) -> None:
        self.uid = info.uid
        self.size = info.size
        self.flags = acct.flags_of(info)
        self.modseq = info.modseq
        self.internal_date = info.internal_date


def _abort_quietly(abort: Callable[[], None]) -> None:
    try:
        abort()
    except Exception:
        log.debug("abort after close failed")


def _close_literals(fragments: list[bytes | LiteralFile]) -> None:
    for frag in fragments:
        if isinstance(frag, LiteralFile):
            frag.file.close()


def _valid_tag(tag: bytes) -> bool:
    return bool(tag) and len(tag) <= 64 and all(c in _TAG_CHARS for c in tag) and tag != b"+"


def _folder_sort(name: str) -> tuple[int, str]:
    return (0 if name == "INBOX" else 1, name)


def _flag_list(tokens: list[Token]) -> list[str]:
    flags = []
    for t in tokens:
        if not isinstance(t, Atom):
            raise ParseError("flags must be atoms")
        text = str(t)
        if text.startswith("\\"):
            canon = {f.lower(): f for f in (*SYSTEM_FLAGS, "\\Recent")}.get(text.lower())
            if canon is None:
                raise ParseError(f"unknown system flag {text[:20]}")
            text = canon
        elif len(text) > 50 or any(c in text for c in '(){%*"\\]') or not text.isprintable():
            raise ParseError("invalid keyword")
        flags.append(text)
    if len({f for f in flags if not f.startswith("\\")}) > 64:
        raise ImapError("NO", "[LIMIT] Too many keywords")
    return flags


_STATUS_ITEMS = {"MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ", "SIZE"}


def _check_status_items(items: list[str]) -> None:
    if not items or any(i not in _STATUS_ITEMS for i in items):
        raise ParseError("bad STATUS items")


def _missing_uids(ranges: list[tuple[int, int]], sel: SelectedMailbox) -> list[int]:
    present = set(sel.uids)
    top = sel.highest_uid
    out: set[int] = set()
    for lo, hi in ranges:
        lo, hi = (lo or top), (hi or top)
        lo, hi = min(lo, hi), min(max(lo, hi), top)
        if hi - lo > 100000:
            lo = hi - 100000
        out.update(u for u in range(lo, hi + 1) if u not in present)
    return sorted(out)


def _qresync_params(params: list[Token]) -> tuple[int, int, list[tuple[int, int]] | None]:
    """(uidvalidity, modseq, known UIDs) of SELECT ... (QRESYNC (...)) (RFC 7162 3.2.5)."""
    if len(params) < 2:
        raise ParseError("QRESYNC needs uidvalidity and modseq")
    try:
        uidvalidity = int(str(params[0]))
        modseq = int(str(params[1]))
    except ValueError as exc:
        raise ParseError("bad QRESYNC parameters") from exc
    known = None
    if len(params) > 2 and isinstance(params[2], Atom):
        known = parse_seqset(str(params[2]))
    return uidvalidity, modseq, known


def _in_uid_ranges(
    uids: list[int], ranges: list[tuple[int, int]], sel: SelectedMailbox
) -> list[int]:
    """The UIDs of ``uids`` inside a UID set (``*``: the highest UID the view has seen)."""
    spans = resolve_seqset(ranges, sel.highest_uid)
    return sorted({u for u in uids for lo, hi in spans if lo <= u <= hi})


def _expunged_since(box: Any, modseq: int) -> list[int] | None:
    """IMailbox.expunged_since (thread pool), or None where the store keeps no history."""
    method = getattr(box, "expunged_since", None)
    return None if method is None else list(method(modseq))


def _uses_modseq(key: searchmod.Key) -> bool:
    return key.op == "MODSEQ" or any(_uses_modseq(c) for c in key.children)


# --------------------------------------------------------------------------
# Work done in the disk thread pool: plain functions over the store objects


def _refresh_view(shared: SharedFolder, force: bool, now: float) -> None:
    """Bring the shared view up to date with the store (its changes become events)."""
    if shared.fresh(force, now):
        return  # no need to look again: another session just did
    with shared.lock:
        shared.current(force, now, listing=False)


def _select_shared(
    hub: ChangeHub, key: tuple[str, str], account: Any, name: str, now: float
) -> tuple[SharedFolder, list[Any], tuple[int, int], int]:
    shared = hub.acquire(key, lambda: account.open_folder(name))
    try:
        with shared.lock:
            shared.current(True, now, listing=False)
            messages, state, version = shared.view()
    except BaseException:
        hub.release(shared)
        raise
    return shared, messages, state, version


def _status_values(
    hub: ChangeHub, key: tuple[str, str], account: Any, name: str, now: float
) -> dict[str, int]:
    shared = hub.hold(key)
    if shared is not None:
        try:
            with shared.lock:
                messages, (uidnext, highest) = shared.current(True, now)
            uidvalidity = int(shared.box.uidvalidity)
        finally:
            hub.release(shared)
    else:
        box = account.open_folder(name)
        try:
            box.refresh()
            messages = list(box.messages())
            uidnext, highest, uidvalidity = box.uidnext(), box.highest_modseq(), box.uidvalidity
        finally:
            box.close()
    return {
        "MESSAGES": len(messages),
        "RECENT": 0,
        "UIDNEXT": int(uidnext),
        "UIDVALIDITY": int(uidvalidity),
        "UNSEEN": sum(1 for m in messages if "\\Seen" not in m.flags),
        "HIGHESTMODSEQ": int(highest),
        "SIZE": sum(int(m.size) for m in messages),
    }


def _read_message(box: Any, uid: int) -> bytes | None:
    try:
        f = box.open_message(uid)
    except KeyError:
        return None
    with f:
        return bytes(f.read())


def _before(shared: SharedFolder | None) -> tuple[int, int]:
    return shared.box_state() if shared is not None else (0, 0)


def _info_of(box: Any, uid: int) -> Any | None:
    """The store's MessageInfo of ``uid`` from its memory (None if it cannot say)."""
    message = getattr(box, "message", None)
    if message is None:
        return None
    try:
        return message(uid)
    except KeyError:
        return None


def _fetch_work(
    shared: SharedFolder | None,
    box: Any,
    infos: list[Any],
    attrs: list[fetchmod.Attr],
    needs_data: bool,
    set_seen: bool,
) -> list[tuple[Any, bytes | None, bool]]:
    """Read and render one chunk of a FETCH, setting \\Seen where the items ask for it."""
    rows: list[tuple[Any, bytes | None, bool]] = []
    before = _before(shared) if set_seen else (0, 0)
    changed = []
    for info in infos:
        seen_set = False
        if set_seen and "\\Seen" not in info.flags:
            try:
                info = box.set_flags(info.uid, set(acct.flags_of(info)) | {"\\Seen"})
                seen_set = True
                changed.append(info)
            except KeyError:
                rows.append((info, None, False))
                continue
        data = None
        if needs_data:
            data = _read_message(box, info.uid)
            if data is None:
                rows.append((info, None, False))
                continue
        rows.append((info, fetchmod.build_items(attrs, info, data, {}), seen_set))
    if shared is not None and changed:
        shared.apply(before, changed=changed)
    return rows


def _store_flags(
    shared: SharedFolder | None,
    box: Any,
    infos: list[Any],
    mode: str,
    flags: list[str],
    unchanged: int | None,
) -> tuple[list[tuple[Any, bool]], list[int]]:
    """STORE: new flags for each message; (results, UIDs failing UNCHANGEDSINCE)."""
    results: list[tuple[Any, bool]] = []
    failed: list[int] = []
    wanted = {f for f in flags if f != "\\Recent"}
    before = _before(shared)
    for info in infos:
        if unchanged is not None and int(info.modseq) > unchanged:
            failed.append(info.uid)
            continue
        current = set(acct.flags_of(info))
        if mode == "+":
            new = current | wanted
        elif mode == "-":
            new = current - wanted
        else:
            new = set(wanted)
        if new == current:
            results.append((info, False))
            continue
        try:
            results.append((box.set_flags(info.uid, new), True))
        except KeyError:
            continue
    if shared is not None:
        shared.apply(before, changed=[info for info, changed in results if changed])
    return results, failed


def _expunge_deleted(
    shared: SharedFolder | None, box: Any, now: float, allowed: list[int] | None
) -> list[int]:
    """EXPUNGE every message with \\Deleted (RFC 3501 section 6.4.3), or those of them in
    ``allowed`` (UID EXPUNGE, RFC 4315); the caller holds the folder's lock."""
    if shared is not None:
        shared.current(False, now, listing=False)  # our sessions' flags, patched after writes
        doomed = sorted(shared.deleted)
    else:
        box.refresh()
        doomed = [m.uid for m in box.messages() if "\\Deleted" in m.flags]
    if allowed is not None:
        permitted = set(allowed)
        doomed = [u for u in doomed if u in permitted]
    if not doomed:
        return []
    before = _before(shared)
    removed = list(box.expunge(doomed))
    if shared is not None:
        shared.apply(before, removed=removed)
    return removed


def _stream(source: bytes | LiteralFile) -> Any:
    if isinstance(source, LiteralFile):
        source.file.seek(0)
        return source.file
    return io.BytesIO(source)


def _stage(
    stage: Callable[..., Any],
    items: list[tuple[bytes | LiteralFile, list[str], float | None]],
    staged: list[Any],
) -> list[tuple[Any, list[str], float | None]]:
    """Write APPEND's messages ahead with the store's ``stage`` (thread pool); each
    staged message is also put in ``staged`` (discarded if the APPEND fails)."""
    ready: list[tuple[Any, list[str], float | None]] = []
    for source, flags, date in items:
        when = date if date is not None else time.time()
        staged.append(stage(_stream(source), when))
        ready.append((staged[-1], flags, when))
    return ready


def _discard(staged: list[Any]) -> None:
    for item in staged:
        item.discard()


def _append(
    account: Any,
    name: str,
    items: list[tuple[Any, list[str], float | None]],
    shared: SharedFolder | None,
) -> tuple[int, list[int]]:
    """APPEND of one or more messages (the caller holds the lock of ``shared``, the
    target if some session has it): all of them or, if one fails, none (RFC 3502
    section 6.3.11: the ones stored are expunged again before the error goes out)."""
    box = shared.box if shared is not None else account.open_folder(name)
    before = shared.box_state() if shared is not None else (0, 0)
    uids: list[int] = []
    try:
        for source, flags, date in items:
            stream = source if not isinstance(source, bytes | LiteralFile) else _stream(source)
            when = date if date is not None else time.time()
            uids.append(int(box.append(stream, flags, when)))
        uidvalidity = int(box.uidvalidity)
    except BaseException:
        if uids:
            box.expunge(uids)
        if shared is not None:
            shared.invalidate()  # UIDNEXT and modseq moved: see the store again
        raise
    finally:
        if shared is None:
            box.close()
    if shared is not None:
        added = [_info_of(box, uid) for uid in uids]
        if any(info is None for info in added):
            shared.invalidate()
        else:
            shared.apply(before, added=added)
    return uidvalidity, uids


def _copy(
    account: Any,
    source: SharedFolder | None,
    box: Any,
    target: str,
    uids: list[int],
    move: bool,
    shared: SharedFolder | None,
) -> tuple[int, dict[int, int], list[int]]:
    """COPY/MOVE (the caller holds the locks of both folders); ``shared`` is the target's."""
    dest = shared.box if shared is not None else account.open_folder(target)
    before = _before(shared)
    try:
        mapping = dict(box.copy_to(uids, dest))
        uidvalidity = int(dest.uidvalidity)
    finally:
        if shared is None:
            dest.close()
    if shared is not None:
        added = [_info_of(dest, u) for u in mapping.values()]
        if any(a is None for a in added):
            shared.invalidate()
        else:
            shared.apply(before, added=added)
    removed: list[int] = []
    if move and mapping:
        before = _before(source)
        removed = list(box.expunge(sorted(mapping)))
        if source is not None:
            source.apply(before, removed=removed)
    return uidvalidity, mapping, removed


def _rename_inbox(account: Any, new: str, shared: SharedFolder | None) -> None:
    account.create_folder(new)
    box = shared.box if shared is not None else account.open_folder("INBOX")
    try:
        box.refresh()
        uids = [m.uid for m in box.messages()]
        if uids:
            dest = account.open_folder(new)
            try:
                moved = dict(box.copy_to(uids, dest))
            finally:
                dest.close()
            before = _before(shared)
            removed = list(box.expunge(sorted(moved)))
            if shared is not None:
                shared.apply(before, removed=removed)
    finally:
        if shared is None:
            box.close()


def _matching(
    box: Any, program: searchmod.Key, cands: list[searchmod.Candidate], max_seq: int, max_uid: int
) -> list[searchmod.Candidate]:
    """The candidates matching ``program``; message texts are dropped once evaluated
    (a SEARCH TEXT over the mailbox holds one message at a time, not all of them)."""
    out = []
    read = _read_or_empty if searchmod.needs_body(program) else _read_header_block
    for c in cands:
        c.loader = functools.partial(read, box, c.uid)
        if searchmod.evaluate(program, c, max_seq, max_uid):
            out.append(c)
        c.drop_text()
    return out


def _headers_only(cands: list[searchmod.Candidate]) -> list[searchmod.Candidate]:
    """Parse each message's headers (all SORT and THREAD use) and drop its text."""
    for c in cands:
        c.tree()
        c.drop_text()
    return cands


def _read_header_block(box: Any, uid: int, limit: int = 256 * 1024) -> bytes:
    """The message's header block (up to the empty line): what header keys, SORT and
    THREAD need, without reading bodies."""
    try:
        f = box.open_message(uid)
    except KeyError:
        return b""
    data = b""
    with f:
        while len(data) < limit:
            chunk = f.read(8192)
            if not chunk:
                break
            data += chunk
            end = _HEADER_END.search(data)
            if end is not None:
                return data[: end.end()]
    return data


_HEADER_END = re.compile(rb"\r?\n\r?\n")


def _read_or_empty(box: Any, uid: int) -> bytes:
    return _read_message(box, uid) or b""


def _next_chunk(uids: list[int], pos: int, sel: SelectedMailbox, needs_data: bool) -> list[int]:
    """The next FETCH_CHUNK messages, or fewer when their texts would pass FETCH_CHUNK_BYTES
    (always at least one): a FETCH 1:* BODY[] never holds the mailbox in memory."""
    if not needs_data:
        return uids[pos : pos + FETCH_CHUNK_NO_DATA]
    chunk: list[int] = []
    total = 0
    for uid in uids[pos : pos + FETCH_CHUNK]:
        size = int(sel.info[uid].size)
        if chunk and total + size > FETCH_CHUNK_BYTES:
            break
        chunk.append(uid)
        total += size
    return chunk


def _search(
    box: Any, program: searchmod.Key, cands: list[searchmod.Candidate], max_seq: int, max_uid: int
) -> list[searchmod.Candidate]:
    return _matching(box, program, cands, max_seq, max_uid)


def _sort(
    box: Any,
    program: searchmod.Key,
    cands: list[searchmod.Candidate],
    max_seq: int,
    max_uid: int,
    criteria: list[tuple[str, bool]],
) -> list[searchmod.Candidate]:
    matches = _headers_only(_matching(box, program, cands, max_seq, max_uid))
    return searchmod.sort_candidates(matches, criteria)


def _thread(
    box: Any,
    program: searchmod.Key,
    cands: list[searchmod.Candidate],
    max_seq: int,
    max_uid: int,
    algorithm: str,
) -> bytes:
    matches = _headers_only(_matching(box, program, cands, max_seq, max_uid))
    if algorithm == "ORDEREDSUBJECT":
        return searchmod.thread_orderedsubject(matches)
    return searchmod.thread_references(matches)


_ANY = ("notauth", "auth", "selected")
_AUTH = ("auth", "selected")
_SELECTED = ("selected",)
_COMMANDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "CAPABILITY": ("do_capability", _ANY),
    "NOOP": ("do_noop", _ANY),
    "LOGOUT": ("do_logout", _ANY),
    "ID": ("do_id", _ANY),
    "STARTTLS": ("do_starttls", ("notauth",)),
    "LOGIN": ("do_login", ("notauth",)),
    "AUTHENTICATE": ("do_authenticate", ("notauth",)),
    "ENABLE": ("do_enable", _AUTH),
    "NAMESPACE": ("do_namespace", _AUTH),
    "SELECT": ("do_select", _AUTH),
    "EXAMINE": ("do_examine", _AUTH),
    "CREATE": ("do_create", _AUTH),
    "DELETE": ("do_delete", _AUTH),
    "RENAME": ("do_rename", _AUTH),
    "SUBSCRIBE": ("do_subscribe", _AUTH),
    "UNSUBSCRIBE": ("do_unsubscribe", _AUTH),
    "LIST": ("do_list", _AUTH),
    "LSUB": ("do_lsub", _AUTH),
    "STATUS": ("do_status", _AUTH),
    "APPEND": ("do_append", _AUTH),
    "IDLE": ("do_idle", _AUTH),
    "GETQUOTA": ("do_getquota", _AUTH),
    "GETQUOTAROOT": ("do_getquotaroot", _AUTH),
    "SETQUOTA": ("do_setquota", _AUTH),
    "CHECK": ("do_check", _SELECTED),
    "CLOSE": ("do_close", _SELECTED),
    "UNSELECT": ("do_unselect", _SELECTED),
    "EXPUNGE": ("do_expunge", _SELECTED),
    "SEARCH": ("do_search", _SELECTED),
    "FETCH": ("do_fetch", _SELECTED),
    "STORE": ("do_store", _SELECTED),
    "COPY": ("do_copy", _SELECTED),
    "MOVE": ("do_move", _SELECTED),
    "SORT": ("do_sort", _SELECTED),
    "THREAD": ("do_thread", _SELECTED),
}
_UID_COMMANDS = {"FETCH", "STORE", "COPY", "MOVE", "SEARCH", "EXPUNGE", "SORT", "THREAD"}
