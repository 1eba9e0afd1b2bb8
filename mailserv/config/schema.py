"""A small declarative schema for TOML configuration.

A ``Section`` subclass declares its keys with ``option(kind, default)``;
``Section.load(raw, ctx, path)`` validates a TOML table into an instance and
records every problem in ``ctx`` (with the file and the dotted key) instead
of stopping at the first, so that an operator sees all mistakes at once.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from mailserv.errors import ConfigError, ConfigProblem

REQUIRED: Any = object()

_T = TypeVar("_T", bound="Section")


class Invalid(Exception):
    """Raised by a kind when a value is wrong; the message says what was expected."""


class Context:
    """Collects problems while a configuration is validated."""

    def __init__(self, file: str = "") -> None:
        self.file = file
        self.problems: list[ConfigProblem] = []

    def error(self, key: str, message: str) -> None:
        self.problems.append(ConfigProblem(self.file, key, message))

    def raise_if_errors(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


Kind = Callable[[Any, Context, str], Any]
"""A kind converts a raw TOML value; raises Invalid, or reports nested problems in ctx."""


@dataclass
class Option:
    kind: Kind
    default: Any
    doc: str = ""
    name: str = ""


def option(kind: Kind, default: Any = REQUIRED, doc: str = "") -> Any:
    """Declare a key of a Section.  Typed Any so that attributes keep their real annotations."""
    return Option(kind, default, doc)


def _describe(value: Any) -> str:
    return repr(value) if not isinstance(value, dict) else "a table"


class Section:
    """A validated TOML table."""

    _options: ClassVar[dict[str, Option]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        options: dict[str, Option] = {}
        for base in reversed(cls.__mro__[1:]):
            options.update(getattr(base, "_options", {}))
        for name, value in list(vars(cls).items()):
            if isinstance(value, Option):
                value.name = name
                options[name] = value
                delattr(cls, name)
        cls._options = options

    def __init__(self, **values: Any) -> None:
        for name, opt in self._options.items():
            if name in values:
                setattr(self, name, values.pop(name))
            elif opt.default is not REQUIRED:
                default = opt.default() if callable(opt.default) else opt.default
                setattr(self, name, default)
            else:
                raise TypeError(f"{type(self).__name__}: missing {name}")
        if values:
            raise TypeError(f"{type(self).__name__}: unknown {sorted(values)}")

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._options)
        return f"{type(self).__name__}({items})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(
            getattr(self, k) == getattr(other, k) for k in self._options
        )

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def keys(cls) -> list[str]:
        return list(cls._options)

    @classmethod
    def load(cls: type[_T], raw: Any, ctx: Context, path: str = "") -> _T | None:
        """Validate ``raw``; returns None (with problems in ctx) if anything is wrong."""
        if not isinstance(raw, dict):
            ctx.error(path, f"expected a table, got {_describe(raw)}")
            return None
        before = len(ctx.problems)
        values: dict[str, Any] = {}
        check_unknown(raw, cls._options, ctx, path)
        for name, opt in cls._options.items():
            key = f"{path}.{name}" if path else name
            if name not in raw:
                if opt.default is REQUIRED:
                    ctx.error(key, "is required")
                continue
            try:
                values[name] = opt.kind(raw[name], ctx, key)
            except Invalid as exc:
                ctx.error(key, str(exc))
        if len(ctx.problems) > before:
            return None
        try:
            section = cls(**values)
        except TypeError as exc:  # pragma: no cover - a schema bug, not a user error
            ctx.error(path, str(exc))
            return None
        section.validate(ctx, path)
        return section if len(ctx.problems) == before else None

    def validate(self, ctx: Context, path: str) -> None:
        """Cross-key checks of a subclass; report with ``ctx.error``."""


def check_unknown(raw: dict[str, Any], known: Iterable[str], ctx: Context, path: str) -> None:
    known = list(known)
    for key in raw:
        if key in known:
            continue
        full = f"{path}.{key}" if path else key
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        ctx.error(full, f"unknown key{hint}")


# --------------------------------------------------------------------------
# Kinds


def string(value: Any, ctx: Context, key: str) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a string, got {_describe(value)}")
    return value


def nonempty_string(value: Any, ctx: Context, key: str) -> str:
    value = string(value, ctx, key)
    if not value.strip():
        raise Invalid("must not be empty")
    return value


def optional(kind: Kind) -> Kind:
    def convert(value: Any, ctx: Context, key: str) -> Any:
        if value == "":
            return None
        return kind(value, ctx, key)

    return convert


def boolean(value: Any, ctx: Context, key: str) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {_describe(value)}")
    return value


def integer(minimum: int | None = None, maximum: int | None = None) -> Kind:
    def convert(value: Any, ctx: Context, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"expected an integer, got {_describe(value)}")
        if minimum is not None and value < minimum:
            raise Invalid(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise Invalid(f"must be at most {maximum}, got {value}")
        return value

    return convert


def choice(*choices: str) -> Kind:
    def convert(value: Any, ctx: Context, key: str) -> str:
        if value not in choices:
            raise Invalid(f"expected one of {', '.join(choices)}, got {_describe(value)}")
        return str(value)

    return convert


def list_of(kind: Kind, nonempty: bool = False) -> Kind:
    def convert(value: Any, ctx: Context, key: str) -> list[Any]:
        if not isinstance(value, list):
            raise Invalid(f"expected a list, got {_describe(value)}")
        if nonempty and not value:
            raise Invalid("must not be empty")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(kind(item, ctx, f"{key}[{i}]"))
            except Invalid as exc:
                ctx.error(f"{key}[{i}]", str(exc))
        return out

    return convert


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any) -> float:
    """``"5s"``, ``"10m"``, ``"1h"``, ``"5d"``, ``"250ms"`` or a number of seconds."""
    if isinstance(value, bool):
        raise Invalid(f"expected a duration such as '30s' or '5m', got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise Invalid(f"must not be negative, got {value}")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise Invalid(f"expected a duration such as '30s' or '5m', got {_describe(value)}")


def duration(value: Any, ctx: Context, key: str) -> float:
    return parse_duration(value)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)[iI]?[bB]?\s*$")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(value: Any) -> int:
    """``"50M"``, ``"10K"``, ``"1G"`` (binary units) or a number of bytes."""
    if isinstance(value, bool):
        raise Invalid(f"expected a size such as '50M', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise Invalid(f"must not be negative, got {value}")
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    raise Invalid(f"expected a size such as '50M' or a number of bytes, got {_describe(value)}")


def size(value: Any, ctx: Context, key: str) -> int:
    return parse_size(value)


def network(value: Any, ctx: Context, key: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    value = string(value, ctx, key)
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise Invalid(
            f"expected an address or network such as '127.0.0.1/8', got {value!r}"
        ) from None


_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def hostname(value: Any, ctx: Context, key: str) -> str:
    """A DNS host or domain name; internationalised names are stored as A-labels (IDNA)."""
    value = string(value, ctx, key).strip().rstrip(".")
    try:
        ascii_name = value.encode("idna").decode("ascii") if not value.isascii() else value
    except UnicodeError:
        raise Invalid(f"not a valid domain name: {value!r}") from None
    if not _HOSTNAME.match(ascii_name):
        raise Invalid(f"not a valid domain name: {value!r}")
    return ascii_name.lower()


def host_port(default_port: int) -> Kind:
    """``"host"``, ``"host:port"`` or ``"[v6]:port"``."""

    def convert(value: Any, ctx: Context, key: str) -> tuple[str, int]:
        value = string(value, ctx, key).strip()
        host, port = value, default_port
        if value.startswith("["):
            end = value.find("]")
            if end < 0:
                raise Invalid(f"unbalanced '[' in {value!r}")
            host = value[1:end]
            rest = value[end + 1 :]
            if rest:
                if not rest.startswith(":"):
                    raise Invalid(f"expected [address]:port, got {value!r}")
                port = _port(rest[1:], value)
        elif value.count(":") == 1:
            host, port_text = value.split(":")
            port = _port(port_text, value)
        if not host:
            raise Invalid(f"missing host in {value!r}")
        return host, port

    return convert


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise Invalid(f"bad port in {whole!r}")
    return int(text)


def table_of(section: type[Section]) -> Kind:
    """A sub-table validated by ``section``; nested problems go into ctx."""

    def convert(value: Any, ctx: Context, key: str) -> Section | None:
        return section.load(value, ctx, key)

    return convert


def map_of(section: type[Section], name_pattern: str = r"^[A-Za-z0-9_-]+$") -> Kind:
    """A table of named sub-tables (``[listeners.NAME]``), each validated by ``section``."""

    def convert(value: Any, ctx: Context, key: str) -> dict[str, Section]:
        if not isinstance(value, dict):
            raise Invalid(f"expected a table, got {_describe(value)}")
        out = {}
        for name, sub in value.items():
            if not re.match(name_pattern, name):
                ctx.error(f"{key}.{name}", "names may only use letters, digits, '-' and '_'")
                continue
            loaded = section.load(sub, ctx, f"{key}.{name}")
            if loaded is not None:
                out[name] = loaded
        return out

    return convert


def polymorphic(registry: dict[str, type[Section]], discriminator: str = "type") -> Kind:
    """A table whose ``type`` key picks the Section that validates the rest of it."""

    def convert(value: Any, ctx: Context, key: str) -> Section | None:
        if not isinstance(value, dict):
            raise Invalid(f"expected a table, got {_describe(value)}")
        kind = value.get(discriminator)
        if kind not in registry:
            ctx.error(
                f"{key}.{discriminator}",
                f"expected one of {', '.join(sorted(registry))}, got {_describe(kind)}",
            )
            return None
        return registry[kind].load(value, ctx, key)

    return convert
