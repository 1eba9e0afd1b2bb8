"""twisted.cred checker plugins (``--auth`` of twistd/strcred): mailserv's four backends.

- ``--auth passwd-file:/etc/dovecot/users`` (a Dovecot passwd-file)
- ``--auth sql:/etc/mailserv/sql.toml``, ``--auth ldap:/etc/mailserv/ldap.toml``,
  ``--auth pam:SERVICE`` -- the TOML file holds the keys of one
  ``[auth.backend.X]`` table (see etc/mailserv.toml).

Cheap to import: everything heavy is imported when a checker is made.
"""

from __future__ import annotations

from typing import Any

from twisted.cred.credentials import IUsernamePassword
from twisted.cred.strcred import ICheckerFactory
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(ICheckerFactory, IPlugin)
class MailservCheckerFactory:
    """Makes a mailserv MailChecker over one backend from a strcred argument."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, type_name: str, help_text: str, arg_format: str) -> None:
        self.authType = type_name
        self.authHelp = help_text
        self.argStringFormat = arg_format

    def table(self, argstring: str) -> dict[str, Any]:
        """The backend table an argument stands for."""
        if self.authType == "passwd-file":
            return {"type": "passwd-file", "path": argstring}
        if self.authType == "pam":
            return {"type": "pam", "service": argstring or "mailserv"}
        import tomllib

        with open(argstring, "rb") as f:
            return {**tomllib.load(f), "type": self.authType}

    def generateChecker(self, argstring: str = "") -> Any:
        from twisted.internet import reactor

        from mailserv.auth import backend_class
        from mailserv.auth.portal import MailChecker
        from mailserv.config import default_config
        from mailserv.config.schema import Context
        from mailserv.config.sections import AUTH_BACKENDS
        from mailserv.threads import ThreadPools

        ctx = Context(argstring)
        section = AUTH_BACKENDS[self.authType].load(self.table(argstring), ctx, "auth")
        ctx.raise_if_errors()
        config = default_config()
        sizes = {"auth": config.threads.auth, "crypto": config.threads.crypto}
        threads = ThreadPools(reactor, sizes)
        backend = backend_class(self.authType)(self.authType, section, config, reactor, threads)
        return MailChecker(lambda: [backend], reactor)


passwd_file = MailservCheckerFactory(
    "passwd-file",
    "Dovecot passwd-file (user:{SCHEME}hash:...), re-read when it changes.",
    "the path of the passwd-file",
)
sql = MailservCheckerFactory(
    "sql",
    "Users in SQLite, PostgreSQL or MySQL (mailserv's [auth.backend] sql keys).",
    "a TOML file with the keys of an sql backend table",
)
ldap = MailservCheckerFactory(
    "ldap",
    "Users in an LDAP directory: search+bind or direct bind (mailserv's ldap keys).",
    "a TOML file with the keys of an ldap backend table",
)
pam = MailservCheckerFactory("pam", "System accounts through PAM.", "the PAM service name")
