"""The twisted.cred checker plugins (strcred ``--auth``) of twisted/plugins/mailserv_cred.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.cred import strcred
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.plugin import getPlugins

from mailserv.auth import schemes


def test_plugins_are_discovered() -> None:
    names = {f.authType for f in getPlugins(strcred.ICheckerFactory)}
    assert {"passwd-file", "sql", "ldap", "pam"} <= names


@pytest_twisted.inlineCallbacks
def test_passwd_file_checker(tmp_path: Path) -> Any:
    users = tmp_path / "users"
    users.write_text(f"alice:{schemes.hash_password('pw', 'SSHA256')}\n")
    checker = strcred.makeChecker(f"passwd-file:{users}")
    name = yield checker.requestAvatarId(UsernamePassword(b"Alice", b"pw"))
    assert name == "alice"
    with pytest.raises(UnauthorizedLogin):
        yield checker.requestAvatarId(UsernamePassword(b"alice", b"wrong"))
    with pytest.raises(UnauthorizedLogin):
        yield checker.requestAvatarId(UsernamePassword(b"alice", b""))


@pytest_twisted.inlineCallbacks
def test_sql_checker_from_a_toml_file(tmp_path: Path) -> Any:
    import sqlite3

    from tests.auth.conftest import fill_sql

    db = tmp_path / "u.sqlite"
    conn = sqlite3.connect(db)
    fill_sql(conn, "?", "SSHA")
    conn.close()
    table = tmp_path / "sql.toml"
    table.write_text(f'driver = "sqlite"\ndatabase = "{db}"\n')
    checker = strcred.makeChecker(f"sql:{table}")
    try:
        name = yield checker.requestAvatarId(UsernamePassword(b"bob@example.org", b"builder-Pa55"))
        assert name == "bob@example.org"
    finally:
        checker.backends[0].close()


def test_bad_table_is_a_config_error(tmp_path: Path) -> None:
    from mailserv.errors import ConfigError

    table = tmp_path / "ldap.toml"
    table.write_text('urls = []\nbase_dn = "dc=x"\nbogus = 1\n')
    with pytest.raises(ConfigError):
        strcred.makeChecker(f"ldap:{table}")
