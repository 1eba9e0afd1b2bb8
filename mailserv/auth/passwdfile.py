"""Dovecot passwd-file backend: ``user:{SCHEME}hash:uid:gid:gecos:home:shell:extra_fields``.

The file is re-read when it changes (inode, size or mtime), checked on every
lookup in the ``auth`` thread pool, so ``mailserv user add`` takes effect at
once without a reload.  Extra fields are ``key=value`` separated by spaces;
``userdb_`` prefixes are accepted.  Understood: ``mail=`` (mailbox path),
``quota_rule=*:storage=1G`` / ``*:messages=N``, ``aliases=a@x,b@y``.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer

from mailserv.auth import schemes
from mailserv.auth.backend import Backend
from mailserv.config.schema import Invalid, parse_size
from mailserv.directory import User
from mailserv.directory.lookup import make_user
from mailserv.errors import TemporaryFailure


@dataclass
class Entry:
    """One line of a passwd-file."""

    name: str
    password: str = ""
    uid: int | None = None
    gid: int | None = None
    gecos: str = ""
    home: str = ""
    shell: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, line: str) -> Entry | None:
        if not line.strip() or line.lstrip().startswith("#"):
            return None
        parts = line.rstrip("\r\n").split(":", 7)
        parts += [""] * (8 - len(parts))
        name, password, uid, gid, gecos, home, shell, extra = parts
        if not name:
            return None
        fields: dict[str, str] = {}
        for item in extra.split():
            key, _, value = item.partition("=")
            fields[key.removeprefix("userdb_")] = value
        return cls(
            name=name.lower(),
            password=password,
            uid=int(uid) if uid.isdigit() else None,
            gid=int(gid) if gid.isdigit() else None,
            gecos=gecos,
            home=home,
            shell=shell,
            extra=fields,
        )

    def format(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.extra.items())
        uid = "" if self.uid is None else str(self.uid)
        gid = "" if self.gid is None else str(self.gid)
        fields = [self.name, self.password, uid, gid, self.gecos, self.home, self.shell, extra]
        return ":".join(fields).rstrip(":") + "\n"

    @property
    def aliases(self) -> list[str]:
        return [a for a in self.extra.get("aliases", "").split(",") if a]

    def quota(self) -> tuple[int | None, int | None]:
        """(bytes, messages) from a Dovecot ``quota_rule=*:storage=1G:messages=100``."""
        storage = messages = None
        for rule in (self.extra.get("quota_rule", ""), self.extra.get("quota", "")):
            for part in rule.split(":"):
                key, _, value = part.partition("=")
                try:
                    if key == "storage":
                        storage = parse_size(value.upper().rstrip("B") or "0")
                    elif key == "messages":
                        messages = int(value)
                except (Invalid, ValueError):
                    continue
        return storage, messages


class PasswdFile:
    """The file itself: thread-safe cached reading, locked atomic rewriting (for the CLI)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._entries: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}
        self.kinds: frozenset[str] = frozenset()

    def entries(self) -> dict[str, Entry]:
        """The current entries, re-read if the file changed (blocking; call in a thread)."""
        with self._lock:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                self._stamp, self._entries, self._aliases = None, {}, {}
                return self._entries
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp != self._stamp:
                self._entries = self._read()
                self._aliases = {
                    alias.lower(): e.name for e in self._entries.values() for alias in e.aliases
                }
                self.kinds = frozenset().union(
                    *(schemes.secret_kinds(e.password, "CRYPT") for e in self._entries.values())
                )
                self._stamp = stamp
            return self._entries

    def get(self, key: str) -> Entry | None:
        entries = self.entries()
        entry = entries.get(key)
        if entry is None and key in self._aliases:
            entry = entries.get(self._aliases[key])
        return entry

    def _read(self) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                entry = Entry.parse(line)
                if entry is not None:
                    out.setdefault(entry.name, entry)
        return out

    @contextmanager
    def editing(self) -> Iterator[dict[str, Entry]]:
        """Lock the file, yield its entries to change, write them back atomically."""
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self._read() if os.path.exists(self.path) else {}
            yield entries
            mode = os.stat(self.path).st_mode & 0o777 if os.path.exists(self.path) else 0o640
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".passwd.")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    out.writelines(e.format() for e in entries.values())
                    out.flush()
                    os.fsync(out.fileno())
                os.chmod(tmp, mode)
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


class PasswdFileBackend(Backend):
    """Checker and directory over a Dovecot passwd-file."""

    type_name = "passwd-file"

    def __init__(self, name: str, section: Any, config: Any, reactor: Any, threads: Any) -> None:
        super().__init__(name, section, config, reactor, threads)
        self.file = PasswdFile(section.path)
        self.default_scheme = section.default_scheme
        try:
            self.file.entries()  # first load at startup, so that secret_kinds() is right at once
        except OSError:
            pass  # reported as a TemporaryFailure by every lookup until it is fixed

    def _run(self, fn: Any, *args: Any) -> defer.Deferred[Any]:
        def unreadable(failure: Any) -> None:
            failure.trap(OSError)
            raise TemporaryFailure(f"passwd-file {self.section.path} unreadable")

        return self.threads.run("auth", fn, *args).addErrback(unreadable)

    def verify_password(self, username: str, password: bytes) -> defer.Deferred[str | None]:
        """Look the entry up (auth pool), then hash in the bounded ``crypto`` pool."""

        def check(found: tuple[str, str] | None) -> Any:
            if found is None:
                # The same work for unknown users, so that timing does not tell who exists.
                return self.threads.run("crypto", self._dummy_verify, password)
            name, stored = found

            def ok(matches: bool) -> str | None:
                return name if matches else None

            verify = schemes.verify
            d = self.threads.run("crypto", verify, stored, password, "CRYPT")
            return d.addCallback(ok)

        return self._run(self._password_of, username).addCallback(check)

    def _dummy_verify(self, password: bytes) -> None:
        """Hash against some other entry (result ignored): unknown users cost the same."""
        for entry in self.file.entries().values():
            if entry.password:
                schemes.verify(entry.password, password, default_scheme="CRYPT")
                return

    def _password_of(self, username: str) -> tuple[str, str] | None:
        entry = self.file.get(username)
        return None if entry is None or not entry.password else (entry.name, entry.password)

    def secret(self, username: str) -> defer.Deferred[tuple[str, str] | None]:
        return self._run(self._password_of, username)

    def secret_kinds(self) -> frozenset[str]:
        # As of the last (re)load, which every lookup triggers in the auth pool.
        return self.file.kinds

    def find(self, key: str) -> defer.Deferred[User | None]:
        return self._run(self._find, key)

    def _find(self, key: str) -> User | None:
        entry = self.file.get(key.lower())
        if entry is None:
            return None
        storage, messages = entry.quota()
        return make_user(
            self.config,
            self.section,
            entry.name,
            home=entry.home or None,
            mailbox=entry.extra.get("mail") or None,
            addresses=entry.aliases,
            quota_bytes=storage,
            quota_messages=messages,
            uid=entry.uid,
            gid=entry.gid,
            extra=entry.extra,
        )
