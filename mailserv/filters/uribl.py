"""URI blocklists (SURBL style): domains of links in the body looked up in DNS zones.

The text parts of the message (quoted-printable and base64 decoded, at most
``max_body_bytes``) are scanned for http(s) and www links; each host is
reduced to its registered domain with the Public Suffix List (as SURBL
lists them) or, for address literals, to the reversed address, and looked
up as ``<domain>.<zone>``.  At most ``max_domains`` distinct names are
checked per message.  Zones, weights, return codes and actions are as for
``dnsbl``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from email import policy
from email.parser import BytesParser
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from mailserv.config.schema import Section, choice, integer, list_of, option, size
from mailserv.filters.base import CONTINUE, FilterBase
from mailserv.filters.common import (
    Pending,
    action_kind,
    clean,
    gather,
    header_name,
    load_options,
    outcome,
    resolver_for,
    results_for,
    run_on_message,
    then,
)
from mailserv.filters.dmarc import organizational_domain
from mailserv.filters.dnsbl import Zone, cached_result, query_zones, reversed_name, zone_kind
from mailserv.interfaces import IMessageFilter

_URL = re.compile(
    r"(?i)(?:\bhttps?://(?:[^\s/@<>\"']{0,256}@)?|\bwww\.)"
    r"(\[[0-9a-f:.]{2,45}\]|[^\s/:?#<>\"'\[\]()]{1,253})"
)


def _host_name(raw: str, had_www: bool) -> str | None:
    host = raw.strip(".").lower()
    if had_www:
        host = "www." + host
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
        return reversed_name(host)
    except ValueError:
        pass
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        return None
    if "." not in host or not re.fullmatch(r"[a-z0-9.-]+", host):
        return None
    return organizational_domain(host)


def _needs_mime_parsing(raw: bytes) -> bool:
    head = raw.split(b"\r\n\r\n", 1)[0].lower()
    return b"content-transfer-encoding" in head or b"multipart/" in head


def extract_domains(raw: bytes, limit: int) -> list[str]:
    """The distinct registered domains (or reversed addresses) linked in the text parts."""
    texts: list[str] = []
    if not _needs_mime_parsing(raw):  # a plain 7bit/8bit text message: scan the body as is
        texts.append(raw.partition(b"\r\n\r\n")[2].decode("utf-8", "replace"))
        return _domains_in(texts, limit)
    message = BytesParser(policy=policy.default).parsebytes(raw)
    for part in message.walk():
        if part.get_content_maintype() != "text":
            continue
        try:
            content = part.get_content()
        except (LookupError, ValueError, AssertionError):
            payload = part.get_payload(decode=True)
            content = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
        if isinstance(content, str):
            texts.append(content)
    return _domains_in(texts, limit)


# The same pattern for text already lowercased, without re.IGNORECASE (slow to try at
# every position): U+017F (long s) is the one character re.IGNORECASE also takes for
# one of its letters.  Each branch starts with its letter, so that the engine skips
# positions holding neither "h" nor "w"; the word boundary before it is checked
# after it ("h(?<!\wh)": no word character before the "h").  ``findall`` gives
# (www, host) for each link, scanned in C.
_URL_LOWER = re.compile(
    r"(?:h(?<!\wh)ttp[s\u017f]?://(?:[^\s/@<>\"']{0,256}@)?|(w(?<!\ww)ww\.))"
    r"(\[[0-9a-f:.]{2,45}\]|[^\s/:?#<>\"'\[\]()]{1,253})"
)
# Its first branch alone, starting with the literal "http": the engine then finds the
# candidates with a substring search instead of trying its first-character set at
# every position (~8 against ~37 us on a 4 KiB body of 55 links).
_HTTP_LOWER = re.compile(
    r"http(?<!\whttp)[s\u017f]?://(?:[^\s/@<>\"']{0,256}@)?"
    r"(\[[0-9a-f:.]{2,45}\]|[^\s/:?#<>\"'\[\]()]{1,253})"
)


def _link_hosts(text: str) -> list[tuple[str, bool]]:
    """(host, after "www.") of each link in ``text``, in order, as ``_URL.finditer`` finds them.

    Scanned in the lowercased text when lowercasing keeps every character one
    character (so the case-insensitive scan of the text and the plain scan of
    its lowercase try the same positions); hosts come out lowercased, which is
    how they are used.

    When every "www." of the text begins the host of an http(s) link (links such as
    https://www.example.net/, or no "www." at all), the links are exactly those of
    the http branch alone: each such "www." lies in the span of its link, which the
    scan with both branches reaches first and consumes, so the "www." branch never
    matches.  Any other "www." (a bare www link, one in a path or user part) takes
    the scan with both branches.
    """
    low = text.lower()
    if len(low) == len(text):
        bare = low.count("www.")
        if bare:
            hosts = _HTTP_LOWER.findall(low)
            # Hosts hold no whitespace: a "\nwww." per host that begins with "www.".
            if bare == ("\n" + "\n".join(hosts)).count("\nwww."):
                return [(host, False) for host in dict.fromkeys(hosts)]
        elif "http" in low:
            return [(host, False) for host in dict.fromkeys(_HTTP_LOWER.findall(low))]
        else:
            return []
        return [(host, bool(www)) for www, host in dict.fromkeys(_URL_LOWER.findall(low))]
    return [(m.group(1), m.group(0)[:4].lower() == "www.") for m in _URL.finditer(text)]


def _domains_in(texts: list[str], limit: int) -> list[str]:
    found: dict[str, None] = {}
    seen: set[tuple[str, bool]] = set()
    for text in texts:
        for host in _link_hosts(text):
            if host in seen:
                continue
            seen.add(host)
            name = _host_name(*host)
            if name:
                found.setdefault(name, None)
                if len(found) >= limit:
                    return list(found)
    return list(found)


def _read(message: Any, max_bytes: int) -> bytes:
    with message.open() as f:
        return f.read(max_bytes)


class URIBLOptions(Section):
    """Keys of ``filter = "uribl"``."""

    zones: list[Zone] = option(list_of(zone_kind, nonempty=True))
    threshold: int = option(integer(1), 1)
    action: str = option(action_kind, "reject")
    on_dns_error: str = option(choice("ignore", "tempfail"), "ignore")
    max_domains: int = option(integer(1, 1000), 20)
    max_body_bytes: int = option(size, 1024 * 1024)
    header: str = option(header_name, "X-Mailserv-URIBL")


# session.notes key: (envelope id, (domains, answers) | Pending of them) started by prefetch.
PREFETCHED = "uribl_prefetched"


@implementer(IMessageFilter)
class URIBLFilter(FilterBase):
    """Check the domains linked in the message against URI blocklists."""

    name = "uribl"
    default_timeout = 20.0

    def __init__(self, options: Mapping[str, Any] | None = None, service: Any = None) -> None:
        super().__init__(options, service)
        self.config = load_options(URIBLOptions, self.options)
        self.resolver = resolver_for(service)
        self.threads = service.threads

    def _domains(self, message: Any) -> list[str]:
        raw = _read(message, self.config.max_body_bytes)
        return extract_domains(raw, self.config.max_domains)

    def _start(self, message: Any) -> Any:
        """(domains, blocklist answers) of ``message``: at once for a small message in
        memory whose answers are cached, else a Deferred of them."""
        domains = run_on_message(self.threads, "crypto", self._domains, message)
        if isinstance(domains, defer.Deferred):
            return domains.addCallback(self._look_up)
        return self._look_up(domains)

    def _look_up(self, domains: list[str]) -> Any:
        zones = self.config.zones
        lookups: list[Any] = [cached_result(self.resolver, name, zones) for name in domains]
        if any(result is None for result in lookups):
            queries = [query_zones(self.resolver, name, zones) for name in domains]
            return gather(queries).addCallback(lambda found: (domains, found))
        return domains, lookups

    def prefetch(self, session: Any, envelope: Any, message: Any) -> None:
        """Scan the body and start the lookups when the message stage starts (the chain
        calls this beside the DKIM key's and DMARC's lookups): a message's queries leave
        together, and their answers come back together, instead of these waiting for
        the filters before this one.  Forged Authentication-Results removed by the
        headers filter in between change no link: the body is the same."""
        started = self._start(message)
        if isinstance(started, defer.Deferred):
            started = Pending(started)
        session.notes[PREFETCHED] = (envelope.id, started)

    def check_message(self, session: Any, envelope: Any, message: Any) -> Any:
        """The verdict at once for a small message in memory whose blocklist answers
        are cached, else a Deferred of it."""
        started = session.notes.pop(PREFETCHED, None)
        if started is not None and started[0] == envelope.id:
            found = started[1]
            if isinstance(found, Pending):
                found = found.get()
        else:
            found = self._start(message)
        return then(found, self._checked, session, envelope)

    def _checked(self, found: tuple[list[str], list[Any]], session: Any, envelope: Any) -> Any:
        domains, lookups = found
        if not domains:
            return CONTINUE
        return self._verdict(lookups, domains, session, envelope)

    def _verdict(self, lookups: list[Any], domains: list[str], session: Any, envelope: Any) -> Any:
        cfg = self.config
        listed = []
        score = 0
        errors = False
        for name, result in zip(domains, lookups, strict=True):
            errors = errors or bool(result.errors)
            if result.listings:
                score += result.score
                listed.append((name, result.listings))
        if errors and cfg.on_dns_error == "tempfail":
            return outcome(
                "tempfail",
                "URI blocklist lookup failed",
                (451, "4.4.3", "URI blocklist lookup failed, try again later"),
            )
        if score < cfg.threshold:
            return CONTINUE
        name, listings = listed[0]
        text = f"Message contains a link to {name} listed in {listings[0].zone}"
        if listings[0].reason:
            text += f"; {listings[0].reason}"
        detail = ", ".join(f"{n} in {'/'.join(item.zone for item in ls)}" for n, ls in listed)
        return outcome(
            cfg.action,
            clean(text, 300),
            (554, "5.7.1", clean(text, 300)),
            ((cfg.header, clean(detail, 300)),),
            results_for(session, envelope).quarantine.append,
        )
