"""``mailserv check [FILE]``: validate a configuration and report every problem."""

from __future__ import annotations

import argparse
from typing import Any

from mailserv.config import load_config


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "check",
        help="validate a configuration file",
        description="Validate a configuration file; print every problem with its key.",
    )
    parser.add_argument("config", metavar="FILE", help="the configuration file (TOML)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(
        f"{args.config}: OK ({len(config.listeners)} listeners, "
        f"{len(config.domains)} domains, state in {config.state_dir})"
    )
    return 0
