"""The metrics listener: Prometheus text from a running twistd mailserv, and who may read it."""

from __future__ import annotations

import ipaddress
import smtplib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from mailserv.config import from_dict
from mailserv.errors import ConfigError
from mailserv.metrics import EventCounters, MetricsResource
from tests.support.process import test_config


def _scrape(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.headers["content-type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["content-type"], exc.read().decode()


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_count_connections_transactions_and_show_the_service(
    mailserv: Any, tmp_path: Path
) -> None:
    config = test_config(
        tmp_path / "state", {"mx": {}, "metrics": {"protocol": "metrics", "tls": "none"}}
    )
    process = mailserv.start(config)
    with smtplib.SMTP("127.0.0.1", process.port("mx"), timeout=10) as client:
        client.sendmail(
            "someone@remote.test", ["postmaster@example.test"], b"Subject: x\r\n\r\nhi\r\n"
        )
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("someone@remote.test", ["nobody@example.test"], b"Subject: y\r\n\r\n")

    status, ctype, text = _scrape(process.port("metrics"))
    assert status == 200 and ctype.startswith("text/plain; version=")
    samples = _samples(text)
    assert samples['mailserv_connections_total{listener="mx"}'] == 1
    assert samples['mailserv_connections_open{listener="mx"}'] == 0
    assert samples['mailserv_connections_open{listener="metrics"}'] == 1  # this scrape
    assert samples['mailserv_smtp_transactions_total{listener="mx",reply="2xx"}'] == 1
    assert samples['mailserv_smtp_accepted_bytes_total{listener="mx"}'] == 18  # as received
    assert samples['mailserv_thread_pool_size{pool="disk"}'] >= 1
    assert not any("queue-worker/" in name for name in samples)  # inline delivery: no worker
    assert samples['mailserv_build_info{version="0.1.0"}'] == 1
    assert 'mailserv_tls_certificate_expiry_seconds{certificate="mail.example.test"}' in samples
    assert samples["process_resident_memory_bytes"] > 1e6
    assert 'mailserv_queue_messages{state="waiting"}' in samples
    assert samples["mailserv_delivery_helpers_up"] == 2  # [delivery] processes default
    assert samples["mailserv_delivery_helper_jobs"] == 0
    assert samples["mailserv_delivery_helper_restarts_total"] == 0
    assert "@" not in text  # never an address in a label

    status, _, _ = _scrape(process.port("metrics"), "/")
    assert status == 404
    assert process.stop() == 0


class _Request:
    def __init__(self, host: str) -> None:
        self.host = host

    def getClientAddress(self) -> Any:
        return self

    def setResponseCode(self, code: int) -> None:
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        pass


def test_only_allowed_networks_may_scrape() -> None:
    from prometheus_client import CollectorRegistry

    default = MetricsResource(CollectorRegistry(), [])
    assert default._allowed(_Request("127.0.0.1")) and default._allowed(_Request("::1"))
    denied = _Request("192.0.2.7")
    assert b"forbidden" in default.render_GET(denied) and denied.code == 403
    lan = MetricsResource(CollectorRegistry(), [ipaddress.ip_network("192.0.2.0/24")])
    assert lan._allowed(_Request("192.0.2.7")) and lan._allowed(_Request("::ffff:192.0.2.7"))
    assert not lan._allowed(_Request("127.0.0.1"))  # an explicit list replaces loopback


def test_events_are_counted_by_reply_class_and_outcome() -> None:
    events = EventCounters()
    base = {
        "log_format": "smtp transaction {id} from={sender} rcpts={count} size={size} reply={reply}"
    }
    events({**base, "listener": "mx", "reply": "250 2.0.0", "size": 100})
    events({**base, "listener": "mx", "reply": "550 5.7.1", "size": None})
    events(
        {
            "log_format": "queue {id} to=<{rcpt}> status={status} via={mta} reply={reason}",
            "status": "sent",
        }
    )
    events({"log_format": "something else", "status": "sent"})
    assert events.smtp == {("mx", "2xx"): 1, ("mx", "5xx"): 1}
    assert events.smtp_bytes == {"mx": 100}
    assert events.deliveries == {"sent": 1}


def test_metrics_listener_config_problems(tmp_path: Path) -> None:
    config = test_config(
        tmp_path,
        {
            "mx": {"allow_from": ["10.0.0.0/8"]},
            "metrics": {"protocol": "metrics", "tls": "starttls"},
        },
    )
    with pytest.raises(ConfigError) as info:
        from_dict(config, "test.toml", str(tmp_path))
    assert "listeners.mx.allow_from" in str(info.value)
    assert "listeners.metrics.tls" in str(info.value)
