"""``mailserv passwd`` and ``mailserv user add|del|list|passwd`` (passwd-file and sql backends).

``mailserv passwd [--scheme S]`` prints a new ``{SCHEME}hash`` for a
password read from the terminal (twice) or, with ``--stdin``, from the first
line of standard input.  ``mailserv user ...`` edits the first passwd-file or
sql backend of the configuration (``--config FILE``, else $MAILSERV_CONFIG,
else the embedded default), or the one named by ``--backend``.  The sql
backend must use the default schema (mailserv.auth.sql.SCHEMA, created when
missing).  Passwords are never taken from the command line.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mailserv.auth import schemes
from mailserv.auth.passwdfile import Entry, PasswdFile
from mailserv.auth.usernames import InvalidUsername, normalize_username
from mailserv.config import default_config, load_config, parse_size
from mailserv.config.schema import Invalid
from mailserv.errors import MailservError

EDITABLE = ("passwd-file", "sql")


class UserError(MailservError):
    """A user command that cannot be done (unknown user, duplicate, bad input)."""


def register(subparsers: Any) -> None:
    passwd = subparsers.add_parser(
        "passwd",
        help="hash a password for a passwd-file or SQL table",
        description="Read a password and print it hashed as {SCHEME}hash (default ARGON2ID).",
    )
    _password_options(passwd)
    passwd.set_defaults(func=run_passwd)

    user = subparsers.add_parser(
        "user",
        help="add, delete, list users and set passwords (passwd-file and sql backends)",
        description="Manage the users of a passwd-file or sql authentication backend.",
    )
    user.add_argument("--config", metavar="FILE", help="configuration file (default: embedded)")
    user.add_argument("--backend", metavar="NAME", help="the [auth.backend.NAME] to edit")
    sub = user.add_subparsers(dest="user_command", metavar="ACTION")
    sub.required = True

    add = sub.add_parser("add", help="add a user", description="Add a user with a password.")
    add.add_argument("name", help="login name (an address, or a bare name)")
    add.add_argument("--home", help="home directory ({home} in mailbox templates)")
    add.add_argument("--mailbox", help="mailbox path, overriding the template")
    add.add_argument("--alias", action="append", default=[], help="another address (repeatable)")
    add.add_argument("--quota", help="mailbox quota, e.g. 1G")
    _password_options(add)
    add.set_defaults(func=run_add)

    delete = sub.add_parser("del", help="delete a user", description="Delete a user.")
    delete.add_argument("name")
    delete.set_defaults(func=run_del)

    listing = sub.add_parser("list", help="list users", description="List the users.")
    listing.set_defaults(func=run_list)

    change = sub.add_parser("passwd", help="set a user's password", description="Set a password.")
    change.add_argument("name")
    _password_options(change)
    change.set_defaults(func=run_set_password)


def _password_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scheme",
        default=None,
        type=str.upper,
        choices=schemes.SCHEMES,
        metavar="SCHEME",
        help=f"password scheme (default ARGON2ID; one of {', '.join(schemes.SCHEMES)})",
    )
    parser.add_argument(
        "--stdin", action="store_true", help="read the password from the first line of stdin"
    )


def read_password(args: argparse.Namespace) -> str:
    """The new password: stdin's first line with --stdin, else asked twice on the terminal."""
    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("New password: ")
        if getpass.getpass("Retype new password: ") != password:
            raise UserError("the passwords do not match")
    if not password:
        raise UserError("empty passwords are refused")
    return password


def run_passwd(args: argparse.Namespace) -> int:
    print(schemes.hash_password(read_password(args), args.scheme or schemes.DEFAULT_SCHEME))
    return 0


# --------------------------------------------------------------------------
# Backends


def _config(args: argparse.Namespace) -> Any:
    path = args.config or os.environ.get("MAILSERV_CONFIG")
    return load_config(path) if path else default_config()


def _backend(args: argparse.Namespace) -> tuple[str, Any]:
    config = _config(args)
    auth = config.auth
    if args.backend:
        if args.backend not in auth.backend:
            raise UserError(f"no [auth.backend.{args.backend}] in the configuration")
        section = auth.backend[args.backend]
        if section.type not in EDITABLE:
            raise UserError(f"cannot edit users of a {section.type} backend")
        return args.backend, section
    for name in auth.backends:
        if auth.backend[name].type in EDITABLE:
            return name, auth.backend[name]
    raise UserError("the configuration has no passwd-file or sql backend")


def _name(raw: str) -> str:
    try:
        return normalize_username(raw)
    except InvalidUsername as exc:
        raise UserError(f"invalid user name {raw!r}: {exc}") from None


def _hash(args: argparse.Namespace, section: Any) -> str:
    scheme = args.scheme or getattr(section, "default_scheme", schemes.DEFAULT_SCHEME)
    return schemes.hash_password(read_password(args), scheme)


