"""Password schemes: interoperability with Dovecot (doveadm pw) and OpenLDAP, both directions."""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest

from mailserv.auth import md5state, schemes
from tests.auth.conftest import unavailable

PASSWORD = "pässword"

# Made by `doveadm pw -s SCHEME -p pässword` (Dovecot 2.3) and `openssl passwd -6`.
DOVECOT = [
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$Ib0mnLgT6ZtOEnxWyT7VGg$"
    "hDz8VNnGb0YDTG0l0TGho7unlMJ8eMOWDeOR6vHEPFM",
    "{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$XzoNtQHw6xeYl8qR12wZDg$"
    "90oZ3rkm0tCgHjQdwkQf1N0Nef2a6TN9kdgbljjHxX0",
    "{BLF-CRYPT}$2y$05$NAyScJc7PmEXLatVgv33Oup5tMPqLCRJDInYvSnGjrdqdj200CTM2",
    "{SHA512-CRYPT}$6$P8p5iUflnHbhQdDN$ShYlJ8F2XXcXzhGm3tViQGwv0TTAIQ7tmm3umj6Wsc0e8sdpWwGe4ZQ"
    "BiNWYz4QdvIhAdUIlhOD8PC3Ahf3xu/",
    "{SHA256-CRYPT}$5$DIevN0xFuPTvsCWc$/cYBhNonC9hQFL2FreKyjF9khcqRTlUwR4vUM4Lwd.2",
    "{MD5-CRYPT}$1$iUQxx/wB$/VgEAgCuofko8W/UZvpwh1",
    "{SSHA512}OHHaWHW1G7G8Wi4KJd1kVYW+QO23Y/fVXXsXQWBBv6d3ob3/+d7Rv+21A+7mxn98LZOd2a2N514mxNLtj"
    "Vgzs1w4bg8=",
    "{SSHA256}AdslhEDkcJONvVEmdnukcMH0Ls9B+MMv7CE5rc9khVGq8E/L",
    "{SSHA}2nitFZeV9dMMOK8oigv9RxQh7Y5H3+mH",
    "{SHA512}KF3icbSeAO9oGc8Ku/AxXpfCXLo2FhZ8dw78Umxki03hH0sA3HH67TOjEse6g2kNPtFKqq32tiKqSJlv8H7IpA==",
    "{SHA256}NHgme1YSeRtAmIkGs6eJfrarUB4EuV7TL5nQr99mnZw=",
    "{SHA256.HEX}3478267b5612791b40988906b3a7897eb6ab501e04b95ed32f99d0afdf669d9c",
    "{SHA}I7dElEdfX4dJgLdnbVEeI9iG2mQ=",
    "{PLAIN}pässword",
    "{CLEAR}pässword",
    "{CRAM-MD5}7dead29c194d4ac3cf5f337b23fa3b9b32c9f4b1d7d7b1fa2539d66ce368e997",
    "{SCRAM-SHA-1}4096,4WT6inSRCk+v5eXB8S7Y5w==,8b/s6B4DERZLcBRHkccIuZ3SOd0=,"
    "defBfqOpQIpFRbGBX/MI7C+z9no=",
    "{SCRAM-SHA-256}4096,CEKfeTCOX0EKVJyiM62D9A==,IPpKCQDoSPzs3ldp7UpGjE/KM0/lzzd/oIGNcC0jx9o=,"
    "pltnz7EobcVxoMODoBCE8Uz1q4Ty1p49Mop5P3IkZnY=",
    # crypt(3) strings without a prefix, as /etc/shadow and Dovecot's CRYPT scheme hold them.
    "$6$saltsalt$rVIyJtXnL0mXUCLepstXWqeOv9JVyd7nOH8wn0BvOU5lCiAviUJLxXZ5CkPgq6XNTHV22yG4mV0IO9gqPL"
    "5WQ.",
]


@pytest.mark.parametrize("stored", DOVECOT, ids=lambda s: schemes.split(s, "CRYPT")[0])
def test_verifies_what_dovecot_wrote(stored: str) -> None:
    assert schemes.verify(stored, PASSWORD, default_scheme="CRYPT")
    assert schemes.verify(stored, PASSWORD.encode(), default_scheme="CRYPT")
    assert not schemes.verify(stored, "password", default_scheme="CRYPT")
    assert not schemes.verify(stored, "", default_scheme="CRYPT")
    assert not schemes.verify(stored, "x" * 10_000, default_scheme="CRYPT")


