"""``twistd mailserv`` as users run it: default config, --check, SIGHUP, SIGTERM, tac, JSON."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.process import REPO, TWISTD, render_toml, start_mailserv, test_config

pytestmark = pytest.mark.integration

DEFAULT_PORTS_USER = {
    "mx": 2525,
    "submission": 2587,
    "submissions": 2465,
    "imap": 2143,
    "imaps": 2993,
    "pop3": 2110,
    "pop3s": 2995,
}


DEFAULT_PORTS_ROOT = {
    "mx": 25,
    "submission": 587,
    "submissions": 465,
    "imap": 143,
    "imaps": 993,
    "pop3": 110,
    "pop3s": 995,
}


def expected_ports() -> dict[str, int]:
    """The embedded default's ports: standard ones as root, 25xx/21xx/29xx otherwise."""
    if os.geteuid() == 0:
        return DEFAULT_PORTS_ROOT
    return DEFAULT_PORTS_USER


def greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(5)
        return sock.recv(1024)


def test_embedded_default_starts_listens_and_stops_on_sigterm(tmp_path: Path) -> None:
    home = tmp_path / "home"
    process = start_mailserv([], tmp_path, expect=7, env={"MAILSERV_HOME": str(home)})
    try:
        ports = {label: addrs[0] for label, addrs in process.addresses.items()}
        expected = expected_ports()
        assert ports == {label: ("127.0.0.1", port) for label, port in expected.items()}
        assert (home / "tls" / "selfsigned.crt").exists()
        assert f"MAILSERV_HOME={home} mailserv user add USER@localhost" in process.log
        assert greeting(expected["mx"]).startswith(b"220 ")
        assert greeting(expected["imap"]).startswith(b"* OK")
        assert greeting(expected["pop3"]).startswith(b"+OK")
        # What the README promises: add a user as the server says, mail them, read it back.
        added = subprocess.run(
            [
                sys.executable,
                "-m",
                "mailserv.cli.main",
                "user",
                "add",
                "--stdin",
                "alice@localhost",
            ],
            input="s3cret-pass\n",
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
            env=dict(os.environ, MAILSERV_HOME=str(home), PYTHONPATH=str(REPO)),
        )
        assert added.returncode == 0, added.stderr
        import poplib
        import smtplib

        with smtplib.SMTP("127.0.0.1", expected["mx"], timeout=10) as smtp:
            smtp.sendmail(
                "someone@example.test", ["alice@localhost"], b"Subject: hi\r\n\r\nhello\r\n"
            )
        pop = poplib.POP3("127.0.0.1", expected["pop3"], timeout=10)
        pop.user("alice@localhost")
        pop.pass_("s3cret-pass")
        assert pop.stat()[0] == 1
        assert b"hello" in b"\n".join(pop.retr(1)[1])
        pop.quit()
    finally:
        started = time.monotonic()
        code = process.stop(signal.SIGTERM, timeout=5)
    assert code == 0
    assert time.monotonic() - started < 5


