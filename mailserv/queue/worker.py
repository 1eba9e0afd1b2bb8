"""Delivery in its own process: ``[queue] delivery = "process"``.

The process with the listeners (``twistd mailserv``) does not run the
scheduler; it runs ``WorkerMonitor``, a ProcessMonitor of one child::

    python -m mailserv.queue.worker --config FILE --parent-pipe

The child loads the same configuration file, builds a MailService without
listeners and only the QueueService, and delivers ``<state_dir>/queue``: it
takes ``queue/.lock`` (only the lock holder delivers), finds the entries the
parent enqueues by inotify (rename events) and its periodic rescan, and the
``mailserv queue`` control requests the same way.  Local recipients (aliases,
bounces to local senders) go through the child's own router.

- It is restarted when it dies (ProcessMonitor: after 1 s, doubling while it
  dies within a second of starting).
- SIGHUP of the parent (reload) is forwarded: the child reloads the file too.
- Stopping the parent sends SIGTERM to the child and waits for it to exit,
  SIGKILL after ``shutdown_timeout``; a child whose parent died (its stdin
  pipe from the parent reads EOF) stops by itself, releasing the lock.
- Its log events go to stdout as JSON lines (``twisted.logger.eventAsJSON``);
  the parent re-emits each one into its own log (system ``queue``: lines read
  ``[queue] ...``) with its fields, so the parent's observers see the worker's
  events as if they were its own: the metrics listener counts the delivery
  outcomes from them as it does inline.  Every second (when they changed) the
  worker also reports its queue gauges on that pipe (a ``#gauges {...}``
  line), which the parent's metrics listener exports.
- While another process holds the lock (an old worker still shutting down,
  an inline server on the same state_dir) it retries every second.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import IO, Any

from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    eventAsJSON,
    eventAsText,
    eventFromJSON,
    globalLogBeginner,
)
from twisted.python.failure import Failure
from twisted.runner.procmon import ProcessMonitor
from zope.interface import implementer

from mailserv.helpers import child_env
from mailserv.interfaces import IReloadable
from mailserv.queue.state import QueueStore

log = Logger()

WORKER = "queue"  # the process name in the monitor (and the prefix of relayed log lines)
LOCK_RETRY = 1.0  # seconds between attempts to take a lock another process holds
GAUGE_INTERVAL = 1.0  # seconds between reports of the queue gauges (when they changed)
GAUGES = b"#gauges "  # the prefix of a gauge report line on the worker's stdout
POOL = "pool."  # the prefix of a thread pool's figures in a gauge report
MAX_LINE = 1 << 20  # a longer line from the worker is cut (bounded memory in the parent)


def worker_command(config_file: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mailserv.queue.worker",
        "--config",
        os.path.abspath(config_file),
        "--parent-pipe",
    ]


@implementer(IReloadable)
class WorkerMonitor(ProcessMonitor):
    """The parent's side: runs and restarts the delivery process (see the module docstring)."""

    name = "queue"

    def __init__(self, config: Any, reactor: Any) -> None:
        super().__init__(reactor=reactor)
        self.killTime = config.shutdown_timeout
        self._exited: list[defer.Deferred[None]] = []
        self._gauges: dict[str, int] | None = None
        self.addProcess(WORKER, worker_command(config.source), env=child_env(), cwd=os.getcwd())

    def gauges(self) -> dict[str, int] | None:
        """The queue gauges the running worker last reported (None: none known)."""
        return self._gauges

    def startProcess(self, name: str) -> None:
        """ProcessMonitor.startProcess with our protocol (JSON events, gauges) for the child."""
        if name in self.protocols:
            return
        process = self._processes[name]
        proto = WorkerProtocol(self, name)
        self.protocols[name] = proto  # type: ignore[assignment]
        self.timeStarted[name] = self._clock.seconds()
        try:
            self._reactor.spawnProcess(
                proto,
                process.args[0],
                process.args,
                uid=process.uid,
                gid=process.gid,
                env=process.env,
                path=process.cwd,
            )
        except OSError:
            self._monitoredProcessExited(name, Failure())

    @property
    def pid(self) -> int | None:
        """The worker's pid while it runs."""
        protocol = self.protocols.get(WORKER)
        transport = getattr(protocol, "transport", None)
        return getattr(transport, "pid", None)

    def reload(self, config: Any) -> None:
        """The parent reloaded (SIGHUP): the worker re-reads the file too."""
        protocol = self.protocols.get(WORKER)
        if protocol is not None and protocol.transport is not None:
            try:
                protocol.transport.signalProcess("HUP")
            except Exception as exc:  # exited meanwhile; it rereads the file when restarted
                log.info("queue worker not signalled: {error}", error=exc)

    def stopService(self) -> defer.Deferred[None]:  # type: ignore[override]
        """SIGTERM the worker; fires when it has exited (SIGKILL after killTime)."""
        super().stopService()
        if not self.protocols:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._exited.append(d)
        return d

    def _monitoredProcessExited(self, name: str, reason: Failure | None = None) -> None:
        self._gauges = None  # until the next worker reports
        if self.running and reason is not None:
            log.warn(
                "queue worker exited ({reason}); restarting it",
                reason=reason.getErrorMessage(),
            )
        super()._monitoredProcessExited(name, reason)
        if not self.protocols:
            waiting, self._exited = self._exited, []
            for d in waiting:
                d.callback(None)


