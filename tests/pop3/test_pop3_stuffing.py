"""RETR/TOP byte-stuffing whatever the message size and chunking (RFC 1939 §3; defect 1)."""

from __future__ import annotations

import io
import random

import pytest
from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.mail import pop3

from mailserv.pop3.content import Stuffer, stuff
from mailserv.pop3.mailbox import SMALL_MESSAGE


def unstuff(body: bytes) -> bytes:
    """What a client recovers from a multi-line response (RFC 1939 §3)."""
    assert body.endswith(b"\r\n.\r\n") or body == b".\r\n"
    lines = body.split(b"\r\n")[:-2]
    assert b"." not in lines, "a bare '.' line ends the response early"
    out = [line[1:] if line.startswith(b".") else line for line in lines]
    return b"".join(line + b"\r\n" for line in out)


def dotty_message(size: int, boundaries: list[int]) -> bytes:
    """A CRLF message of about ``size`` octets with a "." line starting at each boundary."""
    data = bytearray(b"Subject: dots\r\n\r\n")
    rnd = random.Random(size)
    for b in sorted(boundaries):
        while len(data) < b - 2:
            n = min(rnd.randint(1, 90), b - 2 - len(data))
            data += b"x" * (n - 1) + b"\n" if n > 1 else b"\n"
        data = data[: b - 2] + b"\r\n"
        data += b".\r\n..x\r\n"
    while len(data) < size:
        data += b"line of text\r\n"
    return bytes(data).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 4096, 16384, 65536])
def test_same_output_for_every_chunking(chunk):
    message = b"A: b\r\n\r\n.\r\n..\r\nx\r\n.y\n.\rz\r\n." + b"\r\n." * 3
    s = Stuffer()
    out = b"".join(s.feed(message[i : i + chunk]) for i in range(0, len(message), chunk))
    out += s.finish()
    assert out == stuff(message)
    # The message does not end with CRLF: the response adds one before the terminator.
    assert unstuff(out) == message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n"


def test_lf_only_messages_become_crlf():
    assert stuff(b"A: b\n\n.x\nend") == b"A: b\r\n\r\n..x\r\nend\r\n.\r\n"


def test_empty_message():
    assert stuff(b"") == b".\r\n"


def test_top_counts_body_lines_across_chunks():
    message = b"A: b\r\nC: d\r\n\r\nl1\r\n.l2\r\nl3\r\n"
    for chunk in (1, 2, 5, 100):
        s = Stuffer(body_lines=2)
        out = b"".join(s.feed(message[i : i + chunk]) for i in range(0, len(message), chunk))
        assert out + s.finish() == b"A: b\r\nC: d\r\n\r\nl1\r\n..l2\r\n.\r\n"


def test_top_of_a_message_without_body():
    assert stuff(b"A: b\r\n", body_lines=5) == b"A: b\r\n.\r\n"


BOUNDARIES = [16384, 32768, 65536, 131072, 16384 * 20, 65536 * 5]


@pytest.mark.parametrize("size", [SMALL_MESSAGE - 1000, 3 * 1024 * 1024])
def test_retr_dot_on_chunk_boundaries(harness, size):
    message = dotty_message(size, [b for b in BOUNDARIES if b < size])
    harness.inbox().add(message)
    p, t = harness.login()
    out = harness.send(p, t, b"RETR 1\r\nNOOP\r\n")
    status, _, rest = out.partition(b"\r\n")
    assert status == b"+OK %d octets" % len(message)
    assert rest.endswith(b"\r\n.\r\n+OK\r\n")
    assert unstuff(rest[: -len(b"+OK\r\n")]) == message


