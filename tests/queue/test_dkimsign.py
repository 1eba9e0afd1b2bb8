"""DKIM signing: RSA through OpenSSL with the parsed key cached, same signature as dkimpy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dkim
import pytest

from mailserv.queue import dkimsign

MESSAGE = (
    b"From: Someone <a@example.test>\r\nTo: <b@remote.test>\r\nSubject: hi\r\n"
    b"Message-ID: <1@example.test>\r\n\r\n" + b"Some text of the message body.\r\n" * 100
)


@pytest.fixture
def signer(tmp_path: Path) -> dkimsign.Signer:
    dkimsign.generate(str(tmp_path), "example.test", "s")
    return dkimsign.Signer(str(tmp_path))


def test_rsa_signature_is_dkimpys_own_and_uses_the_cached_key(
    signer: dkimsign.Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    (rsa_key,) = [k for k in signer.keys_for("example.test") if k.algorithm == b"rsa-sha256"]
    monkeypatch.setattr(dkim.time, "time", lambda: 1_764_000_000.0)  # t= of both
    pure = dkim.sign(
        MESSAGE,
        rsa_key.selector.encode(),
        b"example.test",
        rsa_key.private,
        canonicalize=(b"relaxed", b"relaxed"),
        signature_algorithm=b"rsa-sha256",
        linesep=b"\r\n",
    )

    # dkimpy's pure-Python RSA (two big-integer pow() under the GIL) is not called.
    def no_python_rsa(*args: Any) -> Any:
        raise AssertionError("signed with dkimpy's pure-Python RSA")

    monkeypatch.setattr(dkimsign, "_python_rsa_sign", no_python_rsa)
    signatures = signer.sign(MESSAGE)
    # RSASSA-PKCS1-v1_5 is deterministic: exactly the header dkimpy's own RSA makes.
    rsa_header = next(h for h in signatures.split(b"DKIM-Signature:")[1:] if b"a=rsa-sha256" in h)
    assert b"DKIM-Signature:" + rsa_header == pure


def test_both_signatures_verify(signer: dkimsign.Signer, tmp_path: Path) -> None:
    records = dict(dkimsign.records_for(str(tmp_path), "example.test"))

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return records[name.decode().rstrip(".")].encode()

    signed = signer.sign(MESSAGE) + MESSAGE
    verifier = dkim.DKIM(signed)
    assert verifier.verify(idx=0, dnsfunc=dnsfunc)
    assert verifier.verify(idx=1, dnsfunc=dnsfunc)
    assert signed.count(b"DKIM-Signature:") == 2
