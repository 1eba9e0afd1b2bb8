"""Crash test: SIGKILL mailserv while its queue is busy; after a restart every message arrives.

The whole path runs for real: smtplib -> mailserv's MX listener (an alias of a local domain
forwards to remote.test) -> the durable queue -> MX lookup on the test DNS server -> Postfix's
smtp-sink on 127.0.0.2, which writes every transaction it accepts into a file.  Delivery is at
least once: duplicates after the crash are allowed, losses are not.
"""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.queue.conftest import free_port
from tests.support.process import start_mailserv
from tests.support.process import test_config as make_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def start_sink(sink: str, dump: Path, port: int, delay: int = 0) -> subprocess.Popen[bytes]:
    dump.mkdir(exist_ok=True)
    os.chmod(dump, 0o777)
    # As root smtp-sink drops to -u USER; stay root so it can write under pytest's tmp dir.
    user = ["-u", "root"] if os.geteuid() == 0 else []
    args = [sink, *user, "-d", f"{dump}/%H%M%S.", "-c"]
    if delay:
        args += ["-w", str(delay)]
    proc = subprocess.Popen([*args, f"127.0.0.2:{port}", "256"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with smtplib.SMTP("127.0.0.2", port, timeout=2) as probe:
                probe.noop()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("smtp-sink did not start")


def delivered(dump: Path) -> set[str]:
    out = set()
    for path in dump.iterdir():
        for line in path.read_bytes().split(b"\n"):
            if line.startswith(b"Subject: crash-"):
                out.add(line[9:].strip().decode())
    return out


def queued(state: Path) -> list[str]:
    directory = state / "queue"
    return [p.name for p in directory.glob("*.entry")] if directory.exists() else []


def start(mailserv: Any, config: dict[str, Any]) -> Any:
    """Start mailserv with an alias forwarding fwd@example.test to a remote address."""
    path = mailserv.write_config(config)
    with open(path, "a", encoding="utf-8") as f:
        f.write('\n[aliases]\n"fwd@example.test" = "x@remote.test"\n')
    process = start_mailserv(["--config", str(path)], mailserv.tmp_path, 1)
    mailserv.running.append(process)
    return process


def remote_config(state_dir: Path, dns_server: Any, port: int, **queue: Any) -> dict[str, Any]:
    """An MX listener on 127.0.0.1; remote.test's MX is 127.0.0.2:port (the sink)."""
    dns_server.set(
        {
            "remote.test": {"MX": [[10, "mx.remote.test"]]},
            "mx.remote.test": {"A": ["127.0.0.2"]},
        }
    )
    (state_dir / "users.passwd").write_text("")
    return make_config(
        state_dir,
        {"mx": {}},
        dns={"nameservers": [dns_server.address], "timeout": "2s"},
        queue={"smtp_port": port, **queue},
    )


def test_sigkill_while_delivering_loses_nothing(
    mailserv: Any, state_dir: Path, tmp_path: Path, dns_server: Any, require_program: Any
) -> None:
    sink = require_program("smtp-sink")
    port = free_port(["127.0.0.2"])
    config = remote_config(state_dir, dns_server, port, destination_concurrency=4)
    dump = tmp_path / "dump"
    sink_proc = start_sink(sink, dump, port, delay=1)
    try:
        proc = start(mailserv, config)
        acked = []
        with smtplib.SMTP("127.0.0.1", proc.port("mx"), timeout=10) as client:
            for i in range(40):
                subject = f"crash-{i}"
                head = f"Subject: {subject}\r\nFrom: <s@sender.test>\r\n\r\n"
                body = head + ("x" * 70 + "\r\n") * 30
                client.sendmail("s@sender.test", ["fwd@example.test"], body)
                acked.append(subject)
        deadline = time.monotonic() + 20
        while not delivered(dump) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.proc.pid, signal.SIGKILL)
        proc.proc.wait(10)
        before = delivered(dump)
        assert 0 < len(before) < len(acked), "the queue was not busy when it was killed"
        assert queued(state_dir), "nothing left in the queue at the crash"
        sink_proc.terminate()
        sink_proc.wait(10)
        sink_proc = start_sink(sink, dump, port)
        proc2 = start(mailserv, config)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (queued(state_dir) or len(delivered(dump)) < 40):
            time.sleep(0.1)
        proc2.stop()
        missing = sorted(set(acked) - delivered(dump))
        assert missing == []
        assert queued(state_dir) == []
    finally:
        sink_proc.terminate()
        sink_proc.wait(10)


def test_a_queue_written_by_the_version_1_spool_is_delivered_after_the_upgrade(
    mailserv: Any, state_dir: Path, tmp_path: Path, dns_server: Any, require_program: Any
) -> None:
    """Entries as the version-1 spool left them (<id>.msg, <id>.env, a deferred one with its
    <id>.state) are converted and delivered by the server that starts on that queue."""
    import json

    from mailserv.queue import spool

    sink = require_program("smtp-sink")
    port = free_port(["127.0.0.2"])
    config = remote_config(state_dir, dns_server, port)
    queue_dir = state_dir / "queue"
    queue_dir.mkdir()
    for i in range(5):
        entry_id = spool.new_id()
        envelope = {
            "version": 1,
            "id": entry_id,
            "arrival": time.time() - 60,
            "sender": "s@sender.test",
            "envid": None,
            "ret": None,
            "smtputf8": False,
            "body": "7BIT",
            "recipients": [
                {
                    "address": "x@remote.test",
                    "orcpt": None,
                    "notify": None,
                    "status": "pending",
                    "reason": None,
                }
            ],
        }
        body = f"Subject: crash-old-{i}\r\nFrom: <s@sender.test>\r\n\r\nold\r\n"
        (queue_dir / f"{entry_id}.msg").write_bytes(body.encode())
        (queue_dir / f"{entry_id}.env").write_text(json.dumps(envelope))
        if i == 0:  # deferred once, due now
            (queue_dir / f"{entry_id}.state").write_text(
                '{"version": 1, "attempts": 1, "next_attempt": 0.0, "recipients":'
                ' [{"status": "pending", "reason": "451 4.0.0 later", "mta": null}]}'
            )
    dump = tmp_path / "dump"
    sink_proc = start_sink(sink, dump, port)
    try:
        proc = start(mailserv, config)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(delivered(dump)) < 5:
            time.sleep(0.1)
        while time.monotonic() < deadline and list(queue_dir.glob("*.e*")):
            time.sleep(0.1)
        proc.stop()
        assert delivered(dump) == {f"crash-old-{i}" for i in range(5)}
        assert sorted(p.name for p in queue_dir.iterdir() if p.is_file()) == [".lock"]
    finally:
        sink_proc.terminate()
        sink_proc.wait(10)
