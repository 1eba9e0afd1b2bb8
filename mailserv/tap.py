"""``twistd mailserv``: command-line options and the service maker.

Without ``--config`` the embedded default runs: domain ``localhost`` (or
``--domain``), state under ``./var`` (or ``$MAILSERV_HOME`` / ``--home``),
ports above 1024 on 127.0.0.1 unless run as root.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.logger import Logger
from twisted.python import usage

from mailserv.config import Config, default_config, load_config
from mailserv.errors import ConfigError

log = Logger()


class Options(usage.Options):
    synopsis = "[--config FILE [--check]] | [--domain DOMAIN] [--home DIR] [--interface ADDR]"
    longdesc = (
        "Run the mailserv mail server (SMTP MX, submission, IMAP4, POP3). "
        "Without --config it serves DOMAIN from the embedded default configuration."
    )
    optFlags = [
        ["check", None, "Validate the configuration, print every problem and exit."],
    ]
    optParameters = [
        ["config", "c", None, "The configuration file (TOML)."],
        ["domain", "d", "localhost", "Embedded default only: the local mail domain."],
        [
            "home",
            None,
            None,
            "Embedded default only: state directory ($MAILSERV_HOME or ./var).",
        ],
        ["interface", None, "127.0.0.1", "Embedded default only: the address to listen on."],
    ]

    def postOptions(self) -> None:
        try:
            self.config = load(self)
        except ConfigError as exc:
            for problem in exc.problems:
                print(f"mailserv: {problem}", file=sys.stderr)
            raise SystemExit(1) from None
        if self["check"]:
            print(f"{self.config.source}: OK")
            raise SystemExit(0)


def load(options: Any) -> Config:
    if options["config"]:
        return load_config(options["config"])
    return default_config(
        domain=options["domain"], home=options["home"], interface=options["interface"]
    )


def makeService(options: Options) -> Any:
    from twisted.internet import reactor

    from mailserv.service import MailService

    config = options.config
    try:
        service = MailService.from_config(config, reactor, handle_signals=True)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"mailserv: {problem}", file=sys.stderr)
        raise SystemExit(1) from None
    if options["config"]:
        how = f"mailserv user --config {options['config']} add USER@{config.domains[0]}"
    else:
        how = f"MAILSERV_HOME={config.state_dir} mailserv user add USER@{config.domains[0]}"
    log.info(
        "mailserv serving {domains} with state in {state}; add a user with: {how}",
        domains=", ".join(config.domains),
        state=config.state_dir,
        how=how,
    )
    return service
