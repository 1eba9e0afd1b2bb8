"""Fixtures of the auth tests: real backends (slapd, PostgreSQL, MariaDB, PAM through pam_wrapper).

``backend_case(kind)`` builds one account source holding the same two users
(alice, bob) and describes how to log in and what the canonical name is; the
conformance suite (test_conformance.py) runs the same cases against all.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mailserv.auth import schemes
from mailserv.config import from_dict

REQUIRE = os.environ.get("MAILSERV_REQUIRE_INTEGRATION") == "1"
DOMAIN = "example.org"
ALICE_PASSWORD = "Secret-p4ss"
BOB_PASSWORD = "builder-Pa55"
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
MYSQL = {"host": "127.0.0.1", "port": 3306, "user": "root"}
PAM_WRAPPER_LIB = "/usr/lib/x86_64-linux-gnu/libpam_wrapper.so"
PAM_MATRIX = "/usr/lib/x86_64-linux-gnu/pam_wrapper/pam_matrix.so"
PAM_EXEC = "/usr/lib/x86_64-linux-gnu/security/pam_exec.so"


def unavailable(message: str) -> None:
    """Skip (developer machine) or fail (CI) when a real server or program is missing."""
    if REQUIRE:
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


class Blackhole:
    """A TCP listener on 127.0.0.1 that accepts connections and never answers (a hung server)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.held: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.held.append(conn)

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        for conn in self.held:
            conn.close()
        self.sock.close()


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    hole = Blackhole()
    yield hole
    hole.close()


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connection refused)."""
    return free_port()


# --------------------------------------------------------------------------
# A service-like object: what build_portal / build_directory need


class FakeService:
    """``.config``, ``.reactor``, ``.threads`` as mailserv.service.MailService has them."""

    def __init__(self, config: Any, reactor: Any) -> None:
        from mailserv.threads import ThreadPools

        self.config = config
        self.reactor = reactor
        self.threads = ThreadPools(reactor, {"auth": 4, "disk": 2, "crypto": 2, "dns": 2})


def make_config(tmp_path: Path, backends: dict[str, dict[str, Any]], **auth: Any) -> Any:
    raw = {
        "config_version": 1,
        "hostname": "mail.example.org",
        "domains": [DOMAIN, "example.net"],
        "state_dir": str(tmp_path / "state"),
        "auth": {"backends": list(backends), "backend": backends, **auth},
        "store": {"path": str(tmp_path / "mail" / "{domain}" / "{localpart}" / "Maildir")},
    }
    return from_dict(raw, "test.toml", str(tmp_path))


@pytest.fixture
def make_service(tmp_path: Path) -> Iterator[Callable[..., FakeService]]:
    """``make_service(backends, **auth)``: a FakeService; its backends are closed afterwards."""
    from twisted.internet import reactor

    made: list[FakeService] = []

    def make(backends: dict[str, dict[str, Any]], **auth: Any) -> FakeService:
        service = FakeService(make_config(tmp_path, backends, **auth), reactor)
        made.append(service)
        return service

    yield make
    from mailserv.auth import _shared

    for service in made:
        shared = _shared.get(service)
        if shared is not None:
            shared.close()
        service.threads._stop_pools()


# --------------------------------------------------------------------------
# Backends holding alice and bob


@dataclass
class BackendCase:
    """One configured account source with alice (alias ali@) and bob."""

    kind: str
    section: dict[str, Any]
    login: str  # how alice logs in
    canonical: str  # the avatar id alice gets
    broken: dict[str, dict[str, Any]] = field(default_factory=dict)  # "down"/"slow" sections
    directory: bool = True  # answers address lookups with aliases
    raw_backend_injection: bool = True


@functools.cache
def hashed(password: str, scheme: str) -> str:
    """One hash per password and scheme for the whole session.

    ARGON2ID gets light parameters (1 MiB, one pass): the verifier follows
    the parameters stored in the hash, and the suite stays fast.
    """
    if scheme == "ARGON2ID":
        import argon2

        light = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
        return "{ARGON2ID}" + light.hash(password)
    return schemes.hash_password(password, scheme)


def passwd_file_case(tmp_path: Path, scheme: str) -> BackendCase:
    path = tmp_path / f"users-{scheme}.passwd"
    alice = hashed(ALICE_PASSWORD, scheme)
    bob = hashed(BOB_PASSWORD, scheme)
    path.write_text(
        f"alice@{DOMAIN}:{alice}:1000:1000::/home/alice::aliases=ali@{DOMAIN},a.l@example.net "
        "quota_rule=*:storage=100000000\n"
        f"bob:{bob}:1001:1001::/home/bob::\n"
    )
    broken = tmp_path / "a-directory"
    broken.mkdir(exist_ok=True)
    return BackendCase(
        kind=f"passwd-file-{scheme.lower()}",
        section={"type": "passwd-file", "path": str(path)},
        login=f"alice@{DOMAIN}",
        canonical=f"alice@{DOMAIN}",
        broken={"down": {"type": "passwd-file", "path": str(broken)}},
    )


def sql_rows(scheme: str) -> list[tuple[str, str, str | None, int | None]]:
    return [
        (f"alice@{DOMAIN}", hashed(ALICE_PASSWORD, scheme), None, 100_000_000),
        (f"bob@{DOMAIN}", hashed(BOB_PASSWORD, scheme), None, None),
    ]


def fill_sql(conn: Any, placeholder: str, scheme: str = "SHA512-CRYPT") -> None:
    from mailserv.auth.sql import SCHEMA

    cur = conn.cursor()
    for statement in SCHEMA:
        cur.execute(statement)
    p = placeholder
    for row in sql_rows(scheme):
        cur.execute(
            "INSERT INTO users (username, password, mailbox, quota_bytes)"
            f" VALUES ({p},{p},{p},{p})",
            row,
        )
    cur.execute(
        f"INSERT INTO aliases (address, username) VALUES ({p},{p})",
        (f"ali@{DOMAIN}", f"alice@{DOMAIN}"),
    )
    conn.commit()


def sqlite_case(tmp_path: Path) -> BackendCase:
    import sqlite3

    path = tmp_path / "users.sqlite"
    conn = sqlite3.connect(path)
    fill_sql(conn, "?")
    conn.close()
    locked = tmp_path / "locked.sqlite"
    return BackendCase(
        kind="sqlite",
        section={"type": "sql", "driver": "sqlite", "database": str(path)},
        login=f"alice@{DOMAIN}",
        canonical=f"alice@{DOMAIN}",
        broken={
            "down": {
                "type": "sql",
                "driver": "sqlite",
                "database": str(tmp_path / "missing-dir" / "x.sqlite"),
            },
            "slow": {"type": "sql", "driver": "sqlite", "database": str(locked), "timeout": "1s"},
        },
    )


@contextlib.contextmanager
def locked_sqlite(path: str) -> Iterator[None]:
    """Hold an exclusive lock on a SQLite database (writers and readers wait)."""
    import sqlite3

    conn = sqlite3.connect(path, isolation_level=None)
    fill_sql(conn, "?")
    conn.execute("PRAGMA locking_mode = EXCLUSIVE")
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


@pytest.fixture
def postgres_db() -> Iterator[str]:
    """A fresh PostgreSQL database on 127.0.0.1:5432, dropped afterwards."""
    try:
        import psycopg

        admin = psycopg.connect(dbname="postgres", connect_timeout=3, autocommit=True, **PG)
    except Exception as exc:
        unavailable(f"PostgreSQL on 127.0.0.1:5432 is not available: {exc}")
    name = f"mailserv_test_{secrets.token_hex(6)}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def mysql_db() -> Iterator[str]:
    """A fresh MariaDB database on 127.0.0.1:3306, dropped afterwards."""
    try:
        import pymysql

        admin = pymysql.connect(connect_timeout=3, autocommit=True, **MYSQL)
    except Exception as exc:
        unavailable(f"MariaDB on 127.0.0.1:3306 is not available: {exc}")
    name = f"mailserv_test_{secrets.token_hex(6)}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    try:
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


def server_sql_case(driver: str, database: str, hole: Blackhole, closed: int) -> BackendCase:
    if driver == "postgresql":
        import psycopg

        with psycopg.connect(dbname=database, **PG) as conn:
            fill_sql(conn, "%s")
        base = {"type": "sql", "driver": driver, "database": database, "user": "postgres"}
    else:
        import pymysql

        conn = pymysql.connect(database=database, **MYSQL)
        fill_sql(conn, "%s")
        conn.close()
        base = {"type": "sql", "driver": driver, "database": database, "user": "root"}
    return BackendCase(
        kind=driver,
        section=base,
        login=f"alice@{DOMAIN}",
        canonical=f"alice@{DOMAIN}",
        broken={
            "down": {**base, "port": closed, "timeout": "2s"},
            "slow": {**base, "port": hole.port, "timeout": "1s"},
        },
    )


# --------------------------------------------------------------------------
# OpenLDAP


MAIL_SCHEMA = """
attributetype ( 1.3.6.1.4.1.99999.1.1 NAME 'mailAlternateAddress'
  EQUALITY caseIgnoreIA5Match SUBSTR caseIgnoreIA5SubstringsMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.26{256} )
