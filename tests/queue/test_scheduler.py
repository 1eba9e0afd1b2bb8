"""The scheduler's rules: retry schedule, lifetime, delay warnings, local hand-back, DSNs."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest_twisted
from twisted.internet import defer

from mailserv.errors import SMTPReply
from mailserv.queue import dsn
from mailserv.queue.scheduler import backoff
from mailserv.queue.spool import QueuedRecipient, QueueEntry
from mailserv.queue.state import QueueItem, QueueStore, RecipientState
from tests.queue.conftest import message
from tests.queue.test_delivery import remote_dns, wait_for

DAY = 86400.0


def test_backoff_doubles_from_five_minutes_to_about_an_hour() -> None:
    """LIMITS.md: first retry after 300 s, doubling to 4000 s (Postfix's backoff times)."""
    assert [backoff(n, 300, 4000) for n in range(1, 8)] == [300, 600, 1200, 2400, 4000, 4000, 4000]


def item(ret: str | None = None, notify: list[str] | None = None, **kw: Any) -> QueueItem:
    entry = QueueEntry(
        id="0000000000000abcdef0123",
        sender="a@sender.test",
        recipients=[QueuedRecipient("b@remote.test", "rfc822;B@remote.test", notify)],
        envid="E1",
        ret=ret,
        arrival=1_700_000_000.0,
    )
    return QueueItem(
        entry, [RecipientState("failed", "550 5.1.1 no such user", "mx[1.2.3.4]")], **kw
    )


ORIGINAL = b"From: a@sender.test\r\nSubject: original\r\n\r\n" + b"body line\r\n" * 10


def test_dsn_structure_rfc3464() -> None:
    it = item()
    reports = [
        dsn.Report(
            "b@remote.test",
            "rfc822;B@remote.test",
            "failed",
            "5.1.1",
            "550 5.1.1 no such user",
            "mx[1.2.3.4]",
        )
    ]
    out = dsn.build("mail.local.test", it, reports, dsn.FAILED, ORIGINAL, True, now=1_700_000_100)
    text = out.decode()
    assert "\r\n" in text and "\n" not in text.replace("\r\n", "")
    head, _, body = text.partition("\r\n\r\n")
    assert "Auto-Submitted: auto-replied" in head
    assert "To: <a@sender.test>" in head
    assert 'multipart/report; report-type=delivery-status; boundary="' in head
    status = body.split("Content-Type: message/delivery-status\r\n\r\n")[1].split("\r\n--")[0]
    assert status.strip().split("\r\n\r\n") == [
        "Reporting-MTA: dns; mail.local.test\r\nOriginal-Envelope-Id: E1\r\n"
        "Arrival-Date: Tue, 14 Nov 2023 22:13:20 -0000",
        "Final-Recipient: rfc822; b@remote.test\r\nOriginal-Recipient: rfc822; B@remote.test\r\n"
        "Action: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; mx[1.2.3.4]\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 no such user",
    ]
    assert "Content-Type: message/rfc822\r\n\r\n" + ORIGINAL.decode() in text
    assert text.endswith("--\r\n")


def test_dsn_ret_hdrs_and_truncation() -> None:
    reports = [dsn.Report("b@remote.test", None, "failed", "5.0.0")]
    out = dsn.build("h", item(ret="HDRS"), reports, dsn.FAILED, ORIGINAL, True).decode()
    assert (
        "Content-Type: text/rfc822-headers\r\n\r\nFrom: a@sender.test\r\nSubject: original\r\n"
        in out
    )
    assert "body line" not in out
    big = ORIGINAL + b"y" * 60 + b"\r\n"
    out = dsn.build("h", item(), reports, dsn.FAILED, big[:70], False).decode()
    assert "Content-Type: message/rfc822" in out and "Subject: original\r\n\r\n" not in out[-20:]


def test_notify_rules_rfc3461() -> None:
    assert dsn.wants(None, dsn.FAILED) and dsn.wants(None, dsn.DELAYED)
    assert not dsn.wants(None, dsn.DELIVERED)
    assert not dsn.wants(["NEVER"], dsn.FAILED)
    assert dsn.wants(["SUCCESS"], dsn.DELIVERED) and not dsn.wants(["SUCCESS"], dsn.FAILED)
    assert dsn.wants(["DELAY", "FAILURE"], dsn.DELAYED)
    assert dsn.status_of("451 4.2.0 later", dsn.DELAYED) == "4.2.0"
    assert dsn.status_of("554 rejected", dsn.FAILED) == "5.0.0"


@pytest_twisted.ensureDeferred
async def test_lifetime_expiry_bounces_without_another_attempt(
    queue_env: Any, mx_net: Any, dns_server: Any
) -> None:
    remote_dns(dns_server)
    mx = mx_net.server("127.0.0.2")
    sender_mx = mx_net.server("127.0.0.5")
    queue_env.enqueue("a@sender.test", ["b@remote.test"], message(), arrival=time.time() - 6 * DAY)
    queue = queue_env.build()
    queue.startService()
    await wait_for(lambda: len(sender_mx.messages) == 1 and not queue_env.entries())
    assert not mx.messages
    text = sender_mx.messages[0].data.decode()
    assert "Status: 5.4.7" in text and "delivery time expired after 5 days" in text


@pytest_twisted.ensureDeferred
async def test_delay_warning_once_after_four_hours(
    queue_env: Any, mx_net: Any, dns_server: Any
) -> None:
    remote_dns(dns_server)
    mx_net.server("127.0.0.2", rcpt_replies={"b@remote.test": "450 4.2.1 mailbox busy"})
    sender_mx = mx_net.server("127.0.0.5")
    entry_id = queue_env.enqueue(
        "a@sender.test", ["b@remote.test"], message(), arrival=time.time() - 5 * 3600
    )
    queue = queue_env.build()
    queue.startService()
    await wait_for(lambda: len(sender_mx.messages) == 1)
    text = sender_mx.messages[0].data.decode()
    assert "Action: delayed" in text and "Status: 4.2.1" in text
    assert "Will-Retry-Until:" in text and "Subject: Delayed Mail" in text
    assert "text/rfc822-headers" in text
    await queue.wait_idle()
    await queue.control("retry", entry_id)
    store = QueueStore(queue_env.queue_dir)
    await wait_for(lambda: store.load(entry_id).attempts == 2)
    await queue.wait_idle()
    assert len(sender_mx.messages) == 1  # warned once only
    assert queue_env.entries() == [entry_id]


class FakeRouter:
    """The router's queue-facing surface: is_local + IDeliveryTarget."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, str, bytes]] = []

    def is_local(self, address: Any) -> bool:
        return address.domain == "local.test"

    def start_delivery(self, envelope: Any) -> defer.Deferred[Any]:
        router = self

        class Delivery:
            rcpts: list[Any] = []

            def add_recipient(self, rcpt: Any) -> defer.Deferred[None]:
                if rcpt.address.local == "nobody":
                    return defer.fail(SMTPReply(550, "5.1.1", "no such user"))
                if rcpt.address.local == "full":
                    self.rcpts.append(rcpt)
                    return defer.succeed(None)
                self.rcpts.append(rcpt)
                return defer.succeed(None)

            def body(self, message: Any) -> defer.Deferred[None]:
                self.message = message
                return defer.succeed(None)

            def commit(self) -> defer.Deferred[Any]:
                out = {}
                with self.message.open() as f:  # as a store reads it (Message.open)
                    data = f.read()
                for rcpt in self.rcpts:
                    if rcpt.address.local == "full":
                        out[rcpt] = SMTPReply(452, "4.2.2", "Mailbox full")
                    else:
                        router.delivered.append((envelope.sender, str(rcpt.address), data))
                        out[rcpt] = None
                return defer.succeed(out)

        return defer.succeed(Delivery())


@pytest_twisted.ensureDeferred
async def test_local_recipients_go_back_to_the_router(
    queue_env: Any, mx_net: Any, dns_server: Any
) -> None:
    remote_dns(dns_server)
    mx = mx_net.server("127.0.0.2")
    router = FakeRouter()
    entry_id = queue_env.enqueue(
        "a@local.test",
        ["u@local.test", "full@local.test", "nobody@local.test", "b@remote.test"],
        message(),
    )
    queue = queue_env.build(router=router)
    queue.startService()
    store = QueueStore(queue_env.queue_dir)
    await wait_for(lambda: os.path.exists(store.path(entry_id, "state")))
    await queue.wait_idle()
    assert [(s, r) for s, r, _ in router.delivered][:1] == [("a@local.test", "u@local.test")]
    assert [m.recipients for m in mx.messages] == [["b@remote.test"]]
    states = [r.status for r in store.load(entry_id).recipients]
    assert states == ["sent", "pending", "done", "sent"]
    # The bounce for nobody@ went to the (local) sender, through the router.
    await wait_for(lambda: any(r == "a@local.test" for _, r, _ in router.delivered))
    bounce = next(d for s, r, d in router.delivered if r == "a@local.test")
    assert b"Final-Recipient: rfc822; nobody@local.test" in bounce


@pytest_twisted.ensureDeferred
async def test_a_large_entry_reaches_local_and_remote_recipients_whole(
    queue_env: Any, mx_net: Any, dns_server: Any
) -> None:
    """A message too large to be read with its envelope is read from the entry's file
    after the envelope line: by the router, the SMTP client and the DSN."""
    remote_dns(dns_server)
    mx = mx_net.server("127.0.0.2")
    router = FakeRouter()
    data = message(subject="big", body=b"0123456789abcdef\r\n" * 25_000)  # 450 KB
    queue_env.enqueue("a@local.test", ["u@local.test", "b@remote.test", "nobody@local.test"], data)
    queue = queue_env.build(router=router)
    queue.startService()
    await wait_for(lambda: len(mx.messages) == 1 and len(router.delivered) == 2)
    await queue.wait_idle()
    assert router.delivered[0][1:] == ("u@local.test", data)
    assert mx.messages[0].data == data
    bounce = router.delivered[1][2]
    assert b"Final-Recipient: rfc822; nobody@local.test" in bounce
    assert b"\r\nSubject: big\r\n" in bounce and b'"recipients"' not in bounce


@pytest_twisted.ensureDeferred
async def test_dkim_signed_on_the_way_out(queue_env: Any, mx_net: Any, dns_server: Any) -> None:
    import dkim

    from mailserv.queue.dkimsign import generate

    records = dict(generate(str(queue_env.state / "dkim"), "sender.test", "t"))
    remote_dns(dns_server)
    mx = mx_net.server("127.0.0.2")
    data = message(sender="a@sender.test", body=b"Signed body.\r\n")
    queue_env.enqueue("a@sender.test", ["b@remote.test"], data)
    queue = queue_env.build()
    queue.startService()
    await wait_for(lambda: len(mx.messages) == 1)
    received = mx.messages[0].data
    assert received.endswith(data) and received.count(b"DKIM-Signature:") == 2

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return records.get(name.decode().rstrip("."), "").encode()

    verifier = dkim.DKIM(received)
    assert verifier.verify(idx=0, dnsfunc=dnsfunc) and verifier.verify(idx=1, dnsfunc=dnsfunc)


@pytest_twisted.ensureDeferred
async def test_notify_success_relayed_dsn_only_when_the_peer_lacks_dsn(
    queue_env: Any, mx_net: Any, dns_server: Any
) -> None:
    """RFC 3461 §5.2.2: a peer without DSN gets the mail and the sender a "relayed" DSN;
    a peer with DSN gets NOTIFY passed along and we send nothing."""
    remote_dns(
        dns_server,
        **{
            "nodsn.test": {"MX": [[10, "mx.nodsn.test"]]},
            "mx.nodsn.test": {"A": ["127.0.0.3"]},
        },
    )
    with_dsn = mx_net.server("127.0.0.2")
    without = mx_net.server("127.0.0.3", extensions=["PIPELINING", "8BITMIME"])
    sender_mx = mx_net.server("127.0.0.5")
    queue_env.enqueue(
        "a@sender.test", ["b@remote.test", "c@nodsn.test"], message(), notify=["SUCCESS"]
    )
    queue = queue_env.build()
    queue.startService()
    await wait_for(lambda: len(sender_mx.messages) == 1 and not queue_env.entries())
    assert any(c.endswith("NOTIFY=SUCCESS") for c in with_dsn.commands)
    assert len(without.messages) == 1
    text = sender_mx.messages[0].data.decode()
    assert "Action: relayed" in text and "Final-Recipient: rfc822; c@nodsn.test" in text
    status = text.split("Content-Type: message/delivery-status")[1].split("\r\n--")[0]
    assert "c@nodsn.test" in status and "b@remote.test" not in status


@pytest_twisted.ensureDeferred
async def test_no_busy_wakeups_while_every_delivery_slot_is_taken(
    queue_env: Any, mx_net: Any, dns_server: Any
) -> None:
    """Entries due while max_deliveries attempts run wait for one to finish, not a 0 s timer."""
    from twisted.internet import reactor, task

    remote_dns(dns_server)
    mx = mx_net.server("127.0.0.2", silent_after_data=True)  # attempts hang at the final dot
    for i in range(5):
        queue_env.enqueue("a@sender.test", ["b@remote.test"], message(f"m{i}"))
    queue = queue_env.start("max_deliveries = 2")
    await wait_for(lambda: len(queue.active) == 2 and mx.raw.count(b".") == 2)
    wakes = 0
    real_wake = queue._wake

    def counting_wake() -> None:
        nonlocal wakes
        wakes += 1
        real_wake()

    queue._wake = counting_wake
    await task.deferLater(reactor, 0.3, lambda: None)
    assert wakes <= 2, f"{wakes} wake-ups in 0.3 s with every slot taken"
