"""Shared helpers of the store tests: a config, a user, message bodies with a checksum."""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from mailserv.config.sections import StoreSection
from mailserv.directory import User
from mailserv.store.maildir import MaildirStore
from mailserv.store.mbox import MboxStore


def config(**overrides: Any) -> StoreSection:
    values: dict[str, Any] = {"path": "/unused/{user}"}
    values.update(overrides)
    return StoreSection(**values)


def make_user(tmp: str, fmt: str, **kw: Any) -> User:
    mailbox = os.path.join(tmp, "Maildir" if fmt == "maildir" else "mbox")
    return User(name="alice", mailbox=mailbox, store_format=fmt, **kw)


def make_store(fmt: str, cfg: StoreSection | None = None, **kw: Any) -> Any:
    cfg = cfg or config(format=fmt)
    return MaildirStore(cfg) if fmt == "maildir" else MboxStore(cfg, **kw)


def checked_message(tag: str, size: int = 200) -> bytes:
    """A CRLF message whose last header line carries a SHA-256 of its body."""
    body = (f"{tag} " * (size // (len(tag) + 1) + 1))[:size].encode()
    lines = b"\r\n".join(body[i : i + 70] for i in range(0, len(body), 70)) + b"\r\n"
    digest = hashlib.sha256(lines).hexdigest()
    head = f"Subject: {tag}\r\nX-Tag: {tag}\r\nX-Check: {digest}\r\n\r\n".encode()
    return head + lines


def verify_message(data: bytes) -> str:
    """Return the tag of a complete message; raise AssertionError on a partial one."""
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no header/body separator in {data[:80]!r}"
    m = re.search(rb"X-Check: ([0-9a-f]{64})", head)
    tag = re.search(rb"X-Tag: (\S+)", head)
    assert m and tag, f"headers missing in {data[:80]!r}"
    assert hashlib.sha256(body).hexdigest() == m.group(1).decode(), f"partial message {tag!r}"
    return tag.group(1).decode()


def read_tags(box: Any) -> list[str]:
    """The tags of every message of an IMailbox, in UID order, each checked complete."""
    tags = []
    for info in box.messages():
        with box.open_message(info.uid) as f:
            tags.append(verify_message(f.read()))
    return tags