attributetype ( 1.3.6.1.4.1.99999.1.2 NAME 'mailQuota'
  EQUALITY integerMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
objectclass ( 1.3.6.1.4.1.99999.2.1 NAME 'mailUser' SUP top AUXILIARY
  MAY ( mailAlternateAddress $ mailQuota ) )
"""

SLAPD_CONF = """
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include {dir}/mail.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {dir}/slapd.pid
argsfile {dir}/slapd.args
TLSCACertificateFile {ca}
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}
database mdb
maxsize 10485760
suffix "dc=example,dc=org"
rootdn "cn=admin,dc=example,dc=org"
rootpw {rootpw}
directory {dir}/db
index uid,mail,mailAlternateAddress eq
access to attrs=userPassword by self =xw by anonymous auth by * none
access to * by dn.exact="cn=reader,dc=example,dc=org" read by self read by * none
"""


def ldif(users: dict[str, tuple[str, str, list[str]]], reader_password: str) -> str:
    """inetOrgPerson entries with {SSHA} userPassword, mail and mailAlternateAddress."""
    out = [
        "dn: dc=example,dc=org\nobjectClass: dcObject\nobjectClass: organization\n"
        "dc: example\no: Example\n",
        "dn: ou=people,dc=example,dc=org\nobjectClass: organizationalUnit\nou: people\n",
        "dn: cn=reader,dc=example,dc=org\nobjectClass: organizationalRole\n"
        f"objectClass: simpleSecurityObject\ncn: reader\n"
        f"userPassword: {schemes.hash_password(reader_password, 'SSHA')}\n",
    ]
    for uid, (password, mail, aliases) in users.items():
        entry = (
            f"dn: uid={uid},ou=people,dc=example,dc=org\nobjectClass: inetOrgPerson\n"
            f"objectClass: mailUser\nuid: {uid}\ncn: {uid.title()}\nsn: {uid.title()}\n"
            f"mail: {mail}\nuserPassword: {schemes.hash_password(password, 'SSHA')}\n"
            f"mailQuota: 100000000\ndescription: /srv/mail/{uid}/Maildir\n"
        )
        entry += "".join(f"mailAlternateAddress: {a}\n" for a in aliases)
        out.append(entry)
    return "\n".join(out)


@dataclass
class Slapd:
    url: str
    ldaps_url: str
    reader_dn: str
    reader_password_file: str
    ca_file: str
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def start_slapd(d: Path, ca_file: str, cert_file: str, key_file: str) -> Slapd:
    """slapd with its own config and mdb database in ``d`` (alice, bob), on free ports."""
    import shutil

    binary = shutil.which("slapd") or "/usr/sbin/slapd"
    slapadd = shutil.which("slapadd") or "/usr/sbin/slapadd"
    if not os.path.exists(binary) or not os.path.exists(slapadd):
        unavailable("slapd is not installed (Debian packages slapd, ldap-utils)")
    (d / "db").mkdir(parents=True)
    (d / "mail.schema").write_text(MAIL_SCHEMA)
    conf = d / "slapd.conf"
    rootpw = schemes.hash_password(secrets.token_hex(8), "SSHA")
    conf.write_text(
        SLAPD_CONF.format(dir=d, ca=ca_file, cert=cert_file, key=key_file, rootpw=rootpw)
    )
    reader_password = secrets.token_hex(8)
    users = {
        "alice": (ALICE_PASSWORD, f"alice@{DOMAIN}", [f"ali@{DOMAIN}", "a.l@example.net"]),
        "bob": (BOB_PASSWORD, f"bob@{DOMAIN}", []),
    }
    (d / "users.ldif").write_text(ldif(users, reader_password))
    subprocess.run(
        [slapadd, "-f", str(conf), "-l", str(d / "users.ldif")], check=True, capture_output=True
    )
    (d / "reader.pw").write_text(reader_password + "\n")
    port, tls_port = free_port(), free_port()
    urls = f"ldap://127.0.0.1:{port}/ ldaps://127.0.0.1:{tls_port}/"
    proc = subprocess.Popen(
        [binary, "-d", "0", "-f", str(conf), "-h", urls],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = Slapd(
        url=f"ldap://127.0.0.1:{port}",
        ldaps_url=f"ldaps://127.0.0.1:{tls_port}",
        reader_dn="cn=reader,dc=example,dc=org",
        reader_password_file=str(d / "reader.pw"),
        ca_file=ca_file,
        proc=proc,
    )
    try:
        wait_for_port(port, proc)
        wait_for_port(tls_port, proc)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def slapd(tmp_path_factory: pytest.TempPathFactory, test_ca: Any) -> Iterator[Slapd]:
    """OpenLDAP slapd with its own config and mdb database, on free 127.0.0.1 ports."""
    d = tmp_path_factory.mktemp("slapd")
    server = start_slapd(d, test_ca.ca_file, test_ca.cert_file, test_ca.key_file)
    yield server
    server.stop()


def ldap_case(server: Slapd, mode: str, hole: Blackhole, closed: int) -> BackendCase:
    base: dict[str, Any] = {
        "type": "ldap",
        "urls": [server.url],
        "base_dn": "dc=example,dc=org",
        "bind_dn": server.reader_dn,
        "bind_password_file": server.reader_password_file,
        "quota_attribute": "mailQuota",
    }
    login = f"alice@{DOMAIN}"
    if mode == "bind":
        base["bind_dn_template"] = "uid={user},ou=people,dc=example,dc=org"
        login = "alice"
    return BackendCase(
        kind=f"ldap-{mode}",
        section=base,
        login=login,
        canonical=f"alice@{DOMAIN}",
        broken={
            "down": {**base, "urls": [f"ldap://127.0.0.1:{closed}"], "timeout": "2s"},
            "slow": {**base, "urls": [f"ldap://127.0.0.1:{hole.port}"], "timeout": "1s"},
        },
    )


# --------------------------------------------------------------------------
# PAM through pam_wrapper


@dataclass
class PamWrapper:
    service_dir: Path
    passdb: Path


def use_pam_wrapper(d: Path) -> PamWrapper:
    """The real libpam, through libpam_wrapper with pam_matrix and its own passdb in ``d``.

    pam_wrapper normally comes in by LD_PRELOAD; python-pam binds its symbols
    from the library it loads, so we hand it libpam_wrapper.so instead (which
    forwards to libpam with our service directory) before its first use.
    """
    if not (os.path.exists(PAM_WRAPPER_LIB) and os.path.exists(PAM_MATRIX)):
        unavailable("libpam-wrapper is not installed (Debian package libpam-wrapper)")
    import pam.__internals as internals

    if internals.PamAuthenticator._libs_ready and "PAM_WRAPPER" not in os.environ:
        unavailable("python-pam already bound the system libpam in this process")
    services = d / "services"
    services.mkdir(parents=True)
    passdb = d / "passdb"
    passdb.write_text(f"alice:{ALICE_PASSWORD}:mailserv\nbob:{BOB_PASSWORD}:mailserv\n")
    module = f"{PAM_MATRIX} passdb={passdb}"
    (services / "mailserv").write_text(f"auth required {module}\naccount required {module}\n")
    missing = f"{PAM_MATRIX} passdb={d / 'missing'}"
    (services / "mailserv-down").write_text(f"auth required {missing}\n")
    # A stack that hangs: pam_exec runs sleep before pam_matrix answers.
    (services / "mailserv-slow").write_text(
        f"auth required {PAM_EXEC} /bin/sleep 3\nauth required {module}\n"
    )
    os.environ["PAM_WRAPPER"] = "1"
    os.environ["PAM_WRAPPER_SERVICE_DIR"] = str(services)
    original = internals.find_library
    internals.find_library = lambda name: PAM_WRAPPER_LIB if name == "pam" else original(name)
    return PamWrapper(services, passdb)


@pytest.fixture(scope="session")
def pam_wrapper(tmp_path_factory: pytest.TempPathFactory) -> PamWrapper:
    return use_pam_wrapper(tmp_path_factory.mktemp("pam"))


def pam_case() -> BackendCase:
    return BackendCase(
        kind="pam",
        section={"type": "pam", "service": "mailserv", "domain": DOMAIN},
        login="alice",
        canonical="alice",
        broken={
            "down": {"type": "pam", "service": "mailserv-down", "domain": DOMAIN},
            "slow": {"type": "pam", "service": "mailserv-slow", "domain": DOMAIN, "timeout": "1s"},
        },
        directory=False,
    )


BACKEND_KINDS = [
    "passwd-file-argon2id",
    "passwd-file-sha512-crypt",
    "sqlite",
    "postgresql",
    "mysql",
    "ldap-search",
    "ldap-bind",
    "pam",
]


@pytest.fixture(params=BACKEND_KINDS)
def backend_case(
    request: pytest.FixtureRequest, tmp_path: Path, blackhole: Blackhole, closed_port: int
) -> BackendCase:
    kind = request.param
    if kind.startswith("passwd-file"):
        return passwd_file_case(tmp_path, kind.removeprefix("passwd-file-").upper())
    if kind == "sqlite":
        return sqlite_case(tmp_path)
    if kind == "postgresql":
        return server_sql_case(kind, request.getfixturevalue("postgres_db"), blackhole, closed_port)
    if kind == "mysql":
        return server_sql_case(kind, request.getfixturevalue("mysql_db"), blackhole, closed_port)
    if kind.startswith("ldap"):
        server = request.getfixturevalue("slapd")
        return ldap_case(server, kind.removeprefix("ldap-"), blackhole, closed_port)
    request.getfixturevalue("pam_wrapper")
    return pam_case()
