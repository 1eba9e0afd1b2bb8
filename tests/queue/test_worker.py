"""``[queue] delivery = "process"``: a child process (mailserv.queue.worker) delivers the queue.

Real processes and sockets: ``twistd -n mailserv`` with an MX listener on 127.0.0.1, an alias
of a local domain forwarding to remote.test, whose MX (test DNS server) is Postfix's smtp-sink
on 127.0.0.2 writing every transaction it accepts into a file.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mailserv.config import from_dict
from mailserv.queue.scheduler import QueueService
from mailserv.service import MailService
from tests.queue.conftest import free_port
from tests.queue.test_crash import delivered, queued, remote_config, start, start_sink
from tests.support.process import REPO, MailservProcess
from tests.support.process import test_config as make_config

WORKER_PID = re.compile(r"\[queue\] queue worker pid=(\d+) delivering")


def wait_for(predicate: Callable[[], Any], timeout: float = 20, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def worker_pids(proc: MailservProcess) -> list[int]:
    return [int(m) for m in WORKER_PID.findall(proc.log)]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return not any(line.startswith("State:\tZ") for line in f)
    except FileNotFoundError:
        return False


def holds_lock(pid: int, state_dir: Path) -> bool:
    """Does process ``pid`` have <state_dir>/queue/.lock open (only the holder opens it)?"""
    lock = str(state_dir / "queue" / ".lock")
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(os.path.join(fd_dir, fd)) == lock:
                return True
        except OSError:
            continue
    return False


def send(port: int, subjects: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        for subject in subjects:
            body = f"Subject: {subject}\r\nFrom: <s@sender.test>\r\n\r\n" + "x" * 70 + "\r\n"
            client.sendmail("s@sender.test", ["fwd@example.test"], body)


def delivered_by(
    proc: MailservProcess, worker: int, dump: Path, state_dir: Path, subjects: list[str]
) -> None:
    """All reached the sink, the queue is empty, the worker (not the parent) has the lock."""
    wait_for(lambda: delivered(dump) == set(subjects), what="delivery to the sink")
    wait_for(lambda: not queued(state_dir), what="an empty queue")
    assert holds_lock(worker, state_dir)
    assert not holds_lock(proc.proc.pid, state_dir)


def stop_both(proc: MailservProcess, worker: int) -> None:
    """SIGTERM of the parent stops the worker too."""
    assert proc.stop(signal.SIGTERM) == 0
    wait_for(lambda: not alive(worker), timeout=10, what="the worker to exit")


def running(relay: Any, sink: bool = True) -> tuple[MailservProcess, int, Path]:
    """Start (the sink and) the server; (server, worker pid, sink dump directory)."""
    start_server, run_sink, dump = relay
    if sink:
        run_sink()
    proc = start_server()
    (worker,) = wait_for(lambda: worker_pids(proc), what="the worker's start line")
    return proc, worker, dump


@pytest.fixture
def relay(
    mailserv: Any, state_dir: Path, tmp_path: Path, dns_server: Any, require_program: Any
) -> Any:
    """(start_server, start_sink, dump): a process-delivery mailserv and its remote MX."""
    sink = require_program("smtp-sink")
    port = free_port(["127.0.0.2"])
    config = remote_config(state_dir, dns_server, port, delivery="process")
    dump = tmp_path / "dump"
    sinks: list[subprocess.Popen[bytes]] = []

    def run_sink() -> subprocess.Popen[bytes]:
        proc = start_sink(sink, dump, port)
        sinks.append(proc)
        return proc

    try:
        yield (lambda: start(mailserv, config)), run_sink, dump
    finally:
        for proc in sinks:
            proc.terminate()
            proc.wait(10)


@pytest.mark.integration
@pytest.mark.slow
def test_worker_delivers_and_parent_never_holds_lock(relay: Any, state_dir: Path) -> None:
    proc, worker, dump = running(relay)
    assert worker != proc.proc.pid
    subjects = [f"crash-{i}" for i in range(10)]
    send(proc.port("mx"), subjects)
    delivered_by(proc, worker, dump, state_dir, subjects)
    sent = [line for line in proc.log.splitlines() if "status=sent" in line]
    assert len(sent) == 10
    assert all("[queue] queue " in line for line in sent), sent
    stop_both(proc, worker)


@pytest.mark.integration
@pytest.mark.slow
def test_worker_killed_is_restarted_and_delivers(relay: Any, state_dir: Path) -> None:
    proc, first, dump = running(relay)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: not alive(first), what="the worker to die")
    # Accepted while no worker runs: queued, delivered by the restarted one.
    send(proc.port("mx"), ["crash-0", "crash-1"])
    pids = wait_for(lambda: worker_pids(proc)[1:], what="a restarted worker")
    assert pids[0] != first
    delivered_by(proc, pids[0], dump, state_dir, ["crash-0", "crash-1"])
    assert "queue worker exited" in proc.log
    stop_both(proc, pids[0])


@pytest.mark.integration
@pytest.mark.slow
def test_queue_flush_and_reload_reach_the_worker(
    relay: Any, state_dir: Path, tmp_path: Path
) -> None:
    proc, _, dump = running(relay, sink=False)  # the first attempt defers (retry in 5 min)
    run_sink = relay[1]
    send(proc.port("mx"), ["crash-0"])
    wait_for(lambda: list((state_dir / "queue").glob("*.state")), what="a deferred entry")
    run_sink()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    config = str(tmp_path / "mailserv.toml")
    cli = [sys.executable, "-m", "mailserv.cli.main", "queue", "--config", config, "flush"]
    out = subprocess.run(cli, env=env, capture_output=True, text=True, check=True)
    assert "sent to the running server" in out.stdout
    wait_for(lambda: delivered(dump) == {"crash-0"}, what="delivery after flush")
    wait_for(lambda: not queued(state_dir), what="an empty queue")
    # SIGHUP of the parent: both processes reload the file.
    os.kill(proc.proc.pid, signal.SIGHUP)
    wait_for(lambda: "[queue] configuration reloaded from" in proc.log, what="worker reload")
    assert proc.stop(signal.SIGTERM) == 0


def test_process_delivery_without_a_file_delivers_inline(state_dir: Path) -> None:
    from twisted.internet import reactor

    raw = make_config(state_dir, {}, queue={"delivery": "process"})
    config = from_dict(raw, "<embedded>")
    service = MailService.from_config(config, reactor)
    assert isinstance(service.queue, QueueService)


def test_delivery_mode_is_validated(state_dir: Path) -> None:
    from mailserv.errors import ConfigError

    with pytest.raises(ConfigError, match="delivery"):
        from_dict(make_config(state_dir, {}, queue={"delivery": "thread"}))


@pytest.mark.integration
@pytest.mark.slow
def test_worker_waits_for_a_lock_held_elsewhere(relay: Any, state_dir: Path) -> None:
    from mailserv.queue.state import QueueStore

    other = QueueStore(str(state_dir / "queue"))  # another process delivering this queue
    assert other.try_lock()
    try:
        proc, worker, dump = running(relay)
        send(proc.port("mx"), ["crash-0"])
        time.sleep(1.5)
        assert delivered(dump) == set()
        assert not holds_lock(worker, state_dir)
    finally:
        other.unlock()
    wait_for(lambda: "[queue] queue worker took the queue lock" in proc.log, what="lock taken")
    delivered_by(proc, worker, dump, state_dir, ["crash-0"])
    stop_both(proc, worker)
