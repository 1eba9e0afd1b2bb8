"""``mailserv queue``, ``mailserv dkim keygen`` and ``mailserv dns`` through the entry point."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import dkim
import pytest

from mailserv.cli.main import main
from mailserv.queue import spool
from mailserv.queue.dkimsign import Signer
from mailserv.queue.state import QueueStore

CONFIG = """
config_version = 1
hostname = "mail.example.test"
domains = ["example.test"]
state_dir = "{state}"
[store]
path = "{state}/mail/{{localpart}}"
[dns]
nameservers = ["127.0.0.1:{port}"]
timeout = "2s"
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    path = tmp_path / "mailserv.toml"
    path.write_text(CONFIG.format(state=state, port=9))
    return path


def enqueue(state: Path, sender: str = "a@example.test", *rcpts: str) -> str:
    entry = spool.QueueEntry(
        id=spool.new_id(),
        sender=sender,
        recipients=[spool.QueuedRecipient(r) for r in rcpts or ("b@remote.test",)],
    )
    return spool.enqueue(str(state / "queue"), entry, [b"Subject: hi\r\n\r\nbody\r\n"])


def test_queue_list_show_hold_release_delete(config_file: Path, capsys: Any) -> None:
    state = config_file.parent / "state"
    first = enqueue(state, "a@example.test", "b@remote.test", "c@remote.test")
    second = enqueue(state, "")
    cfg = ["--config", str(config_file)]
    assert main(["queue", *cfg, "list"]) == 0
    out = capsys.readouterr().out
    assert first in out and second in out and "c@remote.test" in out and "<>" in out
    assert "in 2 message(s)" in out
    assert main(["queue", *cfg, "show", first]) == 0
    out = capsys.readouterr().out
    assert "recipient: <b@remote.test> pending" in out and "Subject: hi" in out
    assert main(["queue", *cfg, "hold", first]) == 0
    store = QueueStore(str(state / "queue"))
    assert store.load(first).hold is True
    main(["queue", *cfg, "list"])
    assert f"{first} (held)" in capsys.readouterr().out
    assert main(["queue", *cfg, "release", first]) == 0
    assert store.load(first).hold is False
    assert main(["queue", *cfg, "delete", second]) == 0
    assert store.ids() == [first]
    assert main(["queue", *cfg, "show", "nope"]) == 1
    assert "no queued message nope" in capsys.readouterr().err
    assert main(["queue", *cfg, "retry", "../../etc"]) == 1


def test_queue_action_goes_to_the_running_server(config_file: Path, capsys: Any) -> None:
    state = config_file.parent / "state"
    entry_id = enqueue(state)
    server = QueueStore(str(state / "queue"))
    assert server.try_lock()  # what a running QueueService holds
    try:
        assert main(["queue", "--config", str(config_file), "hold", entry_id]) == 0
        assert "sent to the running server" in capsys.readouterr().out
        assert server.take_controls() == [{"op": "hold", "id": entry_id}]
        assert server.load(entry_id).hold is False  # only the server changes it
    finally:
        server.unlock()


def test_dkim_keygen_then_both_signatures_verify(config_file: Path, capsys: Any) -> None:
    assert (
        main(["dkim", "--config", str(config_file), "keygen", "Example.TEST", "--selector", "s1"])
        == 0
    )
    out = capsys.readouterr().out
    records = dict(
        (name + ".", "".join(re.findall(r'"([^"]*)"', rest)))
        for name, rest in re.findall(r"^(\S+)\. IN TXT (.*)$", out, re.M)
    )
    assert set(records) == {
        "s1-rsa._domainkey.example.test.",
        "s1-ed25519._domainkey.example.test.",
    }
    assert records["s1-rsa._domainkey.example.test."].startswith("v=DKIM1; k=rsa; p=MII")
    assert records["s1-ed25519._domainkey.example.test."].startswith("v=DKIM1; k=ed25519; p=")
    key_dir = config_file.parent / "state" / "dkim" / "example.test"
    assert oct((key_dir / "s1-rsa.key").stat().st_mode & 0o777) == "0o600"
    # A second keygen with the same selector never overwrites a key.
    assert (
        main(["dkim", "--config", str(config_file), "keygen", "example.test", "--selector", "s1"])
        == 1
    )

    message = (
        b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\nSubject: signed\r\n"
        b"Date: Wed, 25 Nov 2026 10:00:00 +0000\r\nMessage-ID: <x@example.test>\r\n\r\n"
        b"Hello Bob.\r\n.dot line\r\n"
    )
    headers = Signer(str(key_dir.parent)).sign(message)
    assert headers.count(b"DKIM-Signature:") == 2
    assert headers.startswith(b"DKIM-Signature: v=1; a=rsa-sha256")
    signed = headers + message

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return records.get(name.decode(), "").encode()

    verifier = dkim.DKIM(signed)
    assert verifier.verify(idx=0, dnsfunc=dnsfunc)
    assert verifier.verify(idx=1, dnsfunc=dnsfunc)
    tampered = signed.replace(b"Hello Bob", b"Hello Eve")
    try:
        ok = dkim.DKIM(tampered).verify(idx=1, dnsfunc=dnsfunc)
    except dkim.ValidationError:
        ok = False
    assert not ok
    # No key for the From domain: unsigned.
    assert (
        Signer(str(key_dir.parent)).sign(message.replace(b"example.test>", b"other.test>")) == b""
    )


def test_dns_records_are_printed_and_checked(
    config_file: Path, dns_server: Any, capsys: Any
) -> None:
    config_file.write_text(config_file.read_text().replace("127.0.0.1:9", dns_server.address))
    main(["dkim", "--config", str(config_file), "keygen", "example.test", "--selector", "k"])
    capsys.readouterr()
    dns_server.set(
        {
            "example.test": {
                "MX": [[10, "mail.example.test"]],
                "TXT": ["v=spf1 a -all", "other"],
            },
            "_dmarc.example.test": {
                "TXT": ["v=DMARC1; p=quarantine; rua=mailto:postmaster@example.test"]
            },
        }
    )
    assert main(["dns", "--config", str(config_file), "example.test"]) == 1
    out = capsys.readouterr().out
    blocks = dict(re.findall(r"^(\S+\. IN \S+) .*\n    ; (\S+)", out, re.M))
    assert blocks["example.test. IN MX"] == "ok"
    assert blocks["example.test. IN TXT"] == "DIFFERS:"
    assert blocks["_dmarc.example.test. IN TXT"] == "ok"
    assert blocks["k-rsa._domainkey.example.test. IN TXT"] == "MISSING"
    assert blocks["_mta-sts.example.test. IN TXT"] == "MISSING"
    assert blocks["_smtp._tls.example.test. IN TXT"] == "MISSING"
    assert "mta-sts.txt" in out


def test_dns_prints_tlsa_for_the_configured_certificate(
    config_file: Path, test_ca: Any, capsys: Any
) -> None:
    text = config_file.read_text().replace(
        "[store]",
        f'[tls]\ncert_file = "{test_ca.cert_file}"\nkey_file = "{test_ca.key_file}"\n[store]',
    )
    config_file.write_text(text)
    assert main(["dns", "--config", str(config_file), "--no-check", "example.test"]) == 0
    out = capsys.readouterr().out
    match = re.search(r"^_25\._tcp\.mail\.example\.test\. IN TLSA 3 1 1 ([0-9a-f]{64})$", out, re.M)
    assert match
    from tests.queue.test_tls import spki_sha256

    assert match.group(1) == spki_sha256(test_ca.cert_file)
