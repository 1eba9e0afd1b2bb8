"""Which filters exist, and how a named pipeline of the config becomes a chain.

Built-in filters are listed in ``BUILTIN`` (lazy imports); third-party
filters are Twisted plugins providing IFilterFactory, discovered with
twisted.plugin in the ``twisted.plugins`` package.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Sequence
from typing import Any

from mailserv.errors import ConfigError, ConfigProblem
from mailserv.filters.chain import FilterChain
from mailserv.interfaces import IFilterFactory

# name -> "module:Class"; the class is built as Class(options, service).
BUILTIN: dict[str, str] = {
    "relay": "mailserv.filters.policy:RelayControl",
    "recipient": "mailserv.filters.policy:RecipientExists",
    "size": "mailserv.filters.policy:MessageSize",
    # The filters of issue 9, one module each.
    "headers": "mailserv.filters.headers:HeadersFilter",
    "spf": "mailserv.filters.spf:SPFFilter",
    "dkim": "mailserv.filters.dkim:DKIMFilter",
    "dmarc": "mailserv.filters.dmarc:DMARCFilter",
    "arc": "mailserv.filters.arc:ARCFilter",
    "authresults": "mailserv.filters.authresults:AuthResultsFilter",
    "dnsbl": "mailserv.filters.dnsbl:DNSBLFilter",
    "uribl": "mailserv.filters.uribl:URIBLFilter",
    "greylist": "mailserv.filters.greylist:GreylistFilter",
    "spamtrap": "mailserv.filters.spamtrap:SpamtrapFilter",
    "tarpit": "mailserv.filters.tarpit:TarpitFilter",
    "rules": "mailserv.filters.rules:RulesFilter",
    "ratelimit": "mailserv.filters.ratelimit:RateLimitFilter",
    "quarantine": "mailserv.filters.quarantine:QuarantineFilter",
}


def _plugin_factories() -> dict[str, Any]:
    from twisted.plugin import getPlugins

    from twisted import plugins

    return {str(p.name): p for p in getPlugins(IFilterFactory, plugins)}


def available() -> list[str]:
    """Every filter name a pipeline may use."""
    return sorted(set(BUILTIN) | set(_plugin_factories()))


def build_filter(name: str, options: dict[str, Any], service: Any, where: str = "") -> Any:
    """Build one filter; ConfigError naming ``where`` for an unknown name or bad options."""
    if name in BUILTIN:
        module, _, cls_name = BUILTIN[name].partition(":")
        cls = getattr(importlib.import_module(module), cls_name)
        try:
            return cls(options, service)
        except ConfigError as exc:  # problems keyed relative to the entry: prefix them
            raise ConfigError(
                [
                    ConfigProblem(
                        p.file or _file(service), f"{where}.{p.key}" if p.key else where, p.message
                    )
                    for p in exc.problems
                ]
            ) from None
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError([ConfigProblem(_file(service), where, str(exc))]) from None
    plugins = _plugin_factories()
    if name in plugins:
        return plugins[name].build(options, service)
    hint = difflib.get_close_matches(name, available(), n=1)
    message = f"unknown filter {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
    raise ConfigError([ConfigProblem(_file(service), where, message)])


def _file(service: Any) -> str:
    return str(getattr(getattr(service, "config", None), "source", "") or "")


def build_pipeline(name: str | None, service: Any, reactor: Any) -> FilterChain:
    """The chain of the config's ``[[pipelines.NAME]]`` (empty for None or undefined)."""
    pipelines = getattr(service.config, "pipelines", {}) or {}
    if name is None or name not in pipelines:
        return FilterChain([], reactor, name or "")
    filters = []
    problems: list[ConfigProblem] = []
    for i, entry in enumerate(pipelines[name]):
        try:
            filters.append(
                build_filter(entry.filter, dict(entry.options), service, f"pipelines.{name}[{i}]")
            )
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    from mailserv.filters.quarantine import with_quarantine

    # Filters that quarantine record reasons; the quarantine filter, last, acts on them.
    return FilterChain(with_quarantine(filters, service), reactor, name)


def chain_of(filters: Sequence[Any], reactor: Any, name: str = "") -> FilterChain:
    return FilterChain(filters, reactor, name)
