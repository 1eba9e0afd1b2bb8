"""End-to-end outbound delivery: queue on disk -> scheduler -> MX lookup -> SMTP client -> fake MX.

Every "remote" server runs on a 127.0.0.x loopback address (x >= 2) on the shared port of the
``mx_net`` fixture; MX/A records come from the real test DNS server.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task

from mailserv.queue.state import QueueStore
from tests.queue.conftest import message

pytestmark = pytest.mark.integration


async def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    from twisted.internet import reactor

    waited = 0.0
    while not predicate():
        if waited > timeout:
            raise AssertionError("condition not reached in time")
        await task.deferLater(reactor, 0.05, lambda: None)
        waited += 0.05


def remote_dns(dns_server: Any, **extra: Any) -> None:
    records = {
        "remote.test": {"MX": [[10, "mx1.remote.test"]]},
        "mx1.remote.test": {"A": ["127.0.0.2"]},
        "sender.test": {"MX": [[10, "mx.sender.test"]]},
        "mx.sender.test": {"A": ["127.0.0.5"]},
    }
    records.update(extra)
    dns_server.set(records)


@pytest_twisted.ensureDeferred
async def test_delivers_and_removes_the_entry(queue_env: Any, mx_net: Any, dns_server: Any) -> None:
    remote_dns(dns_server)
    mx = mx_net.server("127.0.0.2")
    data = message(body=b"Line one.\r\n.leading dot\r\n..two dots\r\n")
    entry_id = queue_env.enqueue("a@sender.test", ["b@remote.test"], data)
    queue = queue_env.build()
    queue.startService()
    msg = os.path.join(queue_env.queue_dir, f"{entry_id}.entry")
    await wait_for(lambda: not queue_env.entries() and not os.path.exists(msg))
    assert [m.recipients for m in mx.messages] == [["b@remote.test"]]
    assert mx.messages[0].sender == "a@sender.test"
    assert mx.messages[0].data == data
    assert b"..leading dot" in mx.raw and b"...two dots" in mx.raw
    # Opportunistic STARTTLS was not offered: plain, and that is allowed.
    assert mx.messages[0].tls is False


@pytest_twisted.ensureDeferred
async def test_every_mx_is_tried_in_preference_order(
    queue_env: Any, mx_net: Any, dns_server: Any
) -> None:
    remote_dns(
        dns_server,
        **{
            "remote.test": {"MX": [[20, "mx2.remote.test"], [10, "mx1.remote.test"]]},
            "mx2.remote.test": {"A": ["127.0.0.3"]},
        },
    )
    first = mx_net.server("127.0.0.2", greeting="421 4.3.2 busy")
    second = mx_net.server("127.0.0.3")
    queue_env.enqueue("a@sender.test", ["b@remote.test"], message())
    queue = queue_env.build()
    queue.startService()
    await wait_for(lambda: not queue_env.entries())
    assert first.connections == 1 and not first.messages
    assert len(second.messages) == 1


@pytest_twisted.ensureDeferred
async def test_5xx_bounces_that_recipient_only_and_4xx_defers(
    queue_env: Any, mx_net: Any, dns_server: Any
) -> None:
    remote_dns(dns_server)
    mx = mx_net.server(
        "127.0.0.2",
        rcpt_replies={
            "gone@remote.test": "550 5.1.1 no such user",
            "later@remote.test": "451 4.2.0 try later",
        },
    )
    sender_mx = mx_net.server("127.0.0.5")
    entry_id = queue_env.enqueue(
        "a@sender.test",
        ["ok@remote.test", "gone@remote.test", "later@remote.test"],
        message(),
        envid="ENV-1",
    )
    queue = queue_env.build()
    queue.startService()
    await wait_for(lambda: len(sender_mx.messages) == 1)
    await queue.wait_idle()
    assert mx.messages[0].recipients == ["ok@remote.test"]
    bounce = sender_mx.messages[0]
    assert bounce.sender == "" and bounce.recipients == ["a@sender.test"]
    text = bounce.data.decode()
    assert "Content-Type: multipart/report; report-type=delivery-status" in text
    assert "Final-Recipient: rfc822; gone@remote.test" in text
    assert "Action: failed" in text and "Status: 5.1.1" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1 no such user" in text
    assert "Original-Envelope-Id: ENV-1" in text
    assert "later@remote.test" not in text.split("message/delivery-status")[1].split("--")[0]
    # The deferred recipient stays queued, pending, retried after the first backoff.
    assert queue_env.entries() == [entry_id]
    with open(os.path.join(queue_env.queue_dir, f"{entry_id}.state"), "rb") as f:
        state = json.load(f)
    statuses = [r["status"] for r in state["recipients"]]
    assert statuses == ["sent", "done", "pending"]
    assert state["attempts"] == 1
    assert 290 <= state["next_attempt"] - state["last_attempt"] <= 310


@pytest_twisted.ensureDeferred
async def test_bounce_of_an_smtputf8_message_is_a_global_dsn(
    queue_env: Any, mx_net: Any, dns_server: Any
) -> None:
    """RFC 6533: the DSN of an SMTPUTF8 message is message/global-delivery-status, its
    non-ASCII addresses are of type utf-8, the original is message/global, and it goes
    back over SMTPUTF8."""
    remote_dns(dns_server)
    mx_net.server("127.0.0.2", rcpt_replies={"josé@remote.test": "550 5.1.1 no such user"})
    sender_mx = mx_net.server("127.0.0.5")
    data = (
        "From: <grüße@sender.test>\r\nTo: <josé@remote.test>\r\nSubject: Grüße\r\n"
        "Message-ID: <1@sender.test>\r\n\r\nHällo.\r\n"
    ).encode()
    queue_env.enqueue(
        "grüße@sender.test", ["josé@remote.test"], data, smtputf8=True, body="8BITMIME"
    )
    queue_env.start()
    await wait_for(lambda: len(sender_mx.messages) == 1)
    mail = next(c for c in sender_mx.commands if c.startswith("MAIL"))
    assert mail.startswith("MAIL FROM:<>") and mail.endswith(" SMTPUTF8")
    bounce = sender_mx.messages[0]
    assert bounce.recipients == ["grüße@sender.test"]
    text = bounce.data.decode("utf-8")
    assert "Content-Type: message/global-delivery-status\r\n" in text
    assert "Final-Recipient: utf-8; josé@remote.test\r\n" in text
    assert "Status: 5.1.1" in text and "Action: failed" in text
    assert "Content-Type: message/global\r\n" in text and "Hällo." in text
    assert "message/rfc822" not in text and "message/delivery-status" not in text


@pytest_twisted.ensureDeferred
async def test_null_mx_bounces_at_once_without_connecting(
    queue_env: Any, mx_net: Any, dns_server: Any
) -> None:
    remote_dns(dns_server, **{"nomail.test": {"MX": [[0, ""]], "A": ["127.0.0.6"]}})
    trap = mx_net.server("127.0.0.6")
    sender_mx = mx_net.server("127.0.0.5")
    queue_env.enqueue("a@sender.test", ["x@nomail.test"], message())
    queue = queue_env.build()
    queue.startService()
    await wait_for(lambda: len(sender_mx.messages) == 1 and not queue_env.entries())
    assert trap.connections == 0
    text = sender_mx.messages[0].data.decode()
    assert "Status: 5.1.10" in text and "null MX" in text


@pytest_twisted.ensureDeferred
async def test_no_bounce_to_the_null_sender(queue_env: Any, mx_net: Any, dns_server: Any) -> None:
    remote_dns(dns_server)
    mx_net.server("127.0.0.2", rcpt_replies={"gone@remote.test": "550 5.1.1 no"})
    sender_mx = mx_net.server("127.0.0.5")
    queue_env.enqueue("", ["gone@remote.test"], message())
    queue = queue_env.build()
    queue.startService()
    await wait_for(lambda: not queue_env.entries())
    await queue.wait_idle()
    assert sender_mx.connections == 0


@pytest_twisted.ensureDeferred
async def test_drop_mid_data_defers(queue_env: Any, mx_net: Any, dns_server: Any) -> None:
    remote_dns(dns_server)
    mx_net.server("127.0.0.2", drop_in_data=True)
    entry_id = queue_env.enqueue("a@sender.test", ["b@remote.test"], message())
    queue = queue_env.build()
    queue.startService()
    store = QueueStore(queue_env.queue_dir)
    await wait_for(lambda: os.path.exists(store.path(entry_id, "state")))
    item = store.load(entry_id)
    assert item.recipients[0].status == "pending"
    assert item.recipients[0].reason.startswith("451 4.4.2")


@pytest_twisted.ensureDeferred
async def test_connection_is_reused_for_several_messages(
    queue_env: Any, mx_net: Any, dns_server: Any
) -> None:
    remote_dns(dns_server)
    mx = mx_net.server("127.0.0.2")
    queue = queue_env.build('destination_concurrency = 1\nconnection_reuse_time = "10s"')
    for i in range(5):
        queue_env.enqueue("a@sender.test", [f"r{i}@remote.test"], message(f"m{i}"))
    queue.startService()
    ours = [f"r{i}@remote.test" for i in range(5)]
    await wait_for(lambda: sum(m.recipients[0] in ours for m in mx.messages) == 5)
    # All five over one connection (a stray connection of another test's queue that
    # happens to pick the same port must not fail this one on a loaded machine).
    assert len({m.connection for m in mx.messages if m.recipients[0] in ours}) == 1


@pytest_twisted.ensureDeferred
async def test_next_message_is_pipelined_behind_the_final_dot(
    queue_env: Any, mx_net: Any, dns_server: Any
) -> None:
    """RFC 2920 §3.1: message content may open a group, so the next message's MAIL, RCPT
    and DATA go out right after the "." without waiting for its reply; each message
    still gets its own reply."""
    remote_dns(dns_server)
    mx = mx_net.server(
        "127.0.0.2",
        final_reply_delay=0.2,
        rcpt_replies={"r2@remote.test": "550 5.1.1 no such user"},
    )
    sender_mx = mx_net.server("127.0.0.5")  # takes the bounce of r2
    for i in range(4):
        queue_env.enqueue("a@sender.test", [f"r{i}@remote.test"], message(f"m{i}"))
    queue_env.start('destination_concurrency = 1\nconnection_reuse_time = "10s"')
    await wait_for(lambda: len(sender_mx.messages) == 1 and not queue_env.entries())
    assert sorted(m.recipients[0] for m in mx.messages) == [
        "r0@remote.test",
        "r1@remote.test",
        "r3@remote.test",
    ]
    assert {m.connection for m in mx.messages} == {1}
    events = mx.events  # "held": a line that arrived while a final reply was pending
    assert events.count("MAIL") == 4 and "held" in events, events


@pytest_twisted.ensureDeferred
async def test_never_connects_to_itself(queue_env: Any, mx_net: Any, dns_server: Any) -> None:
    remote_dns(dns_server, **{"mx1.remote.test": {"A": ["127.0.0.4"]}})
    me = mx_net.server("127.0.0.4")
    sender_mx = mx_net.server("127.0.0.5")
    queue_env.enqueue("a@sender.test", ["b@remote.test"], message())
    queue = queue_env.build('own_addresses = ["127.0.0.4"]')
    queue.startService()
    await wait_for(lambda: len(sender_mx.messages) == 1)
    assert me.connections == 0
    assert "5.4.6" in sender_mx.messages[0].data.decode()


@pytest_twisted.ensureDeferred
async def test_restart_resumes_from_disk(queue_env: Any, mx_net: Any, dns_server: Any) -> None:
    remote_dns(dns_server)
    ids = [queue_env.enqueue("a@sender.test", ["b@remote.test"], message()) for _ in range(3)]
    # A state file from an earlier run says the first one was held by the operator.
    store = QueueStore(queue_env.queue_dir)
    item = store.load(ids[0])
    item.hold = True
    store.save(item)
    mx = mx_net.server("127.0.0.2")
    queue = queue_env.build()
    queue.startService()
    await wait_for(lambda: len(mx.messages) == 2)
    await queue.wait_idle()
    assert queue_env.entries() == [ids[0]]
    assert await queue.control("release", ids[0])
    await wait_for(lambda: len(mx.messages) == 3 and not queue_env.entries())


@pytest_twisted.ensureDeferred
async def test_cli_control_request_reaches_the_running_scheduler(
    queue_env: Any, mx_net: Any, dns_server: Any
) -> None:
    remote_dns(dns_server)
    mx = mx_net.server("127.0.0.2", rcpt_replies={"b@remote.test": "451 4.2.0 later"})
    entry_id = queue_env.enqueue("a@sender.test", ["b@remote.test"], message())
    queue = queue_env.build()
    queue.startService()
    store = QueueStore(queue_env.queue_dir)
    await wait_for(lambda: os.path.exists(store.path(entry_id, "state")))
    await queue.wait_idle()
    mx.behaviour.rcpt_replies = {}
    store.post_control("retry", entry_id)  # what `mailserv queue retry ID` does
    await wait_for(lambda: not queue_env.entries())
    assert len(mx.messages) == 1


def test_nothing_here_imports_the_reactor() -> None:
    import sys

    before = "twisted.internet.reactor" in sys.modules
    import mailserv.queue.scheduler  # noqa: F401

    assert ("twisted.internet.reactor" in sys.modules) == before or before


__all__ = ["defer"]


@pytest_twisted.ensureDeferred
async def test_flush_during_an_attempt_applies_to_the_next_one(
    queue_env: Any, mx_net: Any, dns_server: Any
) -> None:
    remote_dns(dns_server)
    mx = mx_net.server("127.0.0.2", rcpt_replies={"b@remote.test": "451 4.2.0 later"})
    entry_id = queue_env.enqueue("a@sender.test", ["b@remote.test"], message())
    queue = queue_env.build()
    deliver = queue.deliverer.deliver
    flushed: list[bool] = []

    async def deliver_and_flush(*args: Any) -> Any:
        # The operator's flush arrives while this attempt is in flight.
        if not flushed:
            assert entry_id in queue.active
            flushed.append(await queue.control("flush"))
        return await deliver(*args)

    queue.deliverer.deliver = deliver_and_flush
    queue.startService()
    store = QueueStore(queue_env.queue_dir)
    await wait_for(lambda: sum(c.startswith("RCPT") for c in mx.commands) >= 2)
    await queue.wait_idle()
    assert store.load(entry_id).attempts >= 2
