"""Fixtures shared by the whole suite.

- ``state_dir``: a fresh state directory.
- ``test_ca``: a CA generated for the session and a server certificate it signed for
  mail.example.test, localhost, 127.0.0.1 and ::1 (``.ca_file``, ``.cert_file``, ``.key_file``;
  ``.issue(name, *alt)`` signs more).
- ``dns_server``: a real DNS server on 127.0.0.1 (twisted.names, in a subprocess) serving the
  records a test declares with ``dns_server.set({...})`` (see tests/support/dnsserver.py).
- ``mailserv``: ``mailserv.start(config_dict)`` runs ``twistd -n mailserv --config`` on free ports
  and stops it after the test (see tests/support/process.py).
- ``require_program(name)``: the path of a peer program; skips when it is missing, fails instead
  when MAILSERV_REQUIRE_INTEGRATION=1 (as in CI).

No reactor is imported at module level here (pytest-twisted installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.process import MailservProcess, render_toml, start_mailserv

REQUIRE_INTEGRATION = os.environ.get("MAILSERV_REQUIRE_INTEGRATION") == "1"


def require_program(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None
    )
    if path is None:
        message = f"{name} is not installed (Debian package needed; see scripts/run-tests)"
        if REQUIRE_INTEGRATION:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(name="require_program")
def _require_program() -> Any:
    return require_program


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@dataclass
class TestCA:
    directory: Path
    ca_file: str
    cert_file: str
    key_file: str
    _ca_cert: Any
    _ca_key: Any

    __test__ = False  # not a test class

    def issue(self, name: str, *alt: str) -> tuple[str, str]:
        """Sign a server certificate for ``name`` (and ``alt`` names); return (cert, key) paths."""
        from mailserv.tls import generate_certificate, write_pem

        cert, key = generate_certificate(
            name, alt, issuer_cert=self._ca_cert, issuer_key=self._ca_key
        )
        cert_file = str(self.directory / f"{name}.crt")
        key_file = str(self.directory / f"{name}.key")
        write_pem(cert, key, cert_file, key_file)
        return cert_file, key_file


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    from cryptography.hazmat.primitives import serialization

    from mailserv.tls import generate_certificate

    directory = tmp_path_factory.mktemp("ca")
    ca_cert, ca_key = generate_certificate("mailserv test CA", is_ca=True)
    ca_file = directory / "ca.crt"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    ca = TestCA(directory, str(ca_file), "", "", ca_cert, ca_key)
    ca.cert_file, ca.key_file = ca.issue("mail.example.test", "localhost", "127.0.0.1", "::1")
    return ca


class DNSServer:
    """Handle on the test DNS server subprocess."""

    def __init__(self, directory: Path) -> None:
        self.zones = directory / "zones.json"
        self.records: dict[str, Any] = {}
        self.set({})
        portfile = directory / "port"
        script = Path(__file__).parent / "support" / "dnsserver.py"
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(self.zones), str(portfile)], env=env
        )
        deadline = time.monotonic() + 60
        while not portfile.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("the test DNS server did not start")
            time.sleep(0.05)
        self.port = int(portfile.read_text())
        self.address = f"127.0.0.1:{self.port}"

    def set(self, records: dict[str, Any]) -> None:
        """Replace the served records (the server re-reads the file on its next query)."""
        self.records = records
        tmp = self.zones.with_suffix(".tmp")
        tmp.write_text(json.dumps(records))
        os.replace(tmp, self.zones)

    def add(self, name: str, rtype: str, *values: Any) -> None:
        self.records.setdefault(name, {}).setdefault(rtype, []).extend(values)
        self.set(self.records)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def dns_server(tmp_path: Path) -> Iterator[DNSServer]:
    server = DNSServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()


class MailservRunner:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.running: list[MailservProcess] = []

    def write_config(self, config: dict[str, Any], name: str = "mailserv.toml") -> Path:
        path = self.tmp_path / name
        path.write_text(render_toml(config))
        return path

    def start(
        self, config: dict[str, Any], expect: int | None = None, **kw: Any
    ) -> MailservProcess:
        path = self.write_config(config)
        if expect is None:
            expect = sum(len(v["endpoints"]) for v in config.get("listeners", {}).values())
        process = start_mailserv(["--config", str(path)], self.tmp_path, expect, **kw)
        self.running.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.running:
            if process.proc.poll() is None:
                process.stop()


@pytest.fixture
def mailserv(tmp_path: Path) -> Iterator[MailservRunner]:
    runner = MailservRunner(tmp_path)
    try:
        yield runner
    finally:
        runner.stop_all()
