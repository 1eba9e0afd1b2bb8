"""ARC chain verification (RFC 8617) of chains sealed by the test with dkimpy."""

from __future__ import annotations

from typing import Any

import dkim
import pytest_twisted

from mailserv.filters.base import Action
from mailserv.filters.common import results_for
from tests.filters.conftest import crlf, pools_used

MESSAGE = crlf(
    "Authentication-Results: relay.test; dkim=pass header.d=sender.test\n"
    "From: Alice <alice@sender.test>\n"
    "To: list@relay.test\n"
    "Subject: hello\n"
    "Date: Wed, 25 Nov 2026 10:00:00 +0000\n"
    "\n"
    "Hello list.\n"
)


def seal(raw: bytes, keys: Any) -> bytes:
    headers = dkim.arc_sign(raw, b"rsa", b"relay.test", keys.rsa_private, b"relay.test")
    return b"".join(h.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for h in headers) + raw


@pytest_twisted.inlineCallbacks
def run(env: Any, raw: bytes, **options: Any) -> Any:
    flt = env.build("arc", **options)
    session = env.session()
    envelope = env.envelope("list@relay.test", "bob@example.org")
    verdict = yield flt.check_message(session, envelope, env.message(raw))
    return verdict, results_for(session, envelope).arc


@pytest_twisted.inlineCallbacks
def test_valid_chain_passes(filter_env: Any, dns_server: Any, dkim_keys: Any) -> Any:
    dns_server.set(dkim_keys.records("relay.test"))
    verdict, arc = yield run(filter_env, seal(MESSAGE, dkim_keys))
    assert verdict.action is Action.CONTINUE
    assert arc.render() == "arc=pass (1 ARC set: success)"


@pytest_twisted.inlineCallbacks
def test_modified_after_sealing_fails(filter_env: Any, dns_server: Any, dkim_keys: Any) -> Any:
    dns_server.set(dkim_keys.records("relay.test"))
    sealed = seal(MESSAGE, dkim_keys).replace(b"Hello list.", b"Hello evil.")
    verdict, arc = yield run(filter_env, sealed, fail="reject")
    assert arc.result == "fail"
    assert verdict.action is Action.REJECT


@pytest_twisted.inlineCallbacks
def test_no_chain_is_none(filter_env: Any) -> Any:
    _verdict, arc = yield run(filter_env, MESSAGE)
    assert arc.render() == "arc=none"


@pytest_twisted.inlineCallbacks
def test_small_messages_with_cached_keys_are_verified_on_the_reactor(
    filter_env: Any, dns_server: Any, dkim_keys: Any, monkeypatch: Any
) -> Any:
    """In the chain, a sealed message held in memory is verified in the pool while its
    keys are not cached (the lookup blocks), then on the reactor once they are."""
    from twisted.internet import reactor

    from mailserv.filters.chain import FilterChain

    dns_server.set(dkim_keys.records("relay.test"))
    pools = pools_used(filter_env, monkeypatch)
    flt = filter_env.build("arc")
    sealed = seal(MESSAGE, dkim_keys)
    # The first message's keys are looked up in the pool; the second's come from the cache.
    for expected in (["crypto"], ["crypto"]):  # the pools used so far
        session = filter_env.session()
        envelope = filter_env.envelope("list@relay.test", "bob@example.org")
        message = filter_env.message(sealed, memory=True)
        yield FilterChain([flt], reactor).message(session, envelope, message)
        assert results_for(session, envelope).arc.render() == "arc=pass (1 ARC set: success)"
        assert pools == expected
