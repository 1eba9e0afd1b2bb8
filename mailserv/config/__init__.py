"""Configuration: TOML (stdlib tomllib) validated into section objects.

``load_config(path)`` reads a file; ``default_config()`` builds the embedded
default that ``twistd -n mailserv`` runs without ``--config``.  Both go through
the same validation, and every problem is reported at once as a ConfigError.
"""

from __future__ import annotations

import os
import tomllib
from typing import Any

from mailserv.config.schema import Context, parse_duration, parse_size
from mailserv.config.sections import (
    AuthSection,
    Config,
    DNSSection,
    ListenerSection,
    PasswdFileBackend,
    StoreSection,
    TLSSection,
)
from mailserv.errors import ConfigError, ConfigProblem

__all__ = [
    "AuthSection",
    "Config",
    "ConfigError",
    "DNSSection",
    "ListenerSection",
    "PasswdFileBackend",
    "StoreSection",
    "TLSSection",
    "default_config",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
]

# Ports of the embedded default: the standard ones as root, these above 1024 otherwise.
DEFAULT_PORTS = {
    "smtp": (25, 2525),
    "submission": (587, 2587),
    "submissions": (465, 2465),
    "imap": (143, 2143),
    "imaps": (993, 2993),
    "pop3": (110, 2110),
    "pop3s": (995, 2995),
}


def parse_config(text: str, file: str = "<config>", base_dir: str | None = None) -> Config:
    """Validate TOML text; raise ConfigError listing every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem(file, "", f"TOML syntax error: {exc}")]) from None
    return from_dict(raw, file, base_dir)


def from_dict(raw: dict[str, Any], file: str = "<config>", base_dir: str | None = None) -> Config:
    ctx = Context(file)
    config = Config.load(raw, ctx)
    ctx.raise_if_errors()
    assert config is not None
    config.source = file
    base = base_dir if base_dir is not None else os.getcwd()
    config.state_dir = os.path.abspath(os.path.join(base, config.state_dir))
    _absolutise(config, base)
    return config


def load_config(path: str) -> Config:
    """Read and validate a configuration file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError([ConfigProblem(path, "", f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigProblem(path, "", "not UTF-8 text")]) from None
    return parse_config(text, path, os.path.dirname(os.path.abspath(path)))


def _absolutise(config: Config, base: str) -> None:
    """Make the file paths of the config absolute, relative to the config file's directory."""

    def fix(path: str | None) -> str | None:
        if path is None or os.path.isabs(path):
            return path
        return os.path.abspath(os.path.join(base, path))

    config.tls.cert_file = fix(config.tls.cert_file)
    config.tls.key_file = fix(config.tls.key_file)
    for extra in config.tls.certificates:
        extra.cert_file = fix(extra.cert_file) or extra.cert_file
        extra.key_file = fix(extra.key_file) or extra.key_file
    for backend in config.auth.backend.values():
        for key in ("path", "password_file", "bind_password_file", "ca_file"):
            if hasattr(backend, key):
                setattr(backend, key, fix(getattr(backend, key)))
        if getattr(backend, "driver", None) == "sqlite":
            backend.database = fix(backend.database)  # type: ignore[attr-defined]
    if not config.store.path.startswith("{"):
        config.store.path = fix(config.store.path) or config.store.path


def default_config(
    domain: str = "localhost",
    home: str | None = None,
    interface: str = "127.0.0.1",
    root: bool | None = None,
) -> Config:
    """The embedded default: one domain, state under ``home`` (``$MAILSERV_HOME`` or ./var).

    A passwd-file of users in the state directory, maildirs under it, every
    listener on ``interface``, standard ports as root, ports above 1024 otherwise.
    """
    if home is None:
        home = os.environ.get("MAILSERV_HOME") or "var"
    home = os.path.abspath(home)
    if root is None:
        root = os.geteuid() == 0
    port = {name: ports[0] if root else ports[1] for name, ports in DEFAULT_PORTS.items()}
    iface = interface.replace(":", "\\:")

    def ep(name: str) -> list[str]:
        kind = "tcp6" if ":" in interface else "tcp"
        return [f"{kind}:{port[name]}:interface={iface}"]

    raw: dict[str, Any] = {
        "config_version": 1,
        "hostname": domain,
        "domains": [domain],
        "state_dir": home,
        "listeners": {
            "mx": {"protocol": "smtp", "endpoints": ep("smtp"), "tls": "starttls"},
            "submission": {
                "protocol": "submission",
                "endpoints": ep("submission"),
                "tls": "starttls",
            },
            "submissions": {
                "protocol": "submission",
                "endpoints": ep("submissions"),
                "tls": "implicit",
            },
            "imap": {"protocol": "imap", "endpoints": ep("imap"), "tls": "starttls"},
            "imaps": {"protocol": "imap", "endpoints": ep("imaps"), "tls": "implicit"},
            "pop3": {"protocol": "pop3", "endpoints": ep("pop3"), "tls": "starttls"},
            "pop3s": {"protocol": "pop3", "endpoints": ep("pop3s"), "tls": "implicit"},
        },
        "auth": {
            "backends": ["local"],
            "backend": {
                "local": {"type": "passwd-file", "path": os.path.join(home, "users.passwd")}
            },
        },
        "store": {
            "format": "maildir",
            "path": os.path.join(home, "mail", "{domain}", "{localpart}", "Maildir"),
        },
    }
    return from_dict(raw, "<embedded default>", home)
