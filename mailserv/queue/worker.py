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
- Its log lines go to stdout, which the parent relays into its own log as
  ``[queue] ...``.
- While another process holds the lock (an old worker still shutting down,
  an inline server on the same state_dir) it retries every second.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

from twisted.internet import defer
from twisted.logger import ILogObserver, Logger, LogLevel, eventAsText, globalLogBeginner
from twisted.python.failure import Failure
from twisted.runner.procmon import ProcessMonitor
from zope.interface import implementer, provider

from mailserv.interfaces import IReloadable
from mailserv.queue.state import QueueStore

log = Logger()

WORKER = "queue"  # the process name in the monitor (and the prefix of relayed log lines)
LOCK_RETRY = 1.0  # seconds between attempts to take a lock another process holds


def worker_command(config_file: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mailserv.queue.worker",
        "--config",
        os.path.abspath(config_file),
        "--parent-pipe",
    ]


def worker_env() -> dict[str, str]:
    """The parent's environment, with the directory this mailserv is imported from first."""
    import mailserv

    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(mailserv.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


@implementer(IReloadable)
class WorkerMonitor(ProcessMonitor):
    """The parent's side: runs and restarts the delivery process (see the module docstring)."""

    name = "queue"

    def __init__(self, config: Any, reactor: Any) -> None:
        super().__init__(reactor=reactor)
        self.killTime = config.shutdown_timeout
        self._exited: list[defer.Deferred[None]] = []
        self.addProcess(WORKER, worker_command(config.source), env=worker_env(), cwd=os.getcwd())

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


# ----------------------------------------------------------------------
# The child


def build_worker_service(config: Any, reactor: Any) -> Any:
    """A MailService without listeners running only the QueueService (inline delivery)."""
    from mailserv.queue import build_queue_service
    from mailserv.service import MailService

    service = MailService(config, reactor, handle_signals=True)
    service.queue = build_queue_service(service)
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


@provider(ILogObserver)
def stdout_observer(event: dict[str, Any]) -> None:
    """One line per event without timestamp: the parent's log adds its own when relaying."""
    text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    level = event.get("log_level")
    if level is not None and level >= LogLevel.warn:
        text = f"{level.name}: {text}"
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except (OSError, ValueError):
        pass  # the parent is gone (watch_parent stops us)


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
    globalLogBeginner.beginLoggingTo([stdout_observer], redirectStandardIO=False)

    from mailserv.config import load_config
    from mailserv.errors import ConfigError

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"mailserv: {problem}", file=sys.stderr)
        return 1
    from twisted.internet import reactor

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

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
