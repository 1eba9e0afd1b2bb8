"""PAM backend (python-pam): system accounts through a configurable PAM service.

pam_authenticate(3) blocks (and modules may sleep on failure), so it runs in
the ``auth`` pool with a timeout.  PAM_AUTHINFO_UNAVAIL, PAM_SYSTEM_ERR and
friends mean the account source is down: a TemporaryFailure, not a wrong
password.  PAM has no notion of mail addresses: a PAM user ``alice`` gets
mail as ``alice@`` the backend's ``domain`` (or every local domain), and
the directory only answers for names the system knows (getpwnam).
"""

from __future__ import annotations

import pwd
import threading
from typing import Any

from twisted.internet import defer

from mailserv.auth.backend import Backend
from mailserv.directory import User
from mailserv.directory.lookup import make_user, split_address
from mailserv.errors import TemporaryFailure

# Return codes of pam_authenticate(3) that mean "cannot tell now".
_UNAVAILABLE = {
    3,  # PAM_SERVICE_ERR
    4,  # PAM_SYSTEM_ERR
    5,  # PAM_BUF_ERR
    9,  # PAM_AUTHINFO_UNAVAIL
    15,  # PAM_CRED_UNAVAIL
    24,  # PAM_TRY_AGAIN
    26,  # PAM_ABORT
    28,  # PAM_MODULE_UNKNOWN
}


class PAMBackend(Backend):
    """Checker (and a getpwnam directory) over PAM."""

    type_name = "pam"

    def __init__(self, name: str, section: Any, config: Any, reactor: Any, threads: Any) -> None:
        super().__init__(name, section, config, reactor, threads)
        self.timeout = getattr(section, "timeout", self.timeout)
        self._local = threading.local()

    def _pam(self) -> Any:
        import pam  # lazy: loads libpam through ctypes

        handle = getattr(self._local, "handle", None)
        if handle is None:
            handle = self._local.handle = pam.pam()
        return handle

    def _login(self, username: str) -> str | None:
        """The PAM user of a login name: a bare name, or name@our-domain."""
        local, domain = split_address(username)
        if not domain:
            return local
        mine = {self.section.domain} if self.section.domain else set(self.config.domains)
        return local if domain in {d.lower() for d in mine} else None

    def _verify(self, username: str, password: bytes) -> str | None:
        login = self._login(username)
        if login is None:
            return None
        handle = self._pam()
        ok = handle.authenticate(
            login,
            password.decode("utf-8", "surrogateescape"),
            service=self.section.service,
            resetcreds=False,
        )
        if ok:
            return login
        if handle.code in _UNAVAILABLE:
            raise TemporaryFailure(f"PAM service {self.section.service} unavailable")
        return None

    def verify_password(self, username: str, password: bytes) -> defer.Deferred[str | None]:
        return self.threads.run("auth", self._verify, username, password)

    def _find(self, key: str) -> User | None:
        login = self._login(key)
        if login is None:
            return None
        try:
            entry = pwd.getpwnam(login)
        except KeyError:
            return None
        return make_user(
            self.config,
            self.section,
            login,
            home=entry.pw_dir,
            uid=entry.pw_uid,
            gid=entry.pw_gid,
        )

    def find(self, key: str) -> defer.Deferred[User | None]:
        return self.threads.run("auth", self._find, key)
