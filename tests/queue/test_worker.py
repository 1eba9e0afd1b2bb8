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
from tests.integration.test_metrics import _samples, _scrape
from tests.queue.conftest import free_port
from tests.queue.test_crash import delivered, queued, remote_config, start, start_sink
from tests.support.process import REPO, MailservProcess, start_mailserv
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


def metrics_reaching(port: int, expected: dict[str, float]) -> dict[str, float] | None:
    """The samples of a scrape if they have the ``expected`` values, else None."""
    samples = _samples(_scrape(port)[2])
    return samples if all(samples.get(k) == v for k, v in expected.items()) else None


@pytest.mark.integration
@pytest.mark.slow
def test_metrics_of_the_parent_show_the_workers_queue_and_deliveries(
    mailserv: Any, state_dir: Path, tmp_path: Path, dns_server: Any, require_program: Any
) -> None:
    """/metrics of twistd reports what the worker process does: its delivery outcomes (the
    same counters as inline delivery), its queue gauges and its thread pools."""
    sink = require_program("smtp-sink")
    port = free_port(["127.0.0.2"])
    config = remote_config(state_dir, dns_server, port, delivery="process")
    config["listeners"]["metrics"] = {
        "protocol": "metrics",
        "endpoints": ["tcp:0:interface=127.0.0.1"],
        "tls": "none",
    }
    path = mailserv.write_config(config)
    with open(path, "a", encoding="utf-8") as f:
        f.write('\n[aliases]\n"fwd@example.test" = "x@remote.test"\n')
    proc = start_mailserv(["--config", str(path)], mailserv.tmp_path, 2)
    mailserv.running.append(proc)
    wait_for(lambda: worker_pids(proc), what="the worker's start line")
    metrics = proc.port("metrics")
    send(proc.port("mx"), ["crash-0", "crash-1"])  # no sink yet: both are deferred

    deferred = 'mailserv_queue_delivery_attempts_total{status="deferred"}'
    sent = 'mailserv_queue_delivery_attempts_total{status="sent"}'
    waiting = 'mailserv_queue_messages{state="waiting"}'
    samples = wait_for(
        lambda: metrics_reaching(metrics, {deferred: 2, waiting: 2}),
        what="deferred attempts and waiting messages",
    )
    assert samples['mailserv_queue_messages{state="held"}'] == 0
    assert samples["mailserv_queue_worker_up"] == 1
    assert samples["mailserv_queue_worker_process_resident_memory_bytes"] > 1e6
    # The worker's own pools, beside twistd's ("disk", ...), as it last reported them.
    assert samples['mailserv_thread_pool_size{pool="queue-worker/disk"}'] >= 1
    assert samples['mailserv_thread_pool_busy{pool="queue-worker/crypto"}'] == 0
    assert samples['mailserv_thread_pool_queued{pool="queue-worker/dns"}'] == 0

    dump = tmp_path / "dump"
    sink_proc = start_sink(sink, dump, port)
    try:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        cli = [sys.executable, "-m", "mailserv.cli.main", "queue", "--config"]
        cli += [str(path), "flush"]
        subprocess.run(cli, env=env, capture_output=True, text=True, check=True)
        wait_for(lambda: delivered(dump) == {"crash-0", "crash-1"}, what="delivery after flush")

        samples = wait_for(
            lambda: metrics_reaching(metrics, {sent: 2, waiting: 0}),
            what="sent attempts and an empty queue",
        )
        assert samples[deferred] == 2
        assert samples['mailserv_queue_messages{state="delivering"}'] == 0
        assert proc.stop(signal.SIGTERM) == 0
    finally:
        sink_proc.terminate()
        sink_proc.wait(10)
    # The worker's lines are relayed whole: no empty "[queue] " line (ProcessMonitor's
    # LineLogger added one at every exit), a warning keeps its level.
    lines = proc.log.splitlines()
    assert not [line for line in lines if re.search(r"\[queue[^\]]*\]\s*$", line)], lines
    sent_lines = [line for line in lines if "status=sent" in line]
    assert len(sent_lines) == 2, sent_lines
    assert all("[queue] queue " in line for line in sent_lines), sent_lines


class _Monitor:
    """What WorkerProtocol needs of its WorkerMonitor."""

    def __init__(self) -> None:
        from twisted.logger import Logger

        self.events: list[dict[str, Any]] = []
        self.log = Logger(observer=self.events.append)
        self._gauges: dict[str, int] | None = None
        self.exited: list[str] = []

    def _monitoredProcessExited(self, name: str, reason: Any = None) -> None:
        self.exited.append(name)


def test_worker_events_reach_the_parent_whole_with_fields_levels_and_gauges() -> None:
    import io

    from twisted.logger import Logger, LogLevel, formatEventAsClassicLogText
    from twisted.python.failure import Failure

    from mailserv.metrics import EventCounters
    from mailserv.queue.worker import ParentRelay, WorkerProtocol

    out = io.StringIO()
    relay = ParentRelay(out)
    log = Logger(observer=relay, namespace="mailserv.queue.scheduler")
    log.info(
        "queue {id} to=<{rcpt}> status={status} via={mta}",
        id="X1",
        rcpt="b@remote.test",
        status="sent",
        mta=object(),  # not JSON: its text still arrives
    )
    log.warn("queue: {host} refused", host="mx.remote.test")
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        log.failure("queue attempt {id} failed", id="X2")
    relay.gauges({"held": 1, "delivering": 2, "waiting": 3})
    stray = b"a stray line from a library\n\n{not json\n#gauges [1]\npartial"
    data = out.getvalue().encode() + stray

    monitor = _Monitor()
    protocol = WorkerProtocol(monitor, "queue")  # type: ignore[arg-type]
    for i in range(0, len(data), 7):  # any chunking of the pipe
        protocol.outReceived(data[i : i + 7])
    protocol.errReceived(b"Traceback (most recent call last):\n")
    protocol.processEnded(Failure(Exception("ended")))

    texts = [formatEventAsClassicLogText(e) or "" for e in monitor.events]
    assert [t.split(" ", 1)[1].splitlines()[0] for t in texts] == [
        "[queue] queue X1 to=<b@remote.test> status=sent via=<object object at "
        + texts[0].split("<object object at ")[1].split("\n")[0],
        "[queue#warn] queue: mx.remote.test refused",
        "[queue#critical] queue attempt X2 failed",
        "[queue] a stray line from a library",
        "[queue] {not json",
        "[queue] #gauges [1]",
        "[queue#warn] Traceback (most recent call last):",
        "[queue] partial",
    ]
    assert "ZeroDivisionError: division by zero" in texts[2]
    assert monitor.events[1]["log_level"] == LogLevel.warn
    assert monitor._gauges == {"held": 1, "delivering": 2, "waiting": 3}
    assert monitor.exited == ["queue"]
    counters = EventCounters()
    for event in monitor.events:
        counters(event)
    assert counters.deliveries == {"sent": 1}
