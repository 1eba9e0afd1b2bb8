"""Login-name and password checks done before any backend sees the credentials.

LIMITS.md: a username is made of ``a-z A-Z 0-9 . - _ @ +``, at most 255
bytes (Dovecot's auth_username_chars); it is folded to lower case so that
``Alice`` and ``alice`` are the same account.  Empty passwords are refused
(an LDAP bind with an empty password is an anonymous bind, RFC 4513 §5.1.2),
and so are absurdly long ones (SHA-crypt costs grow with the length).
"""

from __future__ import annotations

import re

MAX_USERNAME_BYTES = 255
MAX_PASSWORD_BYTES = 1024
_USERNAME = re.compile(r"[A-Za-z0-9.\-_@+]{1,255}")


class InvalidUsername(ValueError):
    """The login name has characters or a length no backend is asked about."""


def normalize_username(username: str | bytes) -> str:
    """The canonical form of a login name; raise InvalidUsername when it is not acceptable."""
    if isinstance(username, bytes):
        try:
            username = username.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidUsername("username is not ASCII") from None
    if not _USERNAME.fullmatch(username):
        raise InvalidUsername("username has forbidden characters or length")
    if username.startswith(("@", ".")) or username.count("@") > 1:
        raise InvalidUsername("malformed username")
    return username.lower()


def acceptable_password(password: str | bytes) -> bytes | None:
    """The password as bytes, or None if it must be refused without asking a backend."""
    if isinstance(password, str):
        password = password.encode("utf-8")
    if not password or len(password) > MAX_PASSWORD_BYTES or b"\0" in password:
        return None
    return password
