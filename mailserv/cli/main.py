"""``mailserv``: administration commands.

Subcommands live in modules of this package, each exposing
``register(subparsers)``; a subcommand sets ``func(args) -> int`` with
``set_defaults``.  Errors are printed as one clear line and exit non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mailserv import __version__
from mailserv.errors import ConfigError, MailservError

COMMAND_MODULES = [
    "mailserv.cli.check",
    "mailserv.cli.users",
    "mailserv.cli.queue",
    "mailserv.cli.dkim",
    "mailserv.cli.dnsrecords",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailserv",
        description="Administer a mailserv mail server.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    version = sub.add_parser("version", help="print the version", description="Print the version.")
    version.set_defaults(func=lambda args: print(f"mailserv {__version__}") or 0)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"mailserv: {problem}", file=sys.stderr)
        return 1
    except (MailservError, OSError) as exc:
        print(f"mailserv {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
