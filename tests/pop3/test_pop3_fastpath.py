"""The download path's costs, each pinned with its semantics.

Replies to pipelined commands leave in few writes (RFC 2449 §6.6 lets the
server answer a pipelined burst at once), messages are read ahead in the
``disk`` pool before the cache runs out (no thread round trip per message),
QUIT waits for reads in flight and updates in one disk job, and byte-stuffing
of a whole message gives the same bytes as the chunked Stuffer.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address

from mailserv.pop3.content import Stuffer, stuff
from mailserv.pop3.mailbox import (
    PREFETCH_BELOW,
    PREFETCH_MESSAGES,
    PREFETCH_UPTO,
    READ_AHEAD_BYTES,
    content_size,
)
from mailserv.pop3.server import OUTPUT_BATCH

from .conftest import TLSStringTransport

MSG = b"Subject: fast\r\n\r\n.dot line\r\nbody\r\n"


def fill(harness: Any, count: int, message: bytes = MSG) -> Any:
    inbox = harness.inbox()
    for _ in range(count):
        inbox.add(message)
    return inbox


def retr_reply(message: bytes) -> bytes:
    return b"+OK %d octets\r\n" % len(message) + stuff(message)


class RecordingTransport(TLSStringTransport):
    """Counts the writes and records what was written before STLS and the close."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writes: list[int] = []
        self.before_tls: bytes | None = None
        self.before_close: bytes | None = None

    def write(self, data: bytes) -> None:
        self.writes.append(len(data))
        super().write(data)

    def writeSequence(self, seq: Any) -> None:
        self.write(b"".join(seq))

    def startTLS(self, options: Any) -> None:
        self.before_tls = self.value()
        super().startTLS(options)

    def loseConnection(self) -> None:
        if self.before_close is None:
            self.before_close = self.value()
        super().loseConnection()


def recording_connect(harness: Any, host: str = "127.0.0.1") -> tuple[Any, RecordingTransport]:
    proto = harness.factory.buildProtocol(None)
    transport = RecordingTransport(peerAddress=IPv4Address("TCP", host, 40000))
    proto.makeConnection(transport)
    transport.clear()
    return proto, transport


def recording_login(harness: Any) -> tuple[Any, RecordingTransport]:
    proto, transport = recording_connect(harness)
    proto.dataReceived(b"USER alice\r\nPASS wonder land\r\n")
    assert transport.value().endswith(b"octets).\r\n")
    transport.clear()
    transport.writes.clear()
    return proto, transport


