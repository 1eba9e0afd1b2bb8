"""Several sessions on one mailbox: changes reach the others through the shared
folder's event log (RFC 3501 sections 5.2, 7.4.1), exact bytes over StringTransport."""

from __future__ import annotations

from typing import Any

import pytest

from mailserv.imap import mailbox as mailboxmod
from tests.imap.harness import Env, message, selected


def test_keyword_set_by_another_session_is_reported_with_the_keyword():
    """RFC 3501 section 7.4.2: FLAGS lists every flag of the message, keywords too."""
    env, a = selected(1)
    b = env.selected_session()
    b.cmd("x STORE 1 +FLAGS ($Label1)")
    assert a.cmd("n NOOP") == b"* 1 FETCH (FLAGS ($Label1 \\Recent))\r\nn OK NOOP completed\r\n"


def test_changes_by_other_sessions_are_replayed_not_diffed(monkeypatch: pytest.MonkeyPatch):
    """A STORE, APPEND or EXPUNGE by one session reaches the others without a diff of
    the whole mailbox per session (and without listing the store again)."""
    env, a = selected(3)
    b = env.selected_session()

    def no_full_diff(*args: Any, **kw: Any) -> Any:
        raise AssertionError("full diff of the mailbox")

    monkeypatch.setattr(mailboxmod.SelectedMailbox, "diff", no_full_diff)
    folder = env.store.account("alice").folders["INBOX"]
    listed = []
    real_messages = type(a.server.selected.box).messages
    monkeypatch.setattr(
        type(a.server.selected.box),
        "messages",
        lambda box: listed.append(1) or real_messages(box),
    )
    b.cmd("x STORE 2 +FLAGS (\\Seen)")
    b.cmd("y APPEND INBOX {3+}\r\nhi!")
    b.cmd("z STORE 1 +FLAGS.SILENT (\\Deleted)")
    b.cmd("w EXPUNGE")
    assert a.cmd("n NOOP") == (
        b"* 1 EXPUNGE\r\n* 1 FETCH (FLAGS (\\Recent \\Seen))\r\n"
        b"* 3 EXISTS\r\n* 2 RECENT\r\nn OK NOOP completed\r\n"
    )
    assert listed == []
    assert sorted(folder.messages) == [2, 3, 4]


def test_expunges_held_back_during_fetch_survive_further_changes():
    """RFC 3501 section 7.4.1: no EXPUNGE during FETCH; later changes do not lose them."""
    env, a = selected(3)
    b = env.selected_session()
    b.cmd("x STORE 1 +FLAGS.SILENT (\\Deleted)")
    b.cmd("y EXPUNGE")
    out = a.cmd("f FETCH 3 (FLAGS)")
    assert b"EXPUNGE" not in out and b"* 3 FETCH (FLAGS (\\Recent))" in out
    b.cmd("z UID STORE 3 +FLAGS (\\Flagged)")
    # flag changes are reported during FETCH, under the numbers the client knows
    assert a.cmd("g FETCH 3 (UID)") == (
        b"* 3 FETCH (UID 3)\r\n* 3 FETCH (FLAGS (\\Flagged \\Recent))\r\ng OK FETCH completed\r\n"
    )
    assert a.cmd("n NOOP") == b"* 1 EXPUNGE\r\nn OK NOOP completed\r\n"
    assert a.cmd("s UID SEARCH ALL") == b"* SEARCH 2 3\r\ns OK SEARCH completed\r\n"


def test_session_behind_the_event_log_gets_a_full_diff(monkeypatch: pytest.MonkeyPatch):
    """When the log was trimmed past a session's version, it is brought up to date by
    one diff against the view: the same responses as a replay."""
    monkeypatch.setattr(mailboxmod, "MAX_EVENTS", 4)
    env, a = selected(6)
    b = env.selected_session()
    for n in range(1, 6):
        b.cmd(f"x{n} STORE {n} +FLAGS.SILENT (\\Answered)")
    b.cmd("d STORE 6 +FLAGS.SILENT (\\Deleted)")
    b.cmd("e EXPUNGE")
    shared = a.server.selected.shared
    assert shared.base > a.server.selected.version
    out = a.cmd("n NOOP")
    assert out == (
        b"* 6 EXPUNGE\r\n"
        + b"".join(b"* %d FETCH (FLAGS (\\Answered \\Recent))\r\n" % n for n in range(1, 6))
        + b"n OK NOOP completed\r\n"
    )


def test_outside_change_is_diffed_once_for_all_sessions():
    """A delivery by another process is found by one listing; every session is told."""
    env = Env()
    env.deliver(message(1))
    a = env.selected_session()
    b = env.selected_session()
    env.deliver(message(2), flags=["\\Seen"])
    env.store.account("alice").folders["INBOX"].messages.pop(1)
    env.clock.advance(1)  # NOOP looks at the store again after SharedFolder.MAX_AGE
    assert a.cmd("n NOOP") == (
        b"* 1 EXPUNGE\r\n* 1 EXISTS\r\n* 1 RECENT\r\nn OK NOOP completed\r\n"
    )
    # \\Recent went to the first session that saw the message (RFC 3501 section 2.3.2)
    assert b.cmd("n NOOP") == (
        b"* 1 EXPUNGE\r\n* 1 EXISTS\r\n* 0 RECENT\r\nn OK NOOP completed\r\n"
    )
    assert b.cmd("f FETCH 1 (UID FLAGS)") == (
        b"* 1 FETCH (UID 2 FLAGS (\\Seen))\r\nf OK FETCH completed\r\n"
    )
