"""URI blocklists: linked domains (decoded text parts) looked up SURBL-style."""

from __future__ import annotations

from typing import Any

import pytest_twisted

from mailserv.filters.base import Action
from mailserv.filters.uribl import extract_domains
from tests.filters.conftest import crlf

QP = crlf(
    "From: a@s.test\n"
    "Subject: offer\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/alternative; boundary="b"\n'
    "\n"
    "--b\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "Content-Transfer-Encoding: quoted-printable\n"
    "\n"
    "Visit https://shop.bad-domain.example.co.uk/path?x=3D1 or www.fine.test=\n"
    "/ today\n"
    "--b\n"
    "Content-Type: text/html; charset=utf-8\n"
    "Content-Transfer-Encoding: base64\n"
    "\n"
    "PGEgaHJlZj0iaHR0cDovL3VzZXJAMTkyLjAuMi44OS9wIj5jbGljazwvYT4=\n"
    "--b--\n"
)


def test_domains_from_decoded_parts() -> None:
    # base64 part: <a href="http://user@192.0.2.89/p">click</a>
    assert extract_domains(QP, 10) == ["example.co.uk", "fine.test", "89.2.0.192"]
    assert extract_domains(QP, 1) == ["example.co.uk"]


@pytest_twisted.inlineCallbacks
def test_listed_link_rejected_or_tagged(filter_env: Any, dns_server: Any) -> Any:
    dns_server.set(
        {
            "example.co.uk.multi.surbl.test": {"A": ["127.0.0.2"], "TXT": ["phishing"]},
            "89.2.0.192.multi.surbl.test": {"A": ["127.0.0.64"]},
        }
    )
    session = filter_env.session()
    envelope = filter_env.envelope("a@s.test", "bob@example.org")
    flt = filter_env.build("uribl", zones=["multi.surbl.test"])
    verdict = yield flt.check_message(session, envelope, filter_env.message(QP))
    assert verdict.action is Action.REJECT
    assert verdict.smtp_reply().text == (
        "Message contains a link to example.co.uk listed in multi.surbl.test; phishing"
    )
    flt = filter_env.build("uribl", zones=["multi.surbl.test"], action="tag", threshold=2)
    verdict = yield flt.check_message(session, envelope, filter_env.message(QP))
    assert verdict.action is Action.CONTINUE
    assert verdict.headers == (
        (
            "X-Mailserv-URIBL",
            "example.co.uk in multi.surbl.test, 89.2.0.192 in multi.surbl.test",
        ),
    )
    flt = filter_env.build("uribl", zones=["multi.surbl.test"], threshold=3)
    verdict = yield flt.check_message(session, envelope, filter_env.message(QP))
    assert verdict.action is Action.CONTINUE and verdict.headers == ()


def test_link_scan_finds_what_a_full_regex_scan_finds() -> None:
    """``_link_hosts`` scans the lowercased text: the same links as a case-insensitive finditer."""
    import random

    from mailserv.filters import uribl

    rng = random.Random(9)
    pieces = ["http://", "https://", "www.", "HTTP://", "Www.", "a", ".", "/", " ", "\n"]
    pieces += ["x.example", "user@", "[1.2.3.4]", "-", "ahttp://b.c", "swww.d.e", "://", ":"]
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        full = [
            (m.group(1).lower(), m.group(0)[:4].lower() == "www.")
            for m in uribl._URL.finditer(text)
        ]
        found = [(host.lower(), www) for host, www in uribl._link_hosts(text)]
        assert list(dict.fromkeys(found)) == list(dict.fromkeys(full)), text


def test_link_scan_of_http_links_whose_hosts_begin_with_www() -> None:
    """Texts whose every "www." begins an http(s) link's host take the http branch alone;
    a "www." anywhere else (bare, in a path, a user part, a longer host) takes both
    branches: either way the links of a full case-insensitive scan."""
    import random

    from mailserv.filters import uribl

    rng = random.Random(12)
    links = [
        "https://www.a.example/p",
        "http://www.b.test",
        "https://c.example/x?y",
        "HTTP://WWW.D.E",
    ]
    others = [
        "www.bare.test",
        "https://e.test/www.f.test",
        "https://www.g@h.test",
        "xhttp://www.i.j",
    ]
    others += ["https://www.www.k.test", "https://wwww.l.test", "\u017f", " ", "\n", "a", "/", "."]
    for _ in range(5000):
        pool = links + (others if rng.random() < 0.5 else [" ", "\n", "see "])
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 25)))
        full = [
            (m.group(1).lower(), m.group(0)[:4].lower() == "www.")
            for m in uribl._URL.finditer(text)
        ]
        found = [(host.lower(), www) for host, www in uribl._link_hosts(text)]
        assert found == list(dict.fromkeys(full)), text


