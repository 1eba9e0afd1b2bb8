"""The queue's client against mailserv's own MX listener (twistd): CHUNKING/BDAT, a real peer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from mailserv.auth import schemes
from tests.queue.conftest import message
from tests.queue.test_delivery import wait_for
from tests.support.process import test_config as make_config

pytestmark = pytest.mark.integration


@pytest_twisted.ensureDeferred
async def test_delivery_to_mailserv_mx_with_bdat(
    queue_env: Any, dns_server: Any, mailserv: Any, tmp_path: Path
) -> None:
    peer_state = tmp_path / "peer"
    peer_state.mkdir()
    secret = schemes.hash_password("pw", "PLAIN")
    (peer_state / "users.passwd").write_text(f"alice@example.test:{secret}::::::\n")
    peer = mailserv.start(make_config(peer_state, {"mx": {}}))
    import smtplib

    with smtplib.SMTP("127.0.0.1", peer.port("mx"), timeout=10) as probe:
        probe.ehlo("probe.test")
        # So the client below takes its BDAT path (RFC 3030 with RFC 2920).
        assert probe.has_extn("chunking") and probe.has_extn("pipelining")
    dns_server.set(
        {
            "example.test": {"MX": [[10, "mx.example.test"]]},
            "mx.example.test": {"A": ["127.0.0.1"]},
        }
    )
    queue_env.mx_port = peer.port("mx")
    body = b"First.\r\n.\r\n..two\r\n.leading\r\n" + (b"x" * 70 + b"\r\n") * 5000
    data = message(body=body)
    queue_env.enqueue("a@sender.test", ["alice@example.test"], data)
    queue = queue_env.build()
    queue.startService()
    new = peer_state / "mail" / "example.test" / "alice" / "Maildir" / "new"
    await wait_for(lambda: new.is_dir() and any(new.iterdir()), timeout=30)
    stored = next(new.iterdir()).read_bytes()
    assert stored.endswith(data)  # every "." line intact, after Return-Path/Received
