"""Start ``twistd -n mailserv`` as a subprocess with a test configuration, and stop it.

The configuration binds ``tcp:0:interface=127.0.0.1`` endpoints; the ports actually bound are
read from the server's ``listening ...`` log lines, so tests never race for fixed ports.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(
    r"listening (?P<label>\S+) protocol=(?P<protocol>\S+) address=(?P<address>\S+) tls=(?P<tls>\S+)"
)

# twistd of the interpreter running the tests (the virtualenv's console script).
TWISTD = [
    sys.executable,
    "-c",
    "import sys; from twisted.scripts.twistd import run; sys.exit(run())",
]

LISTENER_DEFAULTS = {
    "mx": ("smtp", "starttls"),
    "submission": ("submission", "starttls"),
    "submissions": ("submission", "implicit"),
    "imap": ("imap", "starttls"),
    "imaps": ("imap", "implicit"),
    "pop3": ("pop3", "starttls"),
    "pop3s": ("pop3", "implicit"),
}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def toml_key(key: str) -> str:
    """A bare key, or a quoted one (``"fwd@example.test"``)."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def render_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A minimal TOML writer for test configurations (tables and scalars, arrays of scalars)."""
    lines = []
    tables = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.append((key, value))
        else:
            lines.append(f"{toml_key(key)} = {toml_value(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in tables:
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, list):
            for item in value:
                out += f"\n[[{name}]]\n" + render_toml(item, name)
        else:
            body = render_toml(value, name)
            out += f"\n[{name}]\n" + body
    return out


def test_config(
    state_dir: Path,
    listeners: list[str] | dict[str, dict[str, Any]] = ("mx",),
    domains: tuple[str, ...] = ("example.test",),
    tls: tuple[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A config dict for ``state_dir`` with the named listeners on free loopback ports."""
    if not isinstance(listeners, dict):
        listeners = {name: {} for name in listeners}
    table: dict[str, Any] = {}
    for name, options in listeners.items():
        protocol, mode = LISTENER_DEFAULTS.get(name, ("smtp", "none"))
        table[name] = {
            "protocol": protocol,
            "endpoints": ["tcp:0:interface=127.0.0.1"],
            "tls": mode,
            **options,
        }
    config: dict[str, Any] = {
        "config_version": 1,
        "hostname": "mail.example.test",
        "domains": list(domains),
        "state_dir": str(state_dir),
        "shutdown_timeout": "5s",
        "listeners": table,
        "auth": {
            "backends": ["local"],
            "backend": {"local": {"type": "passwd-file", "path": str(state_dir / "users.passwd")}},
        },
        "store": {
            "format": "maildir",
            "path": str(state_dir / "mail/{domain}/{localpart}/Maildir"),
        },
    }
    if tls:
        config["tls"] = {"cert_file": tls[0], "key_file": tls[1]}
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


@dataclass
class MailservProcess:
    """A running ``twistd -n mailserv``; ``addresses[label]`` lists (host, port) it bound."""

    proc: subprocess.Popen[str]
    addresses: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    output: list[str] = field(default_factory=list)

    def port(self, label: str) -> int:
        return self.addresses[label][0][1]

    @property
    def log(self) -> str:
        return "".join(self.output)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"mailserv did not exit within {timeout}s of {sig}") from None


def start_mailserv(
    args: list[str],
    cwd: Path,
    expect: int,
    env: dict[str, str] | None = None,
    timeout: float = 30,
    twistd_args: tuple[str, ...] = ("-n", "--pidfile="),
    plugin: bool = True,
    preexec: list[str] | None = None,
) -> MailservProcess:
    """Start ``twistd -n mailserv ARGS`` and wait until ``expect`` endpoints are listening.

    ``plugin=False`` runs ``twistd TWISTD_ARGS ARGS`` (for ``-y file.tac``); ``preexec`` is a
    command prefix such as ``setpriv --reuid ...`` to run the server as another user.
    """
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [full_env.get("PYTHONPATH")])]
    )
    full_env.update(env or {})
    twistd = TWISTD
    cmd = [*(preexec or []), *twistd, *twistd_args, *(["mailserv"] if plugin else []), *args]
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    running = MailservProcess(proc)
    ready = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            running.output.append(line)
            label = address = None
            if line.startswith("{"):
                event = json.loads(line)
                if "where" in event:
                    label, address = event.get("label"), event["where"]
            else:
                match = _LISTENING.search(line)
                if match:
                    label, address = match.group("label"), match.group("address")
            if label and address:
                host, _, port = address.rpartition(":")
                running.addresses.setdefault(label, []).append((host.strip("[]"), int(port)))
                if sum(len(v) for v in running.addresses.values()) >= expect:
                    ready.set()
        ready.set()

    threading.Thread(target=reader, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            running.stop(signal.SIGKILL)
            raise AssertionError("mailserv did not start in time:\n" + running.log)
    if proc.poll() is not None or sum(len(v) for v in running.addresses.values()) < expect:
        time.sleep(0.2)
        if running.proc.poll() is None:
            running.stop(signal.SIGKILL)
        raise AssertionError("mailserv failed to start:\n" + running.log)
    return running