def _reference_domains(text: str, limit: int) -> list[str]:
    """The registered domains of a full case-insensitive ``_URL`` scan, in order, deduplicated."""
    from mailserv.filters import uribl

    found: dict[str, None] = {}
    seen: set[tuple[str, bool]] = set()
    for match in uribl._URL.finditer(text):
        host = (match.group(1), match.group(0)[:4].lower() == "www.")
        if host in seen:
            continue
        seen.add(host)
        name = uribl._host_name(*host)
        if name:
            found.setdefault(name, None)
            if len(found) >= limit:
                break
    return list(found)


def test_domain_scan_finds_what_a_case_insensitive_scan_finds() -> None:
    import random

    from mailserv.filters import uribl

    rng = random.Random(11)
    pieces = ["http://", "https://", "HTTPS://", "www.", "Www.", "WWW.", "hTTp://", "http\u017f://"]
    pieces += ["x.Example", "EXAMPLE.net", "a.b.co.uk", "user@", "[1.2.3.4]", "[::1]", "[AB::Cd]"]
    pieces += [
        "a",
        ".",
        "/",
        " ",
        "\n",
        "-",
        ":",
        "ahttp://b.c",
        "swww.d.e",
        "é",
        "İ",
        "K",
        "_www.x",
        "1http://y",
    ]
    pieces += ["bücher.example", "ß", "?", "#", "<", ">", '"', "'", "(", ")"]
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        for limit in (1, 3, 20):
            assert uribl._domains_in([text], limit) == _reference_domains(text, limit), text


@pytest_twisted.inlineCallbacks
def test_a_small_message_with_cached_answers_is_answered_at_once(
    filter_env: Any, dns_server: Any
) -> Any:
    from mailserv.filters.base import Verdict
    from tests.filters.conftest import crlf

    dns_server.set({"listed.test.now.surbl.test": {"A": ["127.0.0.2"], "TXT": ["bad"]}})
    flt = filter_env.build("uribl", zones=["now.surbl.test"], action="tag")
    raw = crlf("Subject: x\n\nsee http://www.listed.test/ and https://clean.test/x\n")
    session = filter_env.session()
    envelope = filter_env.envelope("a@s.test", "bob@example.org")
    first = yield flt.check_message(session, envelope, filter_env.message(raw, memory=True))
    again = flt.check_message(session, envelope, filter_env.message(raw, memory=True))
    assert isinstance(again, Verdict)
    assert (again.action, again.headers) == (first.action, first.headers)
    assert again.headers == (("X-Mailserv-URIBL", "listed.test in now.surbl.test"),)


@pytest_twisted.inlineCallbacks
def test_the_lookups_start_with_the_message_stage(filter_env: Any, dns_server: Any) -> Any:
    """``prefetch`` (called by the chain when the message stage starts, beside DKIM's and
    DMARC's lookups) scans the body and starts the blocklist lookups; check_message takes
    those answers instead of asking again.  The next message asks again."""
    from twisted.internet import defer, reactor, task

    dns_server.set({"early.test.pre.surbl.test": {"A": ["127.0.0.2"], "TXT": ["bad"]}})
    flt = filter_env.build("uribl", zones=["pre.surbl.test"])
    flt.resolver.plain.cache = None  # every lookup goes to the server (cache_size = 0)
    raw = crlf("Subject: x\n\nsee http://www.early.test/\n")
    session = filter_env.session()
    envelope = filter_env.envelope("a@s.test", "bob@example.org")
    message = filter_env.message(raw, memory=True)
    flt.prefetch(session, envelope, message)
    yield task.deferLater(reactor, 0.05, lambda: None)  # the answer has arrived
    dns_server.set({})
    verdict = yield defer.maybeDeferred(flt.check_message, session, envelope, message)
    assert verdict.action is Action.REJECT  # the prefetched answer, not a second lookup
    envelope2 = filter_env.envelope("a@s.test", "bob@example.org")
    verdict = yield defer.maybeDeferred(flt.check_message, session, envelope2, message)
    assert verdict.action is Action.CONTINUE
