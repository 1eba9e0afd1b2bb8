"""Recipient lookup: who an address is and where its mail goes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class User:
    """A local user, as a directory backend knows it.

    ``name`` is the canonical login name; ``mailbox`` the location of the store
    (a maildir directory or an mbox file), already expanded from the template.
    """

    name: str
    mailbox: str
    store_format: str = "maildir"
    addresses: tuple[str, ...] = ()
    quota_bytes: int | None = None
    quota_messages: int | None = None
    uid: int | None = None
    gid: int | None = None
    extra: Mapping[str, str] = field(default_factory=dict)
