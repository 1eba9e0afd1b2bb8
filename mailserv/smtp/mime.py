"""MIME structure limits (LIMITS.md: nesting 100, parts 10 000; Postfix mime_nesting_limit).

``check_structure`` walks the multipart structure of a message line by line
(RFC 2046 §5.1.1 boundaries, RFC 2045 §5 Content-Type) without decoding any
part, keeping only the stack of open boundaries: memory stays bounded and a
10 MB message costs a few tens of milliseconds (run it off the reactor for
spooled messages).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_BOUNDARY = re.compile(rb'boundary\s*=\s*(?:"([^"]{1,200})"|([^;\s"]{1,200}))', re.IGNORECASE)


def _boundary(content_type: bytes) -> bytes | None:
    if not content_type.lstrip().lower().startswith(b"multipart/"):
        return None
    m = _BOUNDARY.search(content_type)
    if m is None:
        return None
    return b"--" + (m.group(1) if m.group(1) is not None else m.group(2))


def check_structure(lines: Iterable[bytes], max_depth: int = 100, max_parts: int = 10_000) -> str:
    """'' if the structure is within the limits, else what is wrong ("nesting" or "parts")."""
    stack: list[bytes] = []
    parts = 0
    in_header = True
    content_type: bytes | None = None
    in_content_type = False
    for raw in lines:
        line = raw.rstrip(b"\r\n")
        if in_header:
            if not line:
                in_header = False
                boundary = _boundary(content_type) if content_type is not None else None
                content_type, in_content_type = None, False
                if boundary is not None:
                    stack.append(boundary)
                    if len(stack) > max_depth:
                        return "nesting"
            elif line[:1] in (b" ", b"\t"):
                if in_content_type and content_type is not None and len(content_type) < 2000:
                    content_type += line
            else:
                name, _, value = line.partition(b":")
                in_content_type = name.strip().lower() == b"content-type"
                if in_content_type:
                    content_type = value
            continue
        if not stack or not line.startswith(b"--"):
            continue
        for i in range(len(stack) - 1, -1, -1):
            boundary = stack[i]
            if not line.startswith(boundary):
                continue
            rest = line[len(boundary) :]
            if rest.startswith(b"--"):
                del stack[i:]
            elif not rest.strip(b" \t"):
                del stack[i + 1 :]
                parts += 1
                if parts > max_parts:
                    return "parts"
                in_header = True
            else:
                continue
            break
    return ""
