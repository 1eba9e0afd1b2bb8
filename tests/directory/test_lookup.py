"""Address candidates (+detail, bare local parts) and the backend chain of the directory."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from mailserv.directory import User
from mailserv.directory.lookup import ChainDirectory, candidates, split_address
from mailserv.errors import TemporaryFailure

LOCAL = ["example.org"]


@pytest.mark.parametrize(
    "address, expected",
    [
        ("alice@example.org", ["alice@example.org", "alice"]),
        (
            "Alice+Lists@EXAMPLE.org",
            ["alice+lists@example.org", "alice@example.org", "alice+lists", "alice"],
        ),
        ("alice@remote.test", ["alice@remote.test"]),
        ("alice+x@remote.test", ["alice+x@remote.test", "alice@remote.test"]),
        ("+x@example.org", ["+x@example.org", "+x"]),  # a leading + is not a detail
        ("bob", ["bob"]),
        ("bob+tag", ["bob+tag", "bob"]),
        ("alice@example.org.", ["alice@example.org", "alice"]),
    ],
)
def test_candidates(address: str, expected: list[str]) -> None:
    assert candidates(address, LOCAL) == expected


def test_split_address() -> None:
    assert split_address("a@b@Example.ORG") == ("a@b", "example.org")
    assert split_address("bare") == ("bare", "")


class Source:
    def __init__(self, users: dict[str, str], down: bool = False) -> None:
        self.users, self.down, self.keys = users, down, []

    def find(self, key: str) -> defer.Deferred[User | None]:
        self.keys.append(key)
        if self.down:
            return defer.fail(TemporaryFailure("down"))
        name = self.users.get(key)
        return defer.succeed(None if name is None else User(name=name, mailbox=f"/m/{name}"))


@pytest_twisted.inlineCallbacks
def test_first_source_that_knows_wins() -> Any:
    first, second = Source({"alice": "alice"}), Source({"alice@example.org": "other"})
    user = yield ChainDirectory([first, second], LOCAL).lookup("alice+x@example.org")
    assert user.name == "other"  # the most specific key is tried on every source first
    user = yield ChainDirectory([first, second], LOCAL).lookup("alice+x@example.net")
    assert user is None


@pytest_twisted.inlineCallbacks
def test_a_source_down_is_a_temporary_failure_unless_another_answers() -> Any:
    down = Source({}, down=True)
    with pytest.raises(TemporaryFailure):
        yield ChainDirectory([down, Source({})], LOCAL).lookup("alice@example.org")
    user = yield ChainDirectory([down, Source({"alice": "alice"})], LOCAL).lookup(
        "alice@example.org"
    )
    assert user.name == "alice"
