"""crypt(3) through libxcrypt's ``crypt_rn``, called with ctypes so that the GIL is released.

The stdlib ``crypt`` module (and passlib's os_crypt backend on top of it)
holds the GIL for the whole hash: 5000 rounds of SHA512-CRYPT stop every
other Python thread, the reactor included, for milliseconds per login.
ctypes releases the GIL around foreign calls, so the reactor keeps running.
``available()`` is False where libcrypt has no crypt_rn; callers fall back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

CRYPT_DATA_SIZE = 32768  # sizeof(struct crypt_data) in libxcrypt


@functools.cache
def _crypt_rn() -> Any:
    name = ctypes.util.find_library("crypt")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).crypt_rn
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_char_p
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
    return fn


def available() -> bool:
    return _crypt_rn() is not None


def crypt(password: bytes, setting: str) -> str | None:
    """crypt(3) of ``password`` with ``setting`` (a salt or a whole hash); None if refused."""
    fn = _crypt_rn()
    if fn is None or b"\0" in password:
        return None
    data = ctypes.create_string_buffer(CRYPT_DATA_SIZE)
    result = fn(password, setting.encode("ascii"), data, CRYPT_DATA_SIZE)
    if not result or result.startswith(b"*"):
        return None
    return result.decode("ascii")