@pytest.mark.parametrize("scheme", schemes.SCHEMES)
def test_hash_then_verify(scheme: str) -> None:
    stored = schemes.hash_password(PASSWORD, scheme)
    assert stored.startswith("{" + scheme + "}")
    assert schemes.verify(stored, PASSWORD)
    assert not schemes.verify(stored, PASSWORD + " ")
    if scheme not in schemes.PLAINTEXT_SCHEMES | {"SHA512", "SHA256", "SHA", "CRAM-MD5"}:
        assert schemes.hash_password(PASSWORD, scheme) != stored  # salted


@pytest.mark.parametrize("scheme", schemes.SCHEMES)
def test_dovecot_verifies_what_we_wrote(scheme: str) -> None:
    doveadm = shutil.which("doveadm")
    if doveadm is None:
        unavailable("doveadm is not installed (Debian package dovecot-core)")
    stored = schemes.hash_password(PASSWORD, scheme)
    ok = subprocess.run([doveadm, "pw", "-t", stored, "-p", PASSWORD], capture_output=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([doveadm, "pw", "-t", stored, "-p", "wrong"], capture_output=True)
    assert bad.returncode != 0


def test_default_is_argon2id() -> None:
    assert schemes.hash_password("x").startswith("{ARGON2ID}$argon2id$")


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "{UNKNOWN}x",
        "{SSHA}!!!",
        "{SSHA}AAAA",
        "{ARGON2ID}$argon2id$garbage",
        "{SCRAM-SHA-1}1,2",
        "{CRAM-MD5}zz",
        "{BLF-CRYPT}$2y$xx",
        "{SHA512-CRYPT}$6$",
        "des-crypt",
    ],
)
def test_malformed_stored_values_never_match(stored: str) -> None:
    assert not schemes.verify(stored, PASSWORD)


def test_refuses_to_hash_empty_or_unknown() -> None:
    with pytest.raises(ValueError):
        schemes.hash_password("")
    with pytest.raises(schemes.UnknownScheme):
        schemes.hash_password("x", "ROT13")


def test_md5_from_state_matches_hashlib() -> None:
    for size in (0, 1, 55, 56, 63, 64, 65, 200):
        data = bytes(range(256))[:size] * 1
        assert md5state.finish(md5state.INITIAL, 0, data) == hashlib.md5(data).digest()


def test_secret_kinds() -> None:
    assert schemes.secret_kinds("{PLAIN}x") == {"CRAM-MD5", "APOP", "SCRAM-SHA-1", "SCRAM-SHA-256"}
    assert schemes.secret_kinds(schemes.hash_password("x", "CRAM-MD5")) == {"CRAM-MD5"}
    assert schemes.secret_kinds(schemes.hash_password("x", "SSHA")) == frozenset()
    assert schemes.plaintext_of("{CLEAR}abc") == b"abc"
    assert schemes.plaintext_of("{SSHA}abc") is None


@pytest.mark.parametrize(
    "setting",
    ["$6$saltsalt", "$6$rounds=10000$saltsalt", "$5$saltsalt", "$1$saltsalt"],
)
def test_libcrypt_matches_passlib(setting: str) -> None:
    from passlib.hash import md5_crypt, sha256_crypt, sha512_crypt

    from mailserv.auth import libcrypt

    if not libcrypt.available():
        unavailable("libcrypt has no crypt_rn (libxcrypt)")
    handler = {"$6$": sha512_crypt, "$5$": sha256_crypt, "$1$": md5_crypt}[setting[:3]]
    ours = libcrypt.crypt(PASSWORD.encode(), setting)
    assert ours is not None and handler.verify(PASSWORD, ours)
    assert libcrypt.crypt(b"a\0b", setting) is None
    assert libcrypt.crypt(b"x", "$6$") is None or libcrypt.crypt(b"x", "*") is None


def test_sha_crypt_does_not_hold_the_gil() -> None:
    """A long SHA512-CRYPT in a thread leaves the main thread running (the reactor's case).

    A scheme implemented in C that kept the GIL would stop the reactor for the whole hash.
    """
    import threading
    import time

    from mailserv.auth import libcrypt

    if not libcrypt.available():
        unavailable("libcrypt has no crypt_rn (libxcrypt)")
    stored = "{SHA512-CRYPT}" + str(libcrypt.crypt(b"pw", "$6$rounds=2000000$saltsalt"))
    worker = threading.Thread(target=schemes.verify, args=(stored, "pw"))
    started = time.monotonic()
    worker.start()
    longest, last = 0.0, time.monotonic()
    while worker.is_alive():
        now = time.monotonic()
        longest, last = max(longest, now - last), now
    took = time.monotonic() - started
    assert took > 0.2  # the hash really took a while
    assert longest < took / 2
