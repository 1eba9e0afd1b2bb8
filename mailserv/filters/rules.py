"""Header and body rules in the style of Postfix header_checks/body_checks (regexp tables).

Each rule is ``/pattern/flags ACTION optional text``; flags are ``i``
(ignore case), ``m``, ``s`` and ``x``; ``!/pattern/`` matches when the pattern
does not.  Header rules see each logical (unfolded) header line ``Name: value``;
body rules see each body line.  For every line the first matching rule wins.
Actions: ``REJECT`` and ``TEMPFAIL`` (``DEFER``) refuse the message,
``QUARANTINE`` (``HOLD``) delivers it into the Junk folder with the reason in a
header, ``DISCARD`` accepts it and drops it (as Postfix: the client gets 250,
nobody gets the message; the transaction log keeps ``rules:discard``; header
and body rules only, at the message stage), ``WARN`` logs,
``PREPEND``/``ADD_HEADER`` adds ``Name: value``, ``OK`` stops the rules,
``DUNNO`` goes on.

Guard: patterns run with the ``regex`` module's per-match timeout in the
``crypto`` thread pool, under an overall deadline, so that a catastrophic
pattern or input can neither stall the reactor nor hold a thread for long;
a timeout fails closed (451 4.3.0, the chain's filter failure) or skips the
rule (``on_timeout = "skip"``).  A small message held in memory is first
evaluated on the reactor, within the chain's inline budget (a few
milliseconds, common.INLINE_BUDGET) to which every match's timeout is cut;
when that budget runs out the evaluation starts again in the pool, with the
configured timeouts.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import regex
from twisted.logger import Logger
from zope.interface import implementer

from mailserv.config.schema import (
    Context,
    Invalid,
    Section,
    choice,
    duration,
    list_of,
    option,
    optional,
    size,
    string,
)
from mailserv.filters.authresults import read_header_block, split_fields
from mailserv.filters.base import CONTINUE, Action, FilterBase, Verdict
from mailserv.filters.common import (
    Job,
    NeedsThread,
    clean,
    config_error,
    in_memory,
    load_options,
    prepared,
    results_for,
    then,
)
from mailserv.interfaces import IMessageFilter

log = Logger()

ACTION_NAMES = {
    "REJECT": "reject",
    "TEMPFAIL": "tempfail",
    "DEFER": "tempfail",
    "DISCARD": "discard",
    "QUARANTINE": "quarantine",
    "HOLD": "quarantine",
    "WARN": "warn",
    "PREPEND": "prepend",
    "ADD_HEADER": "prepend",
    "OK": "ok",
    "DUNNO": "dunno",
}
_FLAGS = {"i": regex.IGNORECASE, "m": regex.MULTILINE, "s": regex.DOTALL, "x": regex.VERBOSE}


_WHOLE_TEXT_UNSAFE = regex.compile(r"\\[AZzG]|\(\?(?!:)")


class RuleTimeout(Exception):
    """A rule did not finish within its time budget."""


@dataclass(frozen=True)
class Rule:
    source: str
    pattern: Any  # compiled regex
    negate: bool
    action: str
    text: str
    # The pattern for one search over all lines at once (None: only line by line).
    whole: Any = None

    def matches(self, line: str, timeout: float) -> bool:
        try:
            found = self.pattern.search(line, timeout=timeout) is not None
        except TimeoutError:
            raise RuleTimeout(self.source) from None
        return found != self.negate


def parse_rule(line: str) -> Rule:
    """Parse ``[!]/pattern/flags ACTION [text]``; ValueError with the reason."""
    text = line.strip()
    negate = text.startswith("!")
    if negate:
        text = text[1:]
    if not text.startswith("/"):
        raise ValueError("a rule starts with /pattern/")
    i = 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == "/":
            break
        i += 1
    else:
        raise ValueError("missing the closing / of the pattern")
    pattern, rest = text[1:i].replace("\\/", "/"), text[i + 1 :]
    flag_text, _, rest = rest.partition(" ")
    flags = 0
    for ch in flag_text:
        if ch not in _FLAGS:
            raise ValueError(f"unknown flag {ch!r}")
        flags |= _FLAGS[ch]
    word, _, argument = rest.strip().partition(" ")
    action = ACTION_NAMES.get(word.upper())
    if action is None:
        raise ValueError(f"unknown action {word!r} (one of {', '.join(ACTION_NAMES)})")
    argument = argument.strip()
    if action == "prepend":
        name, colon, _value = argument.partition(":")
        if not colon or not name or " " in name.strip() or not name.isascii():
            raise ValueError("PREPEND needs 'Name: value'")
    try:
        compiled = regex.compile(pattern, flags)
    except regex.error as exc:
        raise ValueError(f"bad regular expression: {exc}") from None
    whole = None
    if not negate and not _WHOLE_TEXT_UNSAFE.search(pattern):
        whole = regex.compile(pattern, flags | regex.MULTILINE)
    return Rule(line.strip(), compiled, negate, action, clean(argument, 300), whole)


def rule_kind(value: Any, ctx: Context, key: str) -> Rule:
    if not isinstance(value, str):
        raise Invalid("expected a rule string '/pattern/flags ACTION text'")
    try:
        return parse_rule(value)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def load_rule_file(path: str, key: str) -> list[Rule]:
    """Rules from a Postfix-style file: one per line, '#' comments, indented continuations."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise config_error(key, f"cannot read {path}: {exc.strerror}") from None
    logical: list[tuple[int, str]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[:1].isspace() and logical:
            logical[-1] = (logical[-1][0], logical[-1][1] + " " + line.strip())
        else:
            logical.append((number, line))
    rules = []
    for number, line in logical:
        try:
            rules.append(parse_rule(line))
        except ValueError as exc:
            raise config_error(key, f"{path}, line {number}: {exc}") from None
    return rules


class RulesOptions(Section):
    """Keys of ``filter = "rules"``."""

    header_checks: list[Rule] = option(list_of(rule_kind), list)
    body_checks: list[Rule] = option(list_of(rule_kind), list)
    header_checks_file: str | None = option(optional(string), None)
    body_checks_file: str | None = option(optional(string), None)
    match_timeout: float = option(duration, 0.25)
    max_body_bytes: int = option(size, 1024 * 1024)
    on_timeout: str = option(choice("tempfail", "skip"), "tempfail")


@dataclass
class Hit:
    rule: Rule
    line: str


def evaluate(
    message: Any,
    header_rules: list[Rule],
    body_rules: list[Rule],
    match_timeout: float,
    budget: float,
    max_body: int,
    skip_timeouts: bool,
) -> list[Hit]:
    """Run the rules over the spooled message (blocking: the crypto pool).

    Returns the hits in order; the last is final when its action ends the rules.
    """
    deadline = time.monotonic() + budget
    hits: list[Hit] = []
    head, rest_at = read_header_block(message)

    def run(rules: list[Rule], line: str) -> bool:
        """True when the rules must stop (a final action or OK)."""
        for rule in rules:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuleTimeout("the overall rules deadline")
            try:
                matched = rule.matches(line, min(match_timeout, left))
            except RuleTimeout:
                if not skip_timeouts:
                    raise
                log.warn("rule {rule!r} timed out; skipped", rule=rule.source)
                continue
            if matched:
                if rule.action == "dunno":
                    return False
                hits.append(Hit(rule, line))
                return rule.action in ("reject", "tempfail", "discard", "quarantine", "ok")
        return False

    def candidates(rules: list[Rule], lines: list[str]) -> list[Rule]:
        text = "\n".join(lines)
        return [r for r in rules if not _cannot_match(r, text, deadline, match_timeout)]

    if header_rules:
        lines = [raw.decode("utf-8", "replace").replace("\r\n", "") for raw in split_fields(head)]
        live = candidates(header_rules, lines)
        for line in lines if live else ():
            if run(live, line):
                return hits
    if body_rules:
        with message.open() as f:
            f.seek(rest_at + 2)
            data = f.read(max_body)
        lines = data.decode("utf-8", "replace").split("\r\n")
        live = candidates(body_rules, lines)
        for line in lines if live else ():
            if run(live, line):
                return hits
    return hits


def _cannot_match(rule: Rule, text: str, deadline: float, match_timeout: float) -> bool:
    """A quick pass over all lines at once: True when ``rule`` cannot match any line.

    The lines are joined with LF and searched once with ``^``/``$`` at line
    boundaries (MULTILINE): every match inside a line is found, and maybe more
    (a class like ``[^x]`` can cross lines), so a miss here is a miss on every
    line; rules that may still match go line by line.  Negated rules, anchors
    on the whole text (``\\A``, ``\\Z``, ``\\G``) and any ``(?`` construct but
    ``(?:`` (lookarounds, scoped flags) always go line by line.
    """
    whole = rule.whole
    if whole is None:
        return False
    left = deadline - time.monotonic()
    if left <= 0:
        raise RuleTimeout("the overall rules deadline")
    try:
        return whole.search(text, timeout=min(match_timeout, left)) is None
    except TimeoutError:
        return False


@implementer(IMessageFilter)
class RulesFilter(FilterBase):
    """Postfix-style header and body checks, guarded against catastrophic patterns."""

    name = "rules"

    def __init__(self, options: Mapping[str, Any] | None = None, service: Any = None) -> None:
        super().__init__(options, service)
        self.config = load_options(RulesOptions, self.options)
        self.header_rules = list(self.config.header_checks)
        self.body_rules = list(self.config.body_checks)
        if self.config.header_checks_file:
            self.header_rules += load_rule_file(
                self.config.header_checks_file, "header_checks_file"
            )
        if self.config.body_checks_file:
            self.body_rules += load_rule_file(self.config.body_checks_file, "body_checks_file")
        self.may_quarantine = any(
            r.action == "quarantine" for r in self.header_rules + self.body_rules
        )
        self.threads = service.threads

    def _job(self, message: Any) -> Any:
        cfg = self.config
        return functools.partial(
            evaluate,
            message,
            self.header_rules,
            self.body_rules,
            cfg.match_timeout,
            max(self.timeout - 1.0, cfg.match_timeout),
            cfg.max_body_bytes,
            cfg.on_timeout == "skip",
        )

    def _inline(self, message: Any, deadline: float) -> list[Hit]:
        """The evaluation on the reactor, for a small message in memory, until ``deadline``:
        every match's timeout is capped to the time left, and a timeout (which the pool,
        with the configured timeouts, may not meet) sends the evaluation to the pool."""
        if not in_memory(message):
            raise NeedsThread("message on disk")
        left = deadline - time.monotonic()
        cfg = self.config
        try:
            return evaluate(
                message,
                self.header_rules,
                self.body_rules,
                min(cfg.match_timeout, left),
                left,
                cfg.max_body_bytes,
                False,
            )
        except RuleTimeout:
            raise NeedsThread("rules still running at the end of the inline budget") from None

    def message_job(self, session: Any, envelope: Any, message: Any) -> Any:
        """The evaluation, for the chain's jobs of the message (common.start_jobs)."""
        if not self.header_rules and not self.body_rules:
            return None
        return Job(self._job(message), functools.partial(self._inline, message))

    def check_message(self, session: Any, envelope: Any, message: Any) -> Any:
        if not self.header_rules and not self.body_rules:
            return CONTINUE
        job = prepared(session, envelope, self.name)
        if job is None:
            job = self.threads.run("crypto", self._job(message))
        return then(job, self._verdict, session, envelope)

    def _verdict(self, hits: list[Any], session: Any, envelope: Any) -> Verdict:
        headers: list[tuple[str, str]] = []
        results = results_for(session, envelope)
        for hit in hits:
            action, text = hit.rule.action, hit.rule.text
            if action == "warn":
                log.warn(
                    "rule {rule!r} matched in {id}: {line}",
                    rule=hit.rule.source,
                    id=envelope.id,
                    line=clean(hit.line, 200),
                )
            elif action == "prepend":
                name, _, value = text.partition(":")
                headers.append((name.strip(), value.strip()))
            elif action == "reject":
                return Verdict.reject(550, "5.7.1", text or "Message content rejected", "rule")
            elif action == "tempfail":
                return Verdict.tempfail(
                    451, "4.7.1", text or "Message content deferred, try again later", "rule"
                )
            elif action == "discard":
                reason = f"rule discard: {text or clean(hit.line, 100)}"
                log.info("message {id} discarded: {reason}", id=envelope.id, reason=reason)
                return Verdict(Action.DISCARD, headers=tuple(headers), reason=reason)
            elif action == "quarantine":
                results.quarantine.append(f"rule {action}: {text or clean(hit.line, 100)}")
        return Verdict(Action.CONTINUE, headers=tuple(headers))