def test_big_retr_streams_with_back_pressure(harness):
    message = dotty_message(2 * 1024 * 1024, BOUNDARIES)
    harness.inbox().add(message)
    reads: list[int] = []
    pending: list[tuple[defer.Deferred[bytes], bytes]] = []

    def slow_disk(fn, *args):
        if getattr(fn, "__name__", "") == "read":
            reads.append(args[0])
            d: defer.Deferred[bytes] = defer.Deferred()
            pending.append((d, fn(*args)))
            return d
        return defer.maybeDeferred(fn, *args)

    p, t = harness.login()
    harness.factory.run_disk = slow_disk
    harness.send(p, t, b"RETR 1\r\nNOOP\r\n")
    assert t.producer is not None and len(pending) == 1
    p.transport.producer.pauseProducing()
    d, data = pending.pop()
    d.callback(data)
    assert pending == []  # paused: no further read
    t.producer.resumeProducing()
    while pending:
        d, data = pending.pop()
        d.callback(data)
    out = t.value()
    assert out.endswith(b"\r\n.\r\n+OK\r\n")
    assert t.producer is None
    body = out.partition(b"\r\n")[2][: -len(b"+OK\r\n")]
    assert unstuff(body) == message
    assert max(reads) <= 64 * 1024


def test_big_top(harness):
    message = dotty_message(1024 * 1024, BOUNDARIES)
    harness.inbox().add(message)
    p, t = harness.login()
    out = harness.send(p, t, b"TOP 1 3\r\n")
    assert (
        out
        == b"+OK Top of message follows\r\nSubject: dots\r\n\r\n"
        + b"".join(
            (b"." + line if line.startswith(b".") else line) + b"\r\n"
            for line in message.split(b"\r\n")[2:5]
        )
        + b".\r\n"
    )


def test_stock_twisted_stuffs_per_chunk():
    """Pin defect 1: stock Twisted's RETR leaves a "." line on a 16 KiB boundary unstuffed.

    If this starts failing, Twisted fixed it; our Stuffer stays correct either way.
    """
    # Twisted expects LF line ends; the "." line starts at octet 16384 of the file.
    message = b"x" * 99 + b"\n"
    message = message * 163 + b"y" * 83 + b"\n" + b".\n..x\n" + message * 100
    assert message[16384:16386] == b".\n"

    class Box(pop3.Mailbox):
        def listMessages(self, i=None):
            return [len(message)] if i is None else len(message)

        def getMessage(self, i):
            return io.BytesIO(message)

    server = pop3.POP3()
    server.mbox = Box()
    server.schedule = lambda it: defer.succeed(list(it))
    t = StringTransport()
    server.makeConnection(t)
    t.clear()
    server.lineReceived(b"RETR 1")
    while t.producer is not None:
        t.producer.resumeProducing()
    body = t.value().partition(b"\r\n")[2]
    assert b"\r\n.\r\n...x\r\n" in body  # unstuffed: the response ends there for a client
    assert body != stuff(message)
    assert b"\r\n..\r\n...x\r\n" in stuff(message)
    server.connectionLost(None)


class _StockBox(pop3.Mailbox):
    """A three-message mailbox for stock Twisted's POP3, recording deletions."""

    def __init__(self) -> None:
        self.deleted: list[int] = []

    def listMessages(self, i=None):
        return [10, 20, 30] if i is None else [10, 20, 30][i]

    def deleteMessage(self, i):
        self.deleted.append(i)


def _stock_server() -> tuple[pop3.POP3, StringTransport, _StockBox]:
    server = pop3.POP3()
    server.mbox = box = _StockBox()
    t = StringTransport()
    server.makeConnection(t)
    t.clear()
    return server, t, box


def test_stock_twisted_message_numbers_and_deletion():
    """Pin defect 8: stock Twisted's "DELE 0" deletes message index -1, the last one.

    (Its maildir mailbox also removes the file right there, at DELE rather than QUIT.)
    """
    server, _, box = _stock_server()
    server.lineReceived(b"DELE 0")
    assert box.deleted == [-1]
    server.connectionLost(None)


def test_stock_twisted_capa_timeout_and_no_stls():
    """Pin defect 8: "PIPELINE" (not PIPELINING), no STLS, a 300 s idle timeout."""
    server, t, _ = _stock_server()
    server.lineReceived(b"CAPA")
    caps = t.value().split(b"\r\n")
    assert b"PIPELINE" in caps and b"PIPELINING" not in caps and b"STLS" not in caps
    assert server.timeOut == 300
    assert not hasattr(server, "do_STLS")
    server.connectionLost(None)