class PasswdFileStore:
    """User edits on a passwd-file."""

    def __init__(self, section: Any) -> None:
        self.file = PasswdFile(section.path)

    def add(self, name: str, password: str, options: dict[str, Any]) -> None:
        with self.file.editing() as entries:
            if name in entries:
                raise UserError(f"user {name} already exists")
            extra: dict[str, str] = {}
            if options.get("mailbox"):
                extra["mail"] = options["mailbox"]
            if options.get("aliases"):
                extra["aliases"] = ",".join(options["aliases"])
            if options.get("quota") is not None:
                extra["quota_rule"] = f"*:storage={options['quota']}"
            entries[name] = Entry(name, password, home=options.get("home") or "", extra=extra)

    def delete(self, name: str) -> None:
        with self.file.editing() as entries:
            if entries.pop(name, None) is None:
                raise UserError(f"no user {name}")

    def set_password(self, name: str, password: str) -> None:
        with self.file.editing() as entries:
            if name not in entries:
                raise UserError(f"no user {name}")
            entries[name].password = password

    def names(self) -> list[str]:
        return sorted(self.file.entries())


class SQLStore:
    """User edits on the default schema of a sql backend (blocking DB-API, for the CLI)."""

    def __init__(self, section: Any) -> None:
        from mailserv.auth.sql import connection_args, read_secret_file

        self.driver = section.driver
        module, kwargs = connection_args(section, read_secret_file(section.password_file))
        self.module = __import__(module)
        self.kwargs = kwargs

    @contextmanager
    def _cursor(self) -> Iterator[Any]:
        from mailserv.auth.sql import SCHEMA

        conn = self.module.connect(**self.kwargs)
        try:
            cur = conn.cursor()
            for statement in SCHEMA:
                cur.execute(statement)
            yield cur
            conn.commit()
        finally:
            conn.close()

    def _q(self, text: str) -> str:
        from mailserv.auth.sql import translate

        return translate(text, self.driver)

    def add(self, name: str, password: str, options: dict[str, Any]) -> None:
        with self._cursor() as cur:
            cur.execute(self._q("SELECT username FROM users WHERE username = :u"), {"u": name})
            if cur.fetchall():
                raise UserError(f"user {name} already exists")
            cur.execute(
                self._q(
                    "INSERT INTO users (username, password, home, mailbox, quota_bytes)"
                    " VALUES (:u, :p, :h, :m, :q)"
                ),
                {
                    "u": name,
                    "p": password,
                    "h": options.get("home"),
                    "m": options.get("mailbox"),
                    "q": options.get("quota"),
                },
            )
            for alias in options.get("aliases", []):
                cur.execute(
                    self._q("INSERT INTO aliases (address, username) VALUES (:a, :u)"),
                    {"a": alias, "u": name},
                )

    def delete(self, name: str) -> None:
        with self._cursor() as cur:
            cur.execute(self._q("DELETE FROM users WHERE username = :u"), {"u": name})
            if cur.rowcount == 0:
                raise UserError(f"no user {name}")
            cur.execute(self._q("DELETE FROM aliases WHERE username = :u"), {"u": name})

    def set_password(self, name: str, password: str) -> None:
        with self._cursor() as cur:
            cur.execute(
                self._q("UPDATE users SET password = :p WHERE username = :u"),
                {"p": password, "u": name},
            )
            if cur.rowcount == 0:
                raise UserError(f"no user {name}")

    def names(self) -> list[str]:
        with self._cursor() as cur:
            cur.execute("SELECT username FROM users ORDER BY username")
            return [str(row[0]) for row in cur.fetchall()]


def _store(section: Any) -> PasswdFileStore | SQLStore:
    return PasswdFileStore(section) if section.type == "passwd-file" else SQLStore(section)


def run_add(args: argparse.Namespace) -> int:
    backend, section = _backend(args)
    name = _name(args.name)
    aliases = [_name(a) for a in args.alias]
    quota = None
    if args.quota:
        try:
            quota = parse_size(args.quota)
        except Invalid as exc:
            raise UserError(f"bad quota {args.quota!r}: {exc}") from None
    options = {"home": args.home, "mailbox": args.mailbox, "aliases": aliases, "quota": quota}
    _store(section).add(name, _hash(args, section), options)
    print(f"added {name} to {backend}")
    return 0


def run_del(args: argparse.Namespace) -> int:
    backend, section = _backend(args)
    name = _name(args.name)
    _store(section).delete(name)
    print(f"deleted {name} from {backend}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    _, section = _backend(args)
    for name in _store(section).names():
        print(name)
    return 0


def run_set_password(args: argparse.Namespace) -> int:
    backend, section = _backend(args)
    name = _name(args.name)
    _store(section).set_password(name, _hash(args, section))
    print(f"password of {name} changed in {backend}")
    return 0
