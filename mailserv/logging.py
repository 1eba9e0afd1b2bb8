"""Log observers for twistd: text (the default) and JSON lines.

``twistd --logger mailserv.logging.json_observer mailserv`` writes one JSON
object per line to standard output.  Both observers pass every event through
``redact`` first: a value under a key that names a secret (password, AUTH
payload, SASL response, credentials) is never written, whatever logged it.
"""

from __future__ import annotations

import re
import sys
from typing import IO

from twisted.logger import (
    ILogObserver,
    LogEvent,
    eventAsJSON,
    formatEventAsClassicLogText,
)
from zope.interface import implementer

REDACTED = "<redacted>"
_SECRET_KEY = re.compile(
    r"(pass(word|wd|phrase)?|secret|auth_?(data|payload|response)|sasl_?(data|response)"
    r"|credentials?|challenge_?response|apop_digest)$",
    re.IGNORECASE,
)


def redact(event: LogEvent) -> LogEvent:
    """A copy of ``event`` with every secret-named field replaced by ``<redacted>``."""
    if not any(_SECRET_KEY.search(key) for key in event):
        return event
    return {key: (REDACTED if _SECRET_KEY.search(key) else value) for key, value in event.items()}


@implementer(ILogObserver)
class RedactingObserver:
    """Wraps an observer so that no secret-named field reaches it."""

    def __init__(self, observer: ILogObserver) -> None:
        self._observer = observer

    def __call__(self, event: LogEvent) -> None:
        self._observer(redact(event))


def json_observer(out: IO[str] | None = None) -> ILogObserver:
    """JSON lines on ``out`` (standard output by default)."""
    stream = out if out is not None else sys.stdout

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        try:
            stream.write(eventAsJSON(event) + "\n")
            stream.flush()
        except Exception as exc:  # a log observer must never raise into the emitter
            if sys.__stderr__ is not None:
                sys.__stderr__.write(f"mailserv: cannot write a log event: {exc!r}\n")

    return RedactingObserver(observe)


def text_observer(out: IO[str] | None = None) -> ILogObserver:
    """Classic twistd text lines on ``out`` (standard output by default)."""
    stream = out if out is not None else sys.stdout

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        text = formatEventAsClassicLogText(event)
        if text:
            stream.write(text)
            stream.flush()

    return RedactingObserver(observe)


__all__ = ["REDACTED", "RedactingObserver", "json_observer", "redact", "text_observer"]
