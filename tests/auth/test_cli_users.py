"""``mailserv passwd`` and ``mailserv user add|del|list|passwd`` on passwd-file and SQL backends."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin

from mailserv.auth import build_portal, schemes
from mailserv.auth.passwdfile import PasswdFile
from mailserv.cli.main import main
from mailserv.interfaces import IMailUser
from tests.auth.conftest import FakeService, make_config

ROOT = Path(__file__).resolve().parents[2]


def run(monkeypatch: pytest.MonkeyPatch, capsys: Any, argv: list[str], stdin: str = "") -> Any:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def write_config(tmp_path: Path, backend: dict[str, Any]) -> str:
    lines = [
        "config_version = 1",
        'hostname = "mail.example.org"',
        'domains = ["example.org"]',
        f'state_dir = "{tmp_path / "state"}"',
        "[auth]",
        'backends = ["main"]',
        "[auth.backend.main]",
        *(f"{k} = {v!r}".replace("'", '"') for k, v in backend.items()),
        "[store]",
        f'path = "{tmp_path}/mail/{{domain}}/{{localpart}}"',
    ]
    path = tmp_path / "mailserv.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_passwd_prints_a_hash(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    code, out, _ = run(monkeypatch, capsys, ["passwd", "--stdin"], "s3cret\n")
    assert code == 0 and out.startswith("{ARGON2ID}$argon2id$")
    assert schemes.verify(out.strip(), "s3cret")
    code, out, _ = run(
        monkeypatch, capsys, ["passwd", "--stdin", "--scheme", "sha512-crypt"], "x\n"
    )
    assert out.startswith("{SHA512-CRYPT}$6$") and schemes.verify(out.strip(), "x")


def test_passwd_refuses_empty_and_unknown_scheme(
    monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    code, _, err = run(monkeypatch, capsys, ["passwd", "--stdin"], "\n")
    assert code == 1 and "empty passwords are refused" in err
    with pytest.raises(SystemExit):
        run(monkeypatch, capsys, ["passwd", "--stdin", "--scheme", "ROT13"], "x\n")


def test_console_script_passwd() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mailserv.cli.main", "passwd", "--stdin", "--scheme", "SSHA256"],
        input=b"pw\n",
        capture_output=True,
        cwd=ROOT,
        check=True,
    )
    assert schemes.verify(done.stdout.decode().strip(), "pw")


@pytest_twisted.inlineCallbacks
def test_user_commands_on_a_passwd_file(
    monkeypatch: pytest.MonkeyPatch, capsys: Any, tmp_path: Path, make_service: Any
) -> Any:
    users = tmp_path / "users.passwd"
    config = write_config(tmp_path, {"type": "passwd-file", "path": str(users)})
    base = ["user", "--config", config]
    add = [*base, "add", "Alice@example.org", "--stdin", "--scheme", "SHA256-CRYPT"]
    code, out, _ = run(
        monkeypatch, capsys, [*add, "--alias", "ali@example.org", "--quota", "1G"], "pw1\n"
    )
    assert (code, out) == (0, "added alice@example.org to main\n")
    code, _, err = run(monkeypatch, capsys, add, "pw1\n")
    assert code == 1 and "already exists" in err
    run(monkeypatch, capsys, [*base, "add", "bob", "--stdin"], "pw2\n")
    code, out, _ = run(monkeypatch, capsys, [*base, "list"])
    assert out == "alice@example.org\nbob\n"
    entry = PasswdFile(str(users)).get("alice@example.org")
    assert entry is not None and entry.password.startswith("{SHA256-CRYPT}")
    assert entry.aliases == ["ali@example.org"] and entry.quota() == (1024**3, None)
    assert PasswdFile(str(users)).get("bob").password.startswith("{ARGON2ID}")  # type: ignore[union-attr]

    portal = build_portal(make_service({"main": {"type": "passwd-file", "path": str(users)}}))
    creds = UsernamePassword(b"alice@example.org", b"pw1")
    _, avatar, _ = yield portal.login(creds, None, IMailUser)
    assert avatar.user.quota_bytes == 1024**3

    run(monkeypatch, capsys, [*base, "passwd", "alice@example.org", "--stdin"], "pw3\n")
    with pytest.raises(UnauthorizedLogin):
        yield portal.login(creds, None, IMailUser)
    yield portal.login(UsernamePassword(b"alice@example.org", b"pw3"), None, IMailUser)

    code, out, _ = run(monkeypatch, capsys, [*base, "del", "bob"])
    assert code == 0
    code, _, err = run(monkeypatch, capsys, [*base, "del", "bob"])
    assert code == 1 and "no user bob" in err
    code, out, _ = run(monkeypatch, capsys, [*base, "list"])
    assert out == "alice@example.org\n"
    code, _, err = run(monkeypatch, capsys, [*base, "add", "bad name", "--stdin"], "x\n")
    assert code == 1 and "invalid user name" in err


@pytest.mark.integration
@pytest.mark.parametrize("driver", ["sqlite", "postgresql", "mysql"])
@pytest_twisted.inlineCallbacks
def test_user_commands_on_sql(
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    driver: str,
) -> Any:
    from twisted.internet import reactor

    if driver == "sqlite":
        backend = {"type": "sql", "driver": "sqlite", "database": str(tmp_path / "u.sqlite")}
    elif driver == "postgresql":
        db = request.getfixturevalue("postgres_db")
        backend = {"type": "sql", "driver": driver, "database": db, "user": "postgres"}
    else:
        db = request.getfixturevalue("mysql_db")
        backend = {"type": "sql", "driver": driver, "database": db, "user": "root"}
    config = write_config(tmp_path, {**backend, "default_scheme": "SHA512-CRYPT"})
    base = ["user", "--config", config]
    code, out, err = run(
        monkeypatch,
        capsys,
        [*base, "add", "carol@example.org", "--alias", "c@example.org", "--stdin"],
        "pw\n",
    )
    assert code == 0, err
    code, _, err = run(monkeypatch, capsys, [*base, "add", "carol@example.org", "--stdin"], "pw\n")
    assert code == 1 and "already exists" in err
    code, out, _ = run(monkeypatch, capsys, [*base, "list"])
    assert out == "carol@example.org\n"

    service = FakeService(make_config(tmp_path, {"main": backend}), reactor)
    try:
        portal = build_portal(service)
        _, avatar, _ = yield portal.login(
            UsernamePassword(b"carol@example.org", b"pw"), None, IMailUser
        )
        assert "c@example.org" in avatar.user.addresses
        run(monkeypatch, capsys, [*base, "passwd", "carol@example.org", "--stdin"], "new\n")
        yield portal.login(UsernamePassword(b"carol@example.org", b"new"), None, IMailUser)
        code, _, _ = run(monkeypatch, capsys, [*base, "del", "carol@example.org"])
        assert code == 0
        with pytest.raises(UnauthorizedLogin):
            yield portal.login(UsernamePassword(b"carol@example.org", b"new"), None, IMailUser)
    finally:
        from mailserv.auth import _shared

        _shared[service].close()
        service.threads._stop_pools()
