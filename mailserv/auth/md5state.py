"""MD5 (RFC 1321) from an intermediate state, for stored CRAM-MD5 contexts.

hashlib cannot resume a hash from its chaining values, which is what the
``{CRAM-MD5}`` scheme stores (the HMAC-MD5 inner and outer states after the
padded key block).  Only the compression function is needed: at most a few
blocks per login, so pure Python is fast enough.
"""

from __future__ import annotations

import math
import struct

INITIAL = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)

_S = [7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 + [4, 11, 16, 23] * 4 + [6, 10, 15, 21] * 4
_K = [int(abs(math.sin(i + 1)) * 2**32) & 0xFFFFFFFF for i in range(64)]
_M = 0xFFFFFFFF


def _rotl(x: int, c: int) -> int:
    return ((x << c) | (x >> (32 - c))) & _M


def compress(state: tuple[int, int, int, int], block: bytes) -> tuple[int, int, int, int]:
    """One MD5 compression of a 64-byte block (RFC 1321 §3.4)."""
    if len(block) != 64:
        raise ValueError("MD5 blocks are 64 bytes")
    words = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f, g = (b & c) | (~b & d), i
        elif i < 32:
            f, g = (d & b) | (~d & c), (5 * i + 1) % 16
        elif i < 48:
            f, g = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, g = c ^ (b | (~d & _M)), (7 * i) % 16
        f = (f + a + _K[i] + words[g]) & _M
        a, d, c = d, c, b
        b = (b + _rotl(f, _S[i])) & _M
    return (
        (state[0] + a) & _M,
        (state[1] + b) & _M,
        (state[2] + c) & _M,
        (state[3] + d) & _M,
    )


def finish(state: tuple[int, int, int, int], done: int, data: bytes) -> bytes:
    """MD5 of a message whose first ``done`` bytes gave ``state``, followed by ``data``."""
    total = done + len(data)
    length = struct.pack("<Q", (total * 8) & (2**64 - 1))
    padded = data + b"\x80" + b"\0" * ((55 - total) % 64) + length
    for offset in range(0, len(padded), 64):
        state = compress(state, padded[offset : offset + 64])
    return struct.pack("<4I", *state)
