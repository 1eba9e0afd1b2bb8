"""The filter chain alone, in-process: CPU per message of its stages, and of each filter.

bench/filters.py measures the whole server (SMTP, the chain, delivery helpers)
against the bare MX path: the figure of the goal.  This one runs the same
pipeline (bench/filters.py's PIPELINE, the same messages, the same loopback DNS
server) without SMTP and delivery, with a real reactor and resolver: the MAIL,
RCPT and message stages of each message, 50 messages per session, after 50
warm-up messages.  The figure is this process's CPU time (user + system) per
message; the DNS server runs in its own process and is not counted.  With
``--per-filter`` each filter's calls are timed too (the synchronous part of
each call: work a filter does in a callback later, such as a verdict made when
a lookup answers, counts towards the filter or job that fired it; the inline
jobs are timed as ``dkim._verify_inline`` and ``rules._inline``): where the
chain's time goes, to the microsecond, without a profiler's distortion.

    .venv/bin/python bench/chain.py [--messages 3000] [--cold] [--per-filter]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from twisted.internet import defer, task  # noqa: E402

from bench.filters import PIPELINE, make_message  # noqa: E402
from mailserv.address import parse_mailbox  # noqa: E402
from mailserv.config import parse_config  # noqa: E402
from mailserv.envelope import (  # noqa: E402
    Envelope,
    Message,
    Recipient,
    Session,
    parse_header_section,
)
from mailserv.filters.chain import FilterChain  # noqa: E402
from mailserv.filters.registry import build_filter  # noqa: E402
from tests.conftest import DNSServer  # noqa: E402
from tests.filters.conftest import FakeService, Keys  # noqa: E402

CONFIG = """config_version = 1
hostname = "mx.example.org"
domains = ["example.test"]
state_dir = "{state}"
[store]
path = "{state}/mail/{{localpart}}"
[dns]
nameservers = ["{dns}"]
timeout = "2s"
cache_size = {cache}
"""
METHODS = (
    "check_connect",
    "check_helo",
    "check_sender",
    "check_recipient",
    "check_message",
    "prefetch",
    "message_job",
    "_verify_inline",
    "_inline",
)
WARM_UP = 50
PER_SESSION = 50


def timed(flt: Any, method: str, spent: collections.Counter[str]) -> None:
    """Replace ``flt.method`` by a version that adds its time to ``spent``."""
    call = getattr(flt, method, None)
    if call is None:
        return
    name = f"{flt.name}.{method}"

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - started

    setattr(flt, method, wrapper)


def message_of(raw: bytes) -> Message:
    """A small message held in memory, as the SMTP server's spool gives it."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    return Message(None, len(raw), parse_header_section(head + b"\r\n"), data=raw, crlf=True)


@defer.inlineCallbacks
def run(reactor: Any, args: argparse.Namespace) -> Any:
    work = Path(tempfile.mkdtemp(prefix="bench-chain-"))
    keys = Keys()
    dns = DNSServer(work)
    dns.set(
        {
            "sender.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
            "_dmarc.sender.test": {"TXT": ["v=DMARC1; p=reject"]},
            **keys.records("sender.test"),
        }
    )
    try:
        state = work / "state"
        state.mkdir()
        cache = 0 if args.cold else 10_000
        config = parse_config(CONFIG.format(state=state, dns=dns.address, cache=cache))
        service = FakeService(config, reactor)
        filters = [
            build_filter(e["filter"], {k: v for k, v in e.items() if k != "filter"}, service)
            for e in PIPELINE
        ]
        spent: collections.Counter[str] = collections.Counter()
        if args.per_filter:
            for flt in filters:
                for method in METHODS:
                    timed(flt, method, spent)
        chain = FilterChain(filters, reactor, "inbound")
        messages = [make_message(keys, i) for i in range(args.messages + WARM_UP)]
        sender = parse_mailbox("alice@sender.test")
        session: Session | None = None
        # The warm-up (imports, caches, the session's SPF result), then the measured run.
        for numbers in (range(args.messages, args.messages + WARM_UP), range(args.messages)):
            spent.clear()
            cpu, wall = time.process_time(), time.perf_counter()
            for i in numbers:
                if session is None or i % PER_SESSION == 0:
                    session = Session(
                        id=f"s{i}",
                        listener="mx",
                        protocol="smtp",
                        peer_host="192.0.2.10",
                        helo="mail.sender.test",
                    )
                    yield chain.connect(session)
                    yield chain.helo(session)
                envelope = Envelope(id=f"e{i}", mail_from=sender)
                recipient = Recipient(parse_mailbox("bob@example.test"))
                yield chain.sender(session, envelope)
                yield chain.recipient(session, envelope, recipient)
                envelope.recipients.append(recipient)
                result = yield chain.message(session, envelope, message_of(messages[i]))
                assert result.verdict is None or not result.verdict.final, result.verdict
        count = len(numbers)
        cpu_us = (time.process_time() - cpu) * 1e6 / count
        wall_us = (time.perf_counter() - wall) * 1e6 / count
        print(
            f"{count} messages, cache {'cold' if args.cold else 'warm'}: "
            f"{cpu_us:.1f} us CPU per message ({wall_us:.1f} us wall)"
        )
        for name, seconds in spent.most_common():
            print(f"  {name:28} {seconds * 1e6 / count:7.1f} us")
    finally:
        dns.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--cold", action="store_true", help="[dns] cache_size = 0")
    parser.add_argument("--per-filter", action="store_true", help="time each filter's calls")
    args = parser.parse_args()
    task.react(lambda reactor: run(reactor, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
