"""Bad input: clear protocol errors, bounded memory, never a traceback (LIMITS.md)."""

from __future__ import annotations

import random

import pytest

from mailserv.imap import server as imapserver
from tests.imap.harness import Env, message

COMMANDS = [
    "FETCH 1:* (FLAGS BODY[HEADER.FIELDS (FROM)]<0.5> BODYSTRUCTURE ENVELOPE)",
    "UID FETCH 1:* (BODY.PEEK[1.2.MIME] BINARY[1] RFC822.SIZE) (CHANGEDSINCE 1)",
    "STORE 1 +FLAGS (\\Seen $x)",
    "SEARCH OR (FROM a SUBJECT b) NOT (BODY c)",
    'LIST (SUBSCRIBED RECURSIVEMATCH) "" (INBOX %) RETURN (CHILDREN STATUS (MESSAGES))',
    "SORT (REVERSE DATE) UTF-8 ALL",
    "THREAD REFERENCES UTF-8 ALL",
    "APPEND INBOX (\\Seen) {5+}\r\nhello",
    "COPY 1 Trash",
    "STATUS INBOX (MESSAGES UNSEEN)",
]


def mutate(rng: random.Random, text: str) -> bytes:
    data = bytearray(text.encode())
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:
            del data[min(pos, len(data) - 1)]
        elif op == 1:
            data.insert(pos, rng.choice(b'()[]{}<>"\\*%+0123456789 \x00\x7f\xff'))
        elif op == 2:
            data[pos:pos] = rng.choice([b"{99999}", b"{5+}", b"(" * 40, b")", b"\r\n", b"NIL"])
        else:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(data)


@pytest.mark.parametrize("seed", range(int(__import__("os").environ.get("IMAP_FUZZ_SEEDS", "6"))))
def test_mutated_commands_get_protocol_errors_not_tracebacks(seed: int) -> None:
    rng = random.Random(seed)
    env = Env()
    for i in range(3):
        env.deliver(message(i))
    session = env.selected_session()
    errors = []
    session.server.ctx.settings.bad_commands_auth = 10**6
    from twisted.logger import globalLogPublisher

    def observer(event: dict) -> None:
        if event.get("log_failure") is not None:
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        for n in range(150):
            line = mutate(rng, rng.choice(COMMANDS))
            out = session.send(b"t%d " % n + line + b"\r\n")
            for reply in out.split(b"\r\n"):
                assert not reply.startswith(b"Traceback"), reply
            if session.transport.disconnecting:
                break
            if session.server.literal_left or session.server.line_handler is not None:
                session.send(b"\r\n" * 3 + b"DONE\r\n")
            session.env.clock.advance(3)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not errors, errors[0]
    assert len(session.server.buffer) < 1 << 20


def test_fetch_reads_large_messages_a_few_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imapserver, "FETCH_CHUNK_BYTES", 300)
    env = Env()
    for i in range(4):
        env.deliver(message(i, body="x" * 200 + "\r\n"))
    jobs = []
    run = env.ctx.run

    def counting_run(fn, *args):  # type: ignore[no-untyped-def]
        if fn is imapserver._fetch_work:
            jobs.append(len(args[2]))
        return run(fn, *args)

    env.ctx.run = counting_run
    s = env.selected_session()
    out = s.cmd("f FETCH 1:* (BODY.PEEK[])")
    assert out.count(b" FETCH (") == 4 and out.endswith(b"f OK FETCH completed\r\n")
    assert jobs == [1, 1, 1, 1]


PRELOGIN = [
    'LOGIN "alice" {6+}\r\nsecret',
    "AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==",
    'ID ("name" "x" "version" NIL)',
    "CAPABILITY",
    "STARTTLS",
    "AUTHENTICATE SCRAM-SHA-256 biwsbj1hbGljZSxyPWFiYw==",
]


@pytest.mark.parametrize("seed", range(int(__import__("os").environ.get("IMAP_FUZZ_SEEDS", "6"))))
def test_mutated_commands_before_login(seed: int) -> None:
    rng = random.Random(1000 + seed)
    env = Env()
    session = env.session()
    session.take()
    session.server.ctx.settings.bad_commands_unauth = 10**6
    for n in range(100):
        out = session.send(b"p%d " % n + mutate(rng, rng.choice(PRELOGIN)) + b"\r\n")
        env.clock.advance(3)
        out += session.take()
        assert b"Traceback" not in out and b"SERVERBUG" not in out, out
        if session.transport.disconnecting or session.server.state != "notauth":
            break
        if session.server.literal_left or session.server.line_handler is not None:
            session.send(b"*\r\n")
    assert len(session.server.buffer) <= 8192 + 100


def test_many_small_literals_in_one_command_are_refused() -> None:
    """An APPEND made of endless small literals must not grow without bound."""
    env = Env()
    s = env.session()
    s.login()
    out = s.send(b"a APPEND INBOX" + b" {1+}\r\nx" * 40 + b"\r\nb NOOP\r\n")
    assert out == b"a BAD Too many literals in one command\r\nb OK NOOP completed\r\n"
    assert not s.server.fragments


def test_large_append_is_spooled_to_a_file_and_stored() -> None:
    from mailserv.imap.server import Settings

    env = Env(Settings(spool_threshold=64))
    s = env.session()
    s.login()
    body = message(1, body="y" * 500 + "\r\n")
    assert s.cmd(f"a APPEND INBOX {{{len(body)}}}") == b"+ Ready for literal data\r\n"
    assert s.server.literal_spooled
    out = s.send(body[:100])
    assert out == b""
    out = s.send(body[100:] + b"\r\n")
    assert out == b"a OK [APPENDUID 1000 1] APPEND completed\r\n"
    assert env.store.account("alice").folders["INBOX"].messages[1][0] == body