class WorkerProtocol(ProcessProtocol):
    """The parent's end of the worker's pipes.

    stdout: JSON log events, re-emitted into this process's log (system
    ``queue``) with their fields, and ``#gauges`` reports; any other line (a
    library printing) is logged as text.  stderr (a crash's traceback) is logged
    as warnings, line by line.
    """

    def __init__(self, monitor: WorkerMonitor, name: str) -> None:
        self.monitor = monitor
        self.name = name
        self._out = b""
        self._err = b""

    def outReceived(self, data: bytes) -> None:
        self._out = self._split(self._out + data, self._stdout_line)

    def errReceived(self, data: bytes) -> None:
        self._err = self._split(self._err + data, self._stderr_line)

    def processEnded(self, reason: Failure) -> None:
        if self._out:
            self._stdout_line(self._out)
        if self._err:
            self._stderr_line(self._err)
        self._out = self._err = b""
        self.monitor._monitoredProcessExited(self.name, reason)

    @staticmethod
    def _split(data: bytes, line_received: Any) -> bytes:
        *lines, rest = data.split(b"\n")
        for line in lines:
            if line:
                line_received(line)
        if len(rest) > MAX_LINE:
            line_received(rest)
            rest = b""
        return rest

    def _stdout_line(self, line: bytes) -> None:
        if line.startswith(b"{"):
            try:
                event = eventFromJSON(line.decode("utf-8"))
            except Exception:  # not an event after all: logged as text below
                event = None
            else:
                if isinstance(event, dict) and isinstance(event.get("log_format"), str):
                    self._relay(event)
                    return
        elif line.startswith(GAUGES):
            try:
                raw = json.loads(line[len(GAUGES) :])
                gauges = {str(k): int(v) for k, v in raw.items()}
            except (ValueError, TypeError, AttributeError):
                gauges = None
            if gauges is not None:
                self.monitor._gauges = gauges
                return
        self._text(LogLevel.info, line)

    def _stderr_line(self, line: bytes) -> None:
        self._text(LogLevel.warn, line)

    def _text(self, level: LogLevel, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        if text.strip():
            self.monitor.log.emit(level, "{line}", line=text, log_system=self._system(level))

    def _system(self, level: LogLevel) -> str:
        """``queue``, or ``queue#warn`` etc.: the text log shows warnings as such."""
        return self.name if level < LogLevel.warn else f"{self.name}#{level.name}"

    def _relay(self, event: dict[str, Any]) -> None:
        """Re-emit one of the worker's events here (its time, level, format and fields)."""
        level = event.get("log_level")
        if not isinstance(level, type(LogLevel.info)):
            level = event["log_level"] = LogLevel.info
        for key in ("log_logger", "log_source", "log_trace"):
            event.pop(key, None)  # the worker's objects: not here
        event["log_system"] = self._system(level)
        self.monitor.log.observer(event)


# ----------------------------------------------------------------------
# The child


def build_worker_service(config: Any, reactor: Any) -> Any:
    """A MailService without listeners running only the QueueService (inline delivery)."""
    from mailserv.queue import build_queue_service
    from mailserv.service import MailService

    service = MailService(config, reactor, handle_signals=True)
    service.queue = build_queue_service(service)
    service.queue.disk_in_reactor = True  # nothing else runs on this reactor
    service.queue.setServiceParent(service)
    return service


def keep_trying_lock(service: Any, reactor: Any) -> None:
    """While another process holds queue/.lock, restart the QueueService every LOCK_RETRY s."""
    queue = service.queue

    def check() -> None:
        if not service.running or queue.delivering:
            return
        probe = QueueStore(queue.store.directory)
        if not probe.try_lock():
            reactor.callLater(LOCK_RETRY, check)
            return
        probe.unlock()
        queue.stopService()
        queue.startService()
        if queue.delivering:
            log.info("queue worker took the queue lock; delivering")
        else:
            reactor.callLater(LOCK_RETRY, check)

    reactor.callLater(LOCK_RETRY, check)


def watch_parent(reactor: Any) -> None:
    """Stop when stdin (a pipe from the parent) reads EOF: the parent is gone."""

    def wait() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        reactor.callFromThread(stop)

    def stop() -> None:
        if reactor.running:
            log.warn("the parent process is gone; the queue worker stops")
            reactor.stop()

    threading.Thread(target=wait, name="parent-watch", daemon=True).start()


@implementer(ILogObserver)
class ParentRelay:
    """The worker's log observer: each event as one JSON line on stdout, for the parent.

    ``eventAsJSON`` keeps the format and the fields (the parent renders and counts
    them as its own events); an event with a failure goes as its text with the
    traceback.  Lines emitted during one reactor turn leave in one write (one
    wake-up of the parent for many deliveries); before and after the reactor
    runs, each at once.
    """

    def __init__(self, out: IO[str] | None = None) -> None:
        self.out = out if out is not None else sys.stdout
        self.reactor: Any = None
        self._lines: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            if "log_failure" in event:
                event = {
                    "log_level": event.get("log_level", LogLevel.error),
                    "log_namespace": event.get("log_namespace"),
                    "log_time": event.get("log_time"),
                    "log_format": "{log_text}",
                    "log_text": eventAsText(event, includeTimestamp=False, includeSystem=False),
                }
            line = eventAsJSON(event)
        except Exception:
            line = json.dumps({"log_format": "{log_text}", "log_text": eventAsText(event)})
        self.send(line)

    def send(self, line: str) -> None:
        reactor = self.reactor
        with self._lock:
            self._lines.append(line)
            first = len(self._lines) == 1
        if reactor is None or not reactor.running:
            self.flush()
        elif first:
            reactor.callFromThread(self.flush)

    def gauges(self, values: dict[str, int]) -> None:
        self.send(GAUGES.decode() + json.dumps(values, sort_keys=True))

    def flush(self) -> None:
        with self._lock:
            lines, self._lines = self._lines, []
        if not lines:
            return
        try:
            self.out.write("\n".join(lines) + "\n")
            self.out.flush()
        except (OSError, ValueError):
            pass  # the parent is gone (watch_parent stops us)


def report_gauges(service: Any, relay: ParentRelay, reactor: Any) -> Any:
    """Every GAUGE_INTERVAL, the queue's gauges and the worker's thread pools (``pool.NAME.size``,
    ``.busy``, ``.queued``) to the parent when they changed."""
    from twisted.internet.task import LoopingCall

    last: list[dict[str, int] | None] = [None]

    def report() -> None:
        values = dict(service.queue.gauges())
        for name, pool in service.threads.pools().items():
            values[f"{POOL}{name}.size"] = pool.max
            values[f"{POOL}{name}.busy"] = len(pool.working)
            values[f"{POOL}{name}.queued"] = pool.q.qsize()
        if values != last[0]:
            last[0] = values
            relay.gauges(values)

    loop = LoopingCall(report)
    loop.clock = reactor
    loop.start(GAUGE_INTERVAL)
    return loop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mailserv.queue.worker",
        description="Deliver mailserv's outbound queue (run by twistd mailserv when "
        '[queue] delivery = "process").',
    )
    parser.add_argument("--config", required=True, help="the configuration file (TOML)")
    parser.add_argument(
        "--parent-pipe", action="store_true", help="stop when stdin reads EOF (parent gone)"
    )
    args = parser.parse_args(argv)
    relay = ParentRelay()
    globalLogBeginner.beginLoggingTo([relay], redirectStandardIO=False)

    from mailserv.config import load_config
    from mailserv.errors import ConfigError

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"mailserv: {problem}", file=sys.stderr)
        return 1
    from twisted.internet import reactor

    relay.reactor = reactor
    service = build_worker_service(config, reactor)
    if args.parent_pipe:
        watch_parent(reactor)

    def start() -> None:
        # The parent's process group gets terminal signals too; the parent decides when we stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        service.startService()
        log.info(
            "queue worker pid={pid} delivering {dir}",
            pid=os.getpid(),
            dir=service.queue.store.directory,
        )
        keep_trying_lock(service, reactor)
        report_gauges(service, relay, reactor)

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()  # type: ignore[attr-defined]
    relay.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
