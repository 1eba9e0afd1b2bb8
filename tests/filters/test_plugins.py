"""Third-party filters: IFilterFactory plugins found with twisted.plugin and used in pipelines."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from mailserv.errors import ConfigError
from mailserv.filters import registry
from mailserv.filters.base import Action

PLUGIN = """
from zope.interface import implementer, provider
from twisted.plugin import IPlugin
from mailserv.interfaces import IFilterFactory, IRecipientFilter
from mailserv.filters.base import CONTINUE, FilterBase, Verdict


@implementer(IRecipientFilter)
class NoBob(FilterBase):
    name = "nobob"

    def check_recipient(self, session, envelope, rcpt):
        if rcpt.address.local == "bob":
            return Verdict.reject(550, "5.7.1", self.options.get("text", "no bob"))
        return CONTINUE


@implementer(IPlugin, IFilterFactory)
class Factory:
    name = "nobob"

    def build(self, options, service):
        return NoBob(options, service)


nobob_factory = Factory()
"""


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from twisted import plugins

    directory = tmp_path / "thirdparty" / "twisted" / "plugins"
    directory.mkdir(parents=True)
    (directory / "nobob_plugin.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.setattr(plugins, "__path__", [*plugins.__path__, str(directory)])
    yield directory
    sys.modules.pop("twisted.plugins.nobob_plugin", None)


@pytest_twisted.inlineCallbacks
def test_plugin_filter_is_discovered_and_built(plain_env: Any, plugin_dir: Path) -> Any:
    assert "nobob" in registry.available()
    assert "spf" in registry.available()
    flt = plain_env.build("nobob", text="Bob is away")
    envelope = plain_env.envelope("a@s.test", "bob@example.org", "carol@example.org")
    bob, carol = envelope.recipients
    verdict = yield flt.check_recipient(plain_env.session(), envelope, bob)
    assert verdict.action is Action.REJECT and verdict.smtp_reply().text == "Bob is away"
    verdict = yield flt.check_recipient(plain_env.session(), envelope, carol)
    assert verdict.action is Action.CONTINUE


def test_unknown_filter_names_suggest_the_closest(plain_env: Any) -> None:
    with pytest.raises(ConfigError) as info:
        plain_env.build("dnsbll", zones=["x.test"])
    [problem] = info.value.problems
    assert problem.key == "pipelines.inbound[0]"
    assert problem.message == "unknown filter 'dnsbll' (did you mean 'dnsbl'?)"


MINIMAL: dict[str, dict[str, Any]] = {
    "dnsbl": {"zones": ["zen.example.test"]},
    "uribl": {"zones": ["multi.example.test"]},
    "spamtrap": {"addresses": ["trap@example.org"]},
    "ratelimit": {"limits": [{"by": "client", "messages": 10}]},
}


def test_every_builtin_filter_builds_and_rejects_unknown_keys(plain_env: Any) -> None:
    from mailserv.filters.chain import STAGES

    ours = [n for n in registry.BUILTIN if n not in ("relay", "recipient", "size")]
    assert len(ours) == 14
    for name in ours:
        flt = plain_env.build(name, **MINIMAL.get(name, {}))
        assert flt.name == name
        assert any(iface.providedBy(flt) for iface, _m in STAGES.values())
        with pytest.raises(ConfigError) as info:
            plain_env.build(name, **MINIMAL.get(name, {}), bogus_key=1)
        assert [p.key for p in info.value.problems] == ["pipelines.inbound[0].bogus_key"]


def test_header_names_are_validated(plain_env: Any) -> None:
    with pytest.raises(ConfigError) as info:
        plain_env.build("quarantine", header="X Bad: name")
    [problem] = info.value.problems
    assert problem.key == "pipelines.inbound[0].header"
    assert plain_env.build("quarantine", header="X-Junk-Reason").config.header == "X-Junk-Reason"
