"""QRESYNC VANISHED (EARLIER) from the store's expunge history (RFC 7162 sections
3.2.5.1 and 3.2.6), exact bytes over StringTransport."""

from __future__ import annotations

from tests.imap.harness import Env, message


def _env(count: int) -> Env:
    env = Env()
    for n in range(1, count + 1):
        env.deliver(message(n))  # modseqs 2 .. count + 1
    return env


def _qresync_session(env: Env):  # type: ignore[no-untyped-def]
    s = env.session()
    s.login()
    s.cmd("e ENABLE QRESYNC")
    return s


def test_select_qresync_without_known_uids_reports_expunges_since_the_modseq():
    """RFC 7162 section 3.2.5.1: the UIDs expunged after the client's mod-sequence."""
    env = _env(4)
    b = env.selected_session()
    b.cmd("x STORE 2 +FLAGS.SILENT (\\Deleted)")  # modseq 6
    b.cmd("y EXPUNGE")  # modseq 7
    s = _qresync_session(env)
    out = s.cmd("s SELECT INBOX (QRESYNC (1000 5))")
    assert b"* VANISHED (EARLIER) 2\r\n" in out
    assert b"FETCH" not in out  # nothing else changed after modseq 5


def test_select_qresync_leaves_out_expunges_the_client_already_knew():
    env = _env(4)
    b = env.selected_session()
    b.cmd("x STORE 1 +FLAGS.SILENT (\\Deleted)")
    b.cmd("y EXPUNGE")  # modseq 7: before the client's state
    b.cmd("z UID STORE 3 +FLAGS.SILENT (\\Deleted)")
    b.cmd("w EXPUNGE")  # modseq 9
    s = _qresync_session(env)
    out = s.cmd("s SELECT INBOX (QRESYNC (1000 7 1:4))")
    assert b"* VANISHED (EARLIER) 3\r\n" in out
    assert b"VANISHED (EARLIER) 1" not in out


def test_select_qresync_limits_vanished_to_the_known_uids():
    env = _env(4)
    b = env.selected_session()
    b.cmd("x STORE 1:2 +FLAGS.SILENT (\\Deleted)")
    b.cmd("y EXPUNGE")
    s = _qresync_session(env)
    out = s.cmd("s SELECT INBOX (QRESYNC (1000 5 2:4))")
    assert b"* VANISHED (EARLIER) 2\r\n" in out


def test_uid_fetch_vanished_reports_expunges_since_changedsince_in_the_set():
    """RFC 7162 section 3.2.6: UID FETCH ... (CHANGEDSINCE m VANISHED)."""
    env = _env(5)
    s = _qresync_session(env)
    s.cmd("s SELECT INBOX")
    b = env.selected_session()
    b.cmd("x STORE 1 +FLAGS.SILENT (\\Deleted)")
    b.cmd("y EXPUNGE")  # modseq 8
    b.cmd("z UID STORE 3:4 +FLAGS.SILENT (\\Deleted)")
    b.cmd("w EXPUNGE")  # modseq 11
    out = s.cmd("f UID FETCH 2:5 (FLAGS) (CHANGEDSINCE 9 VANISHED)")
    assert out.startswith(b"* VANISHED (EARLIER) 3:4\r\n")
    assert b"VANISHED (EARLIER) 1" not in out
    assert out.endswith(b"f OK FETCH completed\r\n")
