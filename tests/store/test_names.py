"""Mailbox paths from the [store] path template, folder names and their on-disk form."""

from __future__ import annotations

import pytest

from mailserv.directory import User
from mailserv.errors import InvalidFolderName
from mailserv.store import (
    decode_mutf7,
    encode_mutf7,
    folder_from_fs_name,
    folder_fs_name,
    mailbox_path,
    split_folder_name,
    store_for,
)
from mailserv.store.maildir import MaildirStore
from mailserv.store.mbox import MboxStore
from tests.store.helpers import config


def test_mailbox_path_expands_every_placeholder() -> None:
    assert (
        mailbox_path("/srv/mail/{domain}/{localpart}/Maildir", "alice", "example.test", "alice")
        == "/srv/mail/example.test/alice/Maildir"
    )
    assert mailbox_path("{home}/Maildir", "a", "d", "u", home="/home/u/") == "/home/u/Maildir"
    assert mailbox_path("/var/mail/{user}", "a", "d", "bob") == "/var/mail/bob"


@pytest.mark.parametrize(
    ("localpart", "domain", "user", "home"),
    [
        ("..", "example.test", "u", None),
        ("a/b", "example.test", "u", None),
        ("a", "../etc", "u", None),
        ("a", "d", ".", None),
        ("a", "d", "u\x00x", None),
        ("a", "d", "back\\slash", None),
        ("", "d", "u", None),
        ("a", "d", "u", "relative/home"),
        ("a", "d", "u", "/home/../etc"),
    ],
)
def test_mailbox_path_refuses_escapes(
    localpart: str, domain: str, user: str, home: str | None
) -> None:
    template = "/srv/{domain}/{localpart}/{user}" + ("/{home}" if home else "")
    with pytest.raises(InvalidFolderName):
        mailbox_path(template, localpart, domain, user, home=home)


def test_mailbox_path_refuses_unknown_placeholders_and_literal_dotdot() -> None:
    with pytest.raises(InvalidFolderName):
        mailbox_path("/srv/{user.__class__}", "a", "d", "u")
    with pytest.raises(InvalidFolderName):
        mailbox_path("/srv/../{user}", "a", "d", "u")


def test_modified_utf7_rfc3501_example() -> None:
    # RFC 3501 section 5.1.3
    assert encode_mutf7("~peter/mail/台北/日本語") == "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
    assert decode_mutf7("~peter/mail/&U,BTFw-/&ZeVnLIqe-") == "~peter/mail/台北/日本語"
    assert encode_mutf7("A&B") == "A&-B" and decode_mutf7("A&-B") == "A&B"


def test_folder_names_map_to_maildirplusplus() -> None:
    assert split_folder_name("inbox") == ("INBOX",)
    assert split_folder_name("Lists/Python") == ("Lists", "Python")
    assert folder_fs_name(("Lists", "Python")) == "Lists.Python"
    assert folder_fs_name(("Entwürfe",)) == "Entw&APw-rfe"
    assert folder_from_fs_name("Entw&APw-rfe.Alt") == "Entwürfe/Alt"
    assert folder_from_fs_name("..bad") is None
    assert folder_from_fs_name("&AGEAYgBj") is None  # unterminated base64


def test_store_for_falls_back_to_config_format() -> None:
    user = User(name="u", mailbox="/x", store_format="")
    assert isinstance(store_for(user, config(format="mbox")), MboxStore)
    assert isinstance(store_for(user, config(format="maildir")), MaildirStore)
    with pytest.raises(ValueError):
        store_for(User(name="u", mailbox="/x", store_format="mh"), config())


def test_new_files_are_numbered_in_delivery_order() -> None:
    from mailserv.store.maildir import _sort_key

    names = ["100.M99999P1Q9.h", "100.M100000P1Q10.h", "99.M5P1Q1.h", "100.M100000P1Q2.h", "x"]
    assert sorted(names, key=_sort_key) == [
        "x",
        "99.M5P1Q1.h",
        "100.M99999P1Q9.h",
        "100.M100000P1Q2.h",
        "100.M100000P1Q10.h",
    ]