def test_check_reports_three_mistakes_and_fails(tmp_path: Path) -> None:
    config = test_config(tmp_path / "state", ["mx", "imap"])
    config["listeners"]["imap"]["tls"] = "yes"
    config["shutdown_timeout"] = "later"
    config["store"]["formt"] = "mbox"
    path = tmp_path / "bad.toml"
    path.write_text(render_toml(config))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [
            *TWISTD,
            "mailserv",
            "--config",
            str(path),
            "--check",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("mailserv: ")]
    assert len(lines) == 3, result.stderr
    assert (
        f"mailserv: {path}: listeners.imap.tls: expected one of none, starttls, implicit, got 'yes'"
        in lines
    )
    assert any("shutdown_timeout: expected a duration" in line for line in lines)
    assert any("store.formt: unknown key (did you mean 'format'?)" in line for line in lines)
    good = tmp_path / "good.toml"
    good.write_text(render_toml(test_config(tmp_path / "state", ["mx"])))
    ok = subprocess.run(
        [
            *TWISTD,
            "mailserv",
            "--config",
            str(good),
            "--check",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert ok.returncode == 0 and "OK" in ok.stdout


def test_sighup_reload_keeps_running_config_when_invalid(mailserv: object, tmp_path: Path) -> None:
    config = test_config(tmp_path / "state", ["mx"])
    process = mailserv.start(config)  # type: ignore[attr-defined]
    assert greeting(process.port("mx")).startswith(b"220 ")  # running, handlers installed
    path = tmp_path / "mailserv.toml"
    path.write_text(path.read_text().replace('tls = "starttls"', 'tls = "sometimes"'))
    process.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload refused" not in process.log and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "reload refused, keeping the running configuration" in process.log
    assert "listeners.mx.tls: expected one of" in process.log
    assert greeting(process.port("mx")).startswith(b"220 ")
    config["domains"] = ["example.test", "other.test"]
    path.write_text(render_toml(config))
    process.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "configuration reloaded" not in process.log and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "configuration reloaded" in process.log
    assert greeting(process.port("mx")).startswith(b"220 ")
    assert process.stop() == 0


def test_tac_file_builds_the_same_service(tmp_path: Path) -> None:
    path = tmp_path / "mailserv.toml"
    path.write_text(render_toml(test_config(tmp_path / "state", ["mx", "imap", "pop3"])))
    process = start_mailserv(
        ["-y", str(REPO / "tac" / "mailserv.tac")],
        tmp_path,
        expect=3,
        env={"MAILSERV_CONFIG": str(path)},
        plugin=False,
    )
    try:
        assert greeting(process.port("mx")).startswith(b"220 ")
        assert greeting(process.port("imap")).startswith(b"* OK")
    finally:
        assert process.stop() == 0


def test_json_log_lines(tmp_path: Path) -> None:
    path = tmp_path / "mailserv.toml"
    path.write_text(render_toml(test_config(tmp_path / "state", ["mx"])))
    process = start_mailserv(
        ["--config", str(path)],
        tmp_path,
        expect=1,
        twistd_args=("-n", "--pidfile=", "--logger", "mailserv.logging.json_observer"),
    )
    try:
        assert greeting(process.port("mx")).startswith(b"220 ")
    finally:
        assert process.stop() == 0
    events = [json.loads(line) for line in process.output if line.startswith("{")]
    assert any(e.get("label") == "mx" and e.get("protocol") == "smtp" for e in events)
    assert all(line.startswith("{") for line in process.output if line.strip())


def test_passwords_and_auth_payloads_never_reach_the_log(mailserv: object, tmp_path: Path) -> None:
    import base64
    import smtplib

    config = test_config(tmp_path / "state", ["mx", "submission"])
    path = mailserv.write_config(config)  # type: ignore[attr-defined]
    password = "Corr3ct-Horse-Battery"
    added = subprocess.run(
        [
            sys.executable,
            "-m",
            "mailserv.cli.main",
            "user",
            "--config",
            str(path),
            "add",
            "--stdin",
            "alice@example.test",
        ],
        input=password + "\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    process = mailserv.start(config)  # type: ignore[attr-defined]
    for good in (True, False):
        with smtplib.SMTP("127.0.0.1", process.port("submission"), timeout=10) as client:
            client.ehlo("client.example.test")
            secret = password if good else password + "-wrong"
            try:
                client.login("alice@example.test", secret)
                assert good
            except smtplib.SMTPAuthenticationError:
                assert not good
    assert process.stop() == 0
    payload = base64.b64encode(f"\0alice@example.test\0{password}".encode()).decode()
    assert password not in process.log
    assert payload not in process.log
    assert base64.b64encode(password.encode()).decode() not in process.log


def test_sigterm_lets_a_transaction_in_flight_finish(mailserv: object, tmp_path: Path) -> None:
    """SIGTERM: no new connections, the open transaction completes (250), then 421 and exit 0."""
    config = test_config(tmp_path / "state", ["mx"])
    process = mailserv.start(config)  # type: ignore[attr-defined]
    port = process.port("mx")
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = sock.makefile("rb")
    assert f.readline().startswith(b"220 ")
    sock.sendall(b"EHLO client.example\r\n")
    while not f.readline().startswith(b"250 "):
        pass
    for line in (b"MAIL FROM:<s@remote.test>", b"RCPT TO:<postmaster@example.test>", b"DATA"):
        sock.sendall(line + b"\r\n")
        assert f.readline()[:1] in (b"2", b"3")
    sock.sendall(b"Subject: in flight\r\n\r\nfirst half\r\n")
    process.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while "SIGTERM: stopping" not in process.log and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    sock.sendall(b"second half\r\n.\r\n")
    assert f.readline().startswith(b"250 ")
    assert f.readline().startswith(b"421 ")
    sock.close()
    assert process.proc.wait(10) == 0
    delivered = list((tmp_path / "state").rglob("new/*"))
    assert any(b"second half" in p.read_bytes() for p in delivered)
