"""Mail addresses: RFC 5321 paths, RFC 6531 (SMTPUTF8) and normalisation.

The grammar follows RFC 5321 §4.1.2 strictly (no trailing dots, no empty
labels, length limits of §4.5.3.1), extended by RFC 6531 §3.3 with UTF-8 in
atoms, quoted strings and U-label domains.  Domains are normalised to
lower-case A-labels (IDNA 2008 with UTS #46 mapping) so that case and IDN
variants of a local domain compare equal.  Local parts keep their case; the
``key`` of an address lower-cases them for directory lookups.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import idna

MAX_LOCAL_PART = 64  # RFC 5321 §4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 §4.5.3.1.2
MAX_PATH = 256  # RFC 5321 §4.5.3.1.3


class AddressError(ValueError):
    """An address that does not follow the RFC 5321/6531 grammar."""


_ATEXT = "A-Za-z0-9!#$%&'*+\\-/=?^_`{|}~"
_ATOM_ASCII = re.compile(rf"[{_ATEXT}]+\Z")
_DOT_STRING = re.compile(rf"[{_ATEXT}\u0080-\U0010ffff]+(?:\.[{_ATEXT}\u0080-\U0010ffff]+)*\Z")
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\Z")
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")


@dataclass(frozen=True)
class Address:
    """A mailbox ``local@domain``.

    ``local`` is the unquoted local part (RFC 5321 §4.1.2: a quoted string and
    its dot-string form are the same mailbox); ``domain`` is the lower-case
    A-label form, or an address literal in brackets.  ``unicode_domain`` is
    the U-label form used when the address is shown to SMTPUTF8 peers.
    """

    local: str
    domain: str
    unicode_domain: str = ""

    def __str__(self) -> str:
        return f"{quote_local(self.local)}@{self.domain}"

    @property
    def key(self) -> str:
        """The lookup form: lower-cased local part @ A-label domain."""
        return f"{self.local.lower()}@{self.domain}"

    @property
    def needs_smtputf8(self) -> bool:
        """True when the address cannot be written in ASCII (RFC 6531 §3.3)."""
        return not self.local.isascii() or (
            bool(self.unicode_domain) and not self.unicode_domain.isascii()
        )

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")

    def display(self) -> str:
        """The form to write into headers of an internationalised message."""
        return f"{quote_local(self.local)}@{self.unicode_domain or self.domain}"


def quote_local(local: str) -> str:
    """The RFC 5321 §4.1.2 form of a local part: a dot-string, else a quoted string."""
    if _DOT_STRING.match(local):
        return local
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def normalise_domain(domain: str, allow_utf8: bool = True) -> tuple[str, str]:
    """(A-label form, U-label form) of a domain, lower-cased; AddressError if invalid.

    RFC 5321 §4.1.2 ``Domain``; U-labels per RFC 6531 §3.3 when ``allow_utf8``.
    """
    if not domain or len(domain) > MAX_DOMAIN:
        raise AddressError("bad domain length")
    labels = domain.split(".")
    if domain.isascii():
        for label in labels:
            if not _LDH_LABEL.match(label) or len(label) > 63:
                raise AddressError(f"bad domain {domain!r}")
        ascii_form = domain.lower()
        if "xn--" in ascii_form:
            try:
                unicode_form = idna.decode(ascii_form)
            except idna.IDNAError as exc:
                raise AddressError(f"bad IDN domain: {exc}") from None
        else:
            unicode_form = ascii_form
        return ascii_form, unicode_form
    if not allow_utf8:
        raise AddressError("non-ASCII domain without SMTPUTF8")
    if any(not label for label in labels):
        raise AddressError(f"bad domain {domain!r}")
    try:
        ascii_form = idna.encode(domain, uts46=True).decode("ascii")
        unicode_form = idna.decode(ascii_form)
    except (idna.IDNAError, UnicodeError) as exc:
        raise AddressError(f"bad IDN domain: {exc}") from None
    if len(ascii_form) > MAX_DOMAIN:
        raise AddressError("bad domain length")
    return ascii_form.lower(), unicode_form


def _parse_literal(text: str) -> str:
    """RFC 5321 §4.1.3 address literal, normalised ``[192.0.2.1]`` / ``[IPv6:...]``."""
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError:
        raise AddressError(f"bad address literal {text!r}") from None


def _unquote(quoted: str, allow_utf8: bool) -> str:
    """The content of an RFC 5321 Quoted-string (qtextSMTP / quoted-pairSMTP)."""
    out = []
    i = 1
    end = len(quoted) - 1
    while i < end:
        ch = quoted[i]
        if ch == "\\":
            if i + 1 >= end:
                raise AddressError("bad quoted-pair")
            nxt = quoted[i + 1]
            if not (" " <= nxt <= "~"):
                raise AddressError("bad quoted-pair")
            out.append(nxt)
            i += 2
            continue
        if ch == '"':
            raise AddressError("unescaped quote in quoted string")
        if not (" " <= ch <= "~") and not (allow_utf8 and ord(ch) >= 0x80):
            raise AddressError("bad character in quoted string")
        out.append(ch)
        i += 1
    return "".join(out)


def parse_mailbox(text: str, allow_utf8: bool = True) -> Address:
    """Parse an RFC 5321 ``Mailbox`` (``local@domain``), no angle brackets."""
    if text.startswith('"'):
        # Find the closing quote, skipping quoted pairs.
        i = 1
        while i < len(text):
            if text[i] == "\\":
                i += 2
                continue
            if text[i] == '"':
                break
            i += 1
        else:
            raise AddressError("unterminated quoted string")
        quoted, rest = text[: i + 1], text[i + 1 :]
        if not rest.startswith("@"):
            raise AddressError("missing @domain")
        local = _unquote(quoted, allow_utf8)
        domain_text = rest[1:]
    else:
        local, at, domain_text = text.rpartition("@")
        if not at:
            raise AddressError("missing @domain")
        if not _DOT_STRING.match(local):
            raise AddressError(f"bad local part {local!r}")
        if not allow_utf8 and not local.isascii():
            raise AddressError("non-ASCII local part without SMTPUTF8")
    if not local or len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("bad local part length")
    if domain_text.startswith("[") and domain_text.endswith("]"):
        literal = _parse_literal(domain_text)
        return Address(local, literal, literal)
    ascii_domain, unicode_domain = normalise_domain(domain_text, allow_utf8)
    return Address(local, ascii_domain, unicode_domain)


def path_end(text: str) -> int:
    """Index just after the ``<...>`` path that starts ``text`` (quoted strings honoured).

    Without a leading ``<`` the path is taken to run to the first space.
    Returns ``len(text)`` for an unterminated path.
    """
    if not text.startswith("<"):
        end = text.find(" ")
        return len(text) if end < 0 else end
    in_quote = False
    i = 1
    while i < len(text):
        ch = text[i]
        if in_quote and ch == "\\":
            i += 2
            continue
        if ch == '"':
            in_quote = not in_quote
        elif ch == ">" and not in_quote:
            return i + 1
        i += 1
    return len(text)


def _split_path(text: str) -> tuple[str, str]:
    """Split ``<path> params`` at the closing bracket."""
    if not text.startswith("<"):
        raise AddressError("path must be in angle brackets")
    end = path_end(text)
    if end > len(text) or text[end - 1 : end] != ">" or end < 2:
        raise AddressError("unterminated path")
    return text[1 : end - 1], text[end:]


def parse_path(text: str, allow_utf8: bool = True) -> tuple[Address | None, str]:
    """Parse ``<path> [params]`` of MAIL FROM / RCPT TO (RFC 5321 §4.1.2).

    Returns (address or None for the null path ``<>``, the rest of the line).
    A source route (``<@a,@b:user@c>``) is accepted and ignored as §4.1.1.3
    and appendix C ask; only the final mailbox is ever used.
    """
    inner, rest = _split_path(text)
    if len(inner) + 2 > MAX_PATH:
        raise AddressError("path too long")
    if rest and not rest.startswith(" "):
        raise AddressError("garbage after path")
    if inner == "":
        return None, rest.strip(" ")
    if inner.startswith("@"):
        route, colon, mailbox = inner.partition(":")
        if not colon:
            raise AddressError("bad source route")
        for hop in route.split(","):
            if not hop.startswith("@"):
                raise AddressError("bad source route")
            normalise_domain(hop[1:], allow_utf8)
        inner = mailbox
    return parse_mailbox(inner, allow_utf8), rest.strip(" ")


def parse_params(text: str) -> dict[str, str | None]:
    """ESMTP parameters ``KEY[=VALUE] ...`` (RFC 5321 §4.1.2), keys upper-cased.

    Raises AddressError on a malformed or repeated keyword.
    """
    out: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _ESMTP_KEYWORD.match(key):
            raise AddressError(f"bad parameter {item!r}")
        key = key.upper()
        if key in out:
            raise AddressError(f"duplicate parameter {key}")
        if eq:
            if not value or any(ch == "=" or ord(ch) < 33 or ord(ch) == 127 for ch in value):
                raise AddressError(f"bad value for {key}")
            out[key] = value
        else:
            out[key] = None
    return out


def xtext_decode(text: str) -> str:
    """Decode RFC 3461 §4 xtext (``+XX`` hex escapes)."""
    out = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "+":
            hexpart = text[i + 1 : i + 3]
            if len(hexpart) != 2 or not all(c in "0123456789ABCDEF" for c in hexpart):
                raise AddressError("bad xtext escape")
            out.append(chr(int(hexpart, 16)))
            i += 3
            continue
        if not ("!" <= ch <= "~") or ch == "=":
            raise AddressError("bad xtext character")
        out.append(ch)
        i += 1
    return "".join(out)


def xtext_encode(text: str) -> str:
    """Encode RFC 3461 §4 xtext."""
    return "".join(f"+{ord(ch):02X}" if ch in "+=" or not ("!" <= ch <= "~") else ch for ch in text)


def split_detail(local: str, delimiter: str = "+") -> tuple[str, str | None]:
    """``user+detail`` → (``user``, ``detail``) (RFC 5233 subaddressing)."""
    if not delimiter:
        return local, None
    base, sep, detail = local.partition(delimiter)
    if not sep or not base:
        return local, None
    return base, detail or None


def parse_header_addresses(value: str) -> list[Address]:
    """The addr-specs of an RFC 5322 address-list header (From, Sender), leniently.

    Unparseable entries are skipped; the caller decides what an empty list means.
    """
    from email.utils import getaddresses

    out = []
    for _name, spec in getaddresses([value]):
        if not spec:
            continue
        try:
            out.append(parse_mailbox(spec))
        except AddressError:
            continue
    return out


def is_atom(text: str) -> bool:
    """True for an RFC 5321 Atom of ASCII atext."""
    return bool(_ATOM_ASCII.match(text))