class ManualDisk:
    """A disk pool whose jobs run only when the test says so (in order)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[str, Any, tuple[Any, ...], defer.Deferred[Any]]] = []
        self.names: list[str] = []

    def __call__(self, fn: Any, *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        name = getattr(fn, "__name__", repr(fn))
        self.names.append(name)
        self.jobs.append((name, fn, args, d))
        return d

    def run_next(self) -> str:
        name, fn, args, d = self.jobs.pop(0)
        try:
            result = fn(*args)
        except BaseException:
            d.errback()
        else:
            d.callback(result)
        return name


# -- output ------------------------------------------------------------------------


def test_pipelined_replies_leave_in_one_write(harness):
    fill(harness, 10)
    p, t = recording_login(harness)
    burst = b"".join(b"RETR %d\r\nDELE %d\r\n" % (n, n) for n in range(1, 11))
    p.dataReceived(burst)
    expected = b"".join(retr_reply(MSG) + b"+OK Message %d deleted.\r\n" % n for n in range(1, 11))
    assert t.value() == expected
    assert len(t.writes) == 1


def test_a_long_pipelined_burst_is_written_in_bounded_pieces(harness):
    big = MSG + b"x" * 4000 + b"\r\n"
    fill(harness, 60, big)
    p, t = recording_login(harness)
    p.dataReceived(b"".join(b"RETR %d\r\n" % n for n in range(1, 61)))
    assert t.value() == retr_reply(big) * 60
    assert len(t.writes) > 1
    assert max(t.writes) < OUTPUT_BATCH + len(retr_reply(big))


def test_single_commands_are_answered_at_once(harness):
    fill(harness, 2)
    p, t = recording_login(harness)
    p.dataReceived(b"RETR 1\r\n")
    assert t.value() == retr_reply(MSG)
    p.dataReceived(b"DELE 1\r\n")
    assert t.value().endswith(b"+OK Message 1 deleted.\r\n")
    assert len(t.writes) == 2


def test_stls_reply_is_sent_before_tls_starts(harness):
    p, t = recording_connect(harness, "192.0.2.1")
    p.dataReceived(b"CAPA\r\nSTLS\r\nUSER smuggled\r\n")
    assert t.before_tls is not None
    assert t.before_tls.endswith(b"+OK Begin TLS negotiation now.\r\n")
    assert t.value() == t.before_tls  # the pipelined plaintext got no answer


def test_replies_are_sent_before_the_close(harness):
    fill(harness, 1)
    p, t = recording_login(harness)
    p.dataReceived(b"RETR 1\r\nDELE 1\r\nQUIT\r\n")
    assert t.before_close is not None
    assert t.before_close.endswith(b"+OK Logging out, 1 messages deleted.\r\n")
    assert t.before_close.startswith(retr_reply(MSG))


def test_too_many_bad_commands_are_all_answered_before_the_close(harness):
    p, t = recording_connect(harness)
    p.dataReceived(b"BAD1\r\nBAD2\r\nBAD3\r\nNOOP\r\n")
    assert t.before_close == b"-ERR Unknown command.\r\n" * 3 + b"-ERR Too many bad commands.\r\n"


# -- read-ahead ----------------------------------------------------------------------


def prefetching(harness: Any, count: int, last: int = 64) -> tuple[Any, Any, ManualDisk, Any]:
    """A session that RETRed 1 (read with 2..64), then 2..``last``: a prefetch is in flight."""
    inbox = fill(harness, count)
    p, t = harness.login()
    disk = ManualDisk()
    harness.factory.run_disk = disk
    p.dataReceived(b"RETR 1\r\n")
    disk.run_next()
    p.dataReceived(b"".join(b"RETR %d\r\n" % n for n in range(2, last + 1)))
    assert len(disk.jobs) == 1
    t.clear()
    return p, t, disk, inbox


def test_reading_ahead_continues_before_the_cache_runs_out(harness):
    fill(harness, 200)
    p, t = harness.login()
    disk = ManualDisk()
    harness.factory.run_disk = disk
    p.dataReceived(b"RETR 1\r\n")
    assert t.value() == b"" and disk.names == ["read_messages"]
    disk.run_next()
    assert t.value() == retr_reply(MSG)
    cached_first = len(p.maildrop._cache)
    assert cached_first == 63  # 2..64 in the same job
    t.clear()
    # Pipelined RETRs of cached messages are answered without waiting for the disk; a
    # prefetch of the following messages starts once fewer than half remain.
    p.dataReceived(b"".join(b"RETR %d\r\n" % n for n in range(2, 65)))
    assert t.value() == retr_reply(MSG) * 63
    assert disk.names == ["read_messages", "read_messages"]
    _, _, (uids, required), _ = disk.jobs[0]
    assert required is False
    assert uids[0] == 65  # after everything read so far
    t.clear()
    # RETR 65 waits for the prefetch in flight instead of starting a read of its own.
    p.dataReceived(b"RETR 65\r\nDELE 65\r\n")
    assert t.value() == b""
    assert len(disk.jobs) == 1
    disk.run_next()
    assert t.value() == retr_reply(MSG) + b"+OK Message 65 deleted.\r\n"
    assert p.maildrop._cached_bytes <= 1024 * 1024


def test_prefetch_skips_messages_deleted_while_it_ran(harness):
    p, t, disk, _ = prefetching(harness, 100, 40)
    _, _, (uids, _), _ = disk.jobs[0]
    victim = uids[-1]
    p.dataReceived(b"DELE %d\r\n" % victim)
    assert t.value() == b"+OK Message %d deleted.\r\n" % victim
    disk.run_next()
    assert victim not in p.maildrop._cache
    assert p.maildrop._cached_bytes == sum(content_size(v) for v in p.maildrop._cache.values())


def test_failed_prefetch_is_retried_by_the_retr_that_needs_it(harness):
    p, t, disk, inbox = prefetching(harness, 100)
    saved = dict(inbox.contents)
    inbox.contents.clear()  # every read of the prefetch fails
    disk.run_next()
    inbox.contents.update(saved)
    assert len(disk.jobs) == 1  # reading ahead goes on (97..128)
    p.dataReceived(b"RETR 65\r\n")
    # 65 is not in the read in flight: RETR reads it at once, beside it.
    assert len(disk.jobs) == 2
    _, _, (uids, required), _ = disk.jobs[1]
    assert uids[0] == 65 and required is True
    disk.run_next()
    assert t.value() == b""
    disk.run_next()
    assert t.value() == retr_reply(MSG)


def test_message_removed_before_its_prefetch_gets_an_error(harness):
    p, t, disk, inbox = prefetching(harness, 100)
    del inbox.contents[65]  # removed by another program meanwhile
    disk.run_next()
    p.dataReceived(b"RETR 65\r\nRETR 66\r\n")
    assert [job[2][0][0] for job in disk.jobs] == [97, 65]  # reading ahead, and 65 for itself
    disk.jobs.reverse()
    disk.run_next()
    assert t.value() == b"-ERR Message was removed by another session.\r\n" + retr_reply(MSG)


def test_quit_waits_for_the_read_in_flight_and_updates_in_one_job(harness):
    p, t, disk, inbox = prefetching(harness, 100, 40)
    p.dataReceived(b"".join(b"DELE %d\r\n" % n for n in range(1, 41)) + b"QUIT\r\n")
    assert t.value() == b"".join(b"+OK Message %d deleted.\r\n" % n for n in range(1, 41))
    assert len(disk.jobs) == 1 and inbox.expunged == []
    disk.run_next()  # the prefetch ends; only then does the UPDATE state start
    assert len(disk.jobs) == 1
    assert inbox.expunged == [] and len(harness.cache) == 0
    disk.run_next()
    assert inbox.expunged == [list(range(1, 41))]
    assert t.value().endswith(b"+OK Logging out, 40 messages deleted.\r\n")
    assert t.disconnecting
    assert disk.jobs == []
    assert len(harness.cache) == 1  # mailbox handed back, lock released
    harness.login()


def test_dropped_connection_during_a_read_closes_after_it_and_deletes_nothing(harness):
    inbox = fill(harness, 100)
    p, t = harness.login()
    disk = ManualDisk()
    harness.factory.run_disk = disk
    p.dataReceived(b"RETR 1\r\nDELE 1\r\n")
    p.connectionLost(None)
    assert len(disk.jobs) == 1 and len(harness.cache) == 0
    disk.run_next()  # the read finishes; then the maildrop is closed
    assert t.value() == b""
    assert len(disk.jobs) == 1
    disk.run_next()
    assert inbox.expunged == [] and len(inbox.contents) == 100
    assert len(harness.cache) == 1
    harness.factory.run_disk = lambda fn, *a: defer.maybeDeferred(fn, *a)
    harness.login()  # the lock was released


def test_stat_counts_follow_dele_and_rset(harness):
    fill(harness, 5)
    p, t = harness.login()
    total = 5 * len(MSG)
    assert harness.send(p, t, b"STAT\r\n") == b"+OK 5 %d\r\n" % total
    harness.send(p, t, b"DELE 2\r\nDELE 4\r\nDELE 2\r\n")
    assert harness.send(p, t, b"STAT\r\n") == b"+OK 3 %d\r\n" % (total - 2 * len(MSG))
    harness.send(p, t, b"RSET\r\n")
    assert harness.send(p, t, b"STAT\r\n") == b"+OK 5 %d\r\n" % total


# -- stuffing -------------------------------------------------------------------------


def chunked(message: bytes, size: int, body_lines: int | None = None) -> bytes:
    s = Stuffer(body_lines)
    out = b"".join(s.feed(message[i : i + size]) for i in range(0, len(message), size))
    return out + s.finish()


@pytest.mark.parametrize("seed", range(40))
def test_whole_message_stuffing_matches_the_chunked_stuffer(seed):
    rnd = random.Random(seed)
    alphabet = [b".", b"\r", b"\n", b"\r\n", b"x", b"\r\n.", b"\n."]
    message = b"".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 60)))
    assert stuff(message) == chunked(message, 1)
    assert stuff(message) == chunked(message, 5)


@pytest.mark.parametrize(
    "message",
    [b"", b".", b"\r", b"\n", b".\r\n", b"a\r", b"a\rb\r\n", b"a\nb\r\n", b"\r\n.\r\n", b"..x"],
)
def test_whole_message_stuffing_edge_cases(message):
    assert stuff(message) == chunked(message, 1)


def test_read_ahead_stuffs_in_the_disk_job_without_copying_clean_messages(harness):
    clean = b"Subject: clean\r\n\r\nno dots here\r\n"
    inbox = fill(harness, 1, MSG)
    inbox.add(clean)
    p, _ = harness.login()
    found = p.maildrop.read_messages([1, 2])
    assert found[1] == (MSG, stuff(MSG)[:-3], b".\r\n")
    data, body, end = found[2]
    assert body is data and end == b".\r\n"
    assert content_size(found[2]) == len(clean)
    assert content_size(found[1]) == len(MSG) + len(found[1][1])


def test_reading_ahead_goes_on_beside_the_client_up_to_a_bound(harness):
    p, t, disk, _ = prefetching(harness, 300)
    assert len(p.maildrop._cache) < PREFETCH_BELOW
    runs = 0
    while disk.jobs:
        disk.run_next()
        runs += 1
    # One job after the other while nobody waits, then it stops with a bounded cache.
    assert runs > 1
    assert len(p.maildrop._cache) >= PREFETCH_UPTO
    assert len(p.maildrop._cache) < PREFETCH_UPTO + PREFETCH_MESSAGES
    assert p.maildrop._cached_bytes <= READ_AHEAD_BYTES
    assert t.value() == b""
    # A dropped connection stops it: nothing more is read.
    p.dataReceived(b"".join(b"RETR %d\r\n" % n for n in range(65, 130)))
    assert len(disk.jobs) == 1
    p.connectionLost(None)
    disk.run_next()
    assert [name for name, *_ in disk.jobs] == ["close"]
