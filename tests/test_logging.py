"""Log observers: JSON lines and text, and no secret ever written."""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogPublisher

from mailserv.logging import REDACTED, json_observer, redact, text_observer


def emit(observer: object, **fields: object) -> None:
    publisher = LogPublisher(observer)  # type: ignore[arg-type]
    Logger(namespace="mailserv.test", observer=publisher).info("login {user}", **fields)


def test_json_observer_writes_one_object_per_line() -> None:
    out = io.StringIO()
    emit(json_observer(out), user="alice")
    emit(json_observer(out), user="bob")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert [json.loads(line)["user"] for line in lines] == ["alice", "bob"]


def test_secrets_never_reach_the_json_log() -> None:
    out = io.StringIO()
    emit(
        json_observer(out),
        user="alice",
        password="hunter2",
        auth_payload="AGFsaWNlAGh1bnRlcjI=",
        sasl_response="c2VjcmV0",
        credentials="hunter2",
    )
    text = out.getvalue()
    assert "hunter2" not in text and "AGFsaWNlAGh1bnRlcjI=" not in text and "c2VjcmV0" not in text
    event = json.loads(text)
    assert event["password"] == REDACTED and event["user"] == "alice"


def test_secrets_never_reach_the_text_log() -> None:
    out = io.StringIO()
    publisher = LogPublisher(text_observer(out))
    Logger(namespace="t", observer=publisher).info(
        "user {user} password {password}", user="al", password="hunter2"
    )
    assert "hunter2" not in out.getvalue()
    assert "user al password <redacted>" in out.getvalue()


def test_redact_keeps_events_without_secrets_unchanged() -> None:
    event = {"user": "x", "log_format": "{user}"}
    assert redact(event) is event
