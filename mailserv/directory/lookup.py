"""Address lookup across the configured backends: candidates, +detail, mailbox paths.

A recipient ``Alice+lists@Example.ORG`` is looked up as the backends know
users: the whole address first, then without the ``+detail``, then (for a
local domain) the bare local part, which is how passwd-file and PAM users
without a domain are written.  The first backend (in ``auth.backends``
order) that knows a candidate answers; one that is down makes the lookup a
TemporaryFailure unless an earlier backend already answered.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from twisted.internet import defer
from zope.interface import implementer

from mailserv.directory import User
from mailserv.errors import TemporaryFailure
from mailserv.interfaces import IUserDirectory

DETAIL_DELIMITER = "+"


class UserSource(Protocol):
    """What a backend offers the directory: the user a key (address or login) names."""

    def find(self, key: str) -> defer.Deferred[User | None]: ...


def split_address(address: str) -> tuple[str, str]:
    """(localpart, domain) with the domain lower-cased; domain is '' for a bare name."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain.lower().rstrip(".")


def candidates(address: str, local_domains: Iterable[str]) -> list[str]:
    """The keys to try for ``address``, most specific first (RFC 5233 +detail stripped)."""
    local, domain = split_address(address.strip())
    out: list[str] = []

    def add(key: str) -> None:
        if key and key not in out:
            out.append(key)

    base = local.split(DETAIL_DELIMITER, 1)[0] if DETAIL_DELIMITER in local[1:] else local
    if domain:
        add(f"{local}@{domain}".lower())
        add(f"{base}@{domain}".lower())
        if domain in {d.lower() for d in local_domains}:
            add(local.lower())
            add(base.lower())
    else:
        add(local.lower())
        add(base.lower())
    return out


def mailbox_path(template: str, name: str, default_domain: str, home: str | None = None) -> str:
    """Expand a mailbox template ({domain} {localpart} {user} {home}) for user ``name``.

    mailserv.store.mailbox_path does the expansion and refuses unsafe values.
    """
    from mailserv.store import mailbox_path as expand

    local, domain = split_address(name)
    return expand(template, local, domain or default_domain, name, home)


def make_user(
    config: Any,
    section: Any,
    name: str,
    *,
    home: str | None = None,
    mailbox: str | None = None,
    addresses: Sequence[str] = (),
    quota_bytes: int | None = None,
    quota_messages: int | None = None,
    uid: int | None = None,
    gid: int | None = None,
    extra: dict[str, str] | None = None,
) -> User:
    """A User for ``name`` with its mailbox expanded from the backend's or [store]'s template."""
    default_domain = config.domains[0] if config.domains else config.hostname
    if not mailbox:
        template = getattr(section, "mailbox_path", None) or config.store.path
        mailbox = mailbox_path(template, name, default_domain, home)
    local, domain = split_address(name)
    own = [name] if domain else [f"{local}@{d}" for d in config.domains]
    seen: list[str] = []
    for a in [*own, *addresses]:
        a = a.strip().lower()
        if a and a not in seen:
            seen.append(a)
    return User(
        name=name,
        mailbox=mailbox,
        store_format=config.store.format,
        addresses=tuple(seen),
        quota_bytes=quota_bytes if quota_bytes is not None else (config.store.quota or None),
        quota_messages=quota_messages
        if quota_messages is not None
        else (config.store.quota_messages or None),
        uid=uid,
        gid=gid,
        extra=dict(extra or {}),
    )


@implementer(IUserDirectory)
class ChainDirectory:
    """IUserDirectory over the backends of ``auth.backends``, in order."""

    def __init__(self, sources: Sequence[UserSource], local_domains: Iterable[str]) -> None:
        self.sources = list(sources)
        self.local_domains = [d.lower() for d in local_domains]

    @defer.inlineCallbacks
    def lookup(self, address: str) -> Any:
        keys = candidates(address, self.local_domains)
        unavailable = False
        for key in keys:
            for source in self.sources:
                try:
                    user = yield source.find(key)
                except TemporaryFailure:
                    unavailable = True
                    continue
                if user is not None:
                    return user
        if unavailable:
            raise TemporaryFailure("a user directory is unavailable")
        return None
