"""The sections of mailserv's configuration file (see etc/mailserv.toml)."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from mailserv.config.schema import (
    Context,
    Invalid,
    Section,
    boolean,
    choice,
    duration,
    host_port,
    integer,
    list_of,
    map_of,
    network,
    nonempty_string,
    option,
    optional,
    polymorphic,
    size,
    string,
    table_of,
)
from mailserv.config.schema import (
    hostname as domain_name,
)

PROTOCOLS = ("smtp", "submission", "imap", "pop3", "metrics")
TLS_MODES = ("none", "starttls", "implicit")

_ENDPOINT_PREFIXES = ("tcp", "tcp6", "unix", "systemd")


def endpoint(value: Any, ctx: Context, key: str) -> str:
    """A Twisted server endpoint string (tcp:25, tcp6:25:interface=\\:\\:1, unix:/path)."""
    value = nonempty_string(value, ctx, key)
    kind, _, rest = value.partition(":")
    if kind == "ssl":
        raise Invalid('use tls = "implicit" on the listener instead of an ssl: endpoint')
    if kind not in _ENDPOINT_PREFIXES or not rest:
        raise Invalid(f"expected an endpoint such as 'tcp:25' or 'tcp6:25', got {value!r}")
    if kind in ("tcp", "tcp6"):
        port = re.split(r"(?<!\\):", rest)[0]
        if port.startswith("port="):
            port = port[5:]
        if not port.isdigit() or int(port) > 65535:
            raise Invalid(f"bad port {port!r} in {value!r}")
    return value


class CertificateSection(Section):
    """``[[tls.certificates]]``: one more certificate, served to clients that ask for its names."""

    cert_file: str = option(string)
    key_file: str = option(string)


class TLSSection(Section):
    """``[tls]``: the server certificate (a self-signed pair is generated when omitted)."""

    cert_file: str | None = option(optional(string), None)
    key_file: str | None = option(optional(string), None)
    min_version: str = option(choice("TLSv1.2", "TLSv1.3"), "TLSv1.2")
    # SNI: each certificate answers the server names in its subjectAltName (wildcards too).
    certificates: list[CertificateSection] = option(list_of(table_of(CertificateSection)), list)

    def validate(self, ctx: Context, path: str) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            ctx.error(path or "tls", "set both cert_file and key_file, or neither")


class ListenerSection(Section):
    """``[listeners.NAME]``: one protocol on a set of endpoints."""

    protocol: str = option(choice(*PROTOCOLS))
    endpoints: list[str] = option(list_of(endpoint, nonempty=True))
    tls: str = option(choice(*TLS_MODES), "starttls")
    proxy_protocol: bool = option(boolean, False)
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = option(
        list_of(network), list
    )
    # "loopback": cleartext AUTH/LOGIN/USER only from 127.0.0.0/8 and ::1 (LIMITS.md).
    allow_plaintext_auth: str = option(choice("never", "loopback", "always"), "loopback")
    pipeline: str | None = option(optional(string), None)
    # metrics: who may scrape (loopback only when empty).
    allow_from: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = option(list_of(network), list)
    max_connections_per_ip: int | None = option(integer(1), None)
    idle_timeout: float | None = option(duration, None)
    # POP3 LOGIN-DELAY (RFC 2449 §6.8): least time between two logins of one user; 0 = none.
    login_delay: float = option(duration, 0.0)
    max_message_size: int = option(size, 10_240_000)
    max_recipients: int = option(integer(1), 1000)
    add_auth_user_to_received: bool = option(boolean, False)
    # Submission: the envelope sender and From must belong to the AUTH user (RFC 6409 §6.1).
    sender_login_match: bool = option(boolean, True)
    max_messages_per_connection: int = option(integer(1), 1000)  # LIMITS.md; then 421

    def validate(self, ctx: Context, path: str) -> None:
        if self.allow_from and self.protocol != "metrics":
            ctx.error(f"{path}.allow_from", 'only meaningful with protocol = "metrics"')
        if self.protocol == "metrics" and self.tls == "starttls":
            ctx.error(f"{path}.tls", 'HTTP has no STARTTLS: use "none" or "implicit"')
        if self.proxy_protocol and not self.trusted_proxies:
            ctx.error(f"{path}.trusted_proxies", "proxy_protocol = true needs trusted proxies")
        if self.trusted_proxies and not self.proxy_protocol:
            ctx.error(f"{path}.trusted_proxies", "only meaningful with proxy_protocol = true")


# --------------------------------------------------------------------------
# Authentication backends; the auth package adds behaviour, these are the keys.


class BackendSection(Section):
    type: str = option(string)
    # Directory answers: where the mailbox is; a template overriding [store].path.
    mailbox_path: str | None = option(optional(string), None)


class PasswdFileBackend(BackendSection):
    """Dovecot passwd-file: ``user:{SCHEME}hash:uid:gid::home::extra_fields``."""

    path: str = option(nonempty_string)
    default_scheme: str = option(string, "ARGON2ID")


class SQLBackend(BackendSection):
    driver: str = option(choice("sqlite", "postgresql", "mysql"), "sqlite")
    database: str = option(nonempty_string)
    host: str = option(string, "127.0.0.1")
    port: int | None = option(integer(1, 65535), None)
    user: str = option(string, "")
    password_file: str | None = option(optional(string), None)
    password_query: str | None = option(optional(string), None)
    user_query: str | None = option(optional(string), None)
    timeout: float = option(duration, 5.0)
    pool_size: int = option(integer(1, 100), 5)
    # Aliases of a user (one address per row); bound parameter :user.
    aliases_query: str | None = option(optional(string), None)
    # Scheme of stored passwords without a {SCHEME} prefix, and of new ones (mailserv user).
    default_scheme: str = option(string, "ARGON2ID")


class LDAPBackend(BackendSection):
    urls: list[str] = option(list_of(nonempty_string, nonempty=True))
    base_dn: str = option(nonempty_string)
    bind_dn: str | None = option(optional(string), None)
    bind_password_file: str | None = option(optional(string), None)
    user_filter: str = option(string, "(&(objectClass=inetOrgPerson)(|(uid={user})(mail={user})))")
    bind_dn_template: str | None = option(optional(string), None)
    start_tls: bool = option(boolean, False)
    ca_file: str | None = option(optional(string), None)
    timeout: float = option(duration, 5.0)
    pool_size: int = option(integer(1, 100), 5)
    mail_attribute: str = option(string, "mail")
    alias_attribute: str = option(string, "mailAlternateAddress")
    quota_attribute: str | None = option(optional(string), None)
    mailbox_attribute: str | None = option(optional(string), None)
    # Filter of directory (recipient) lookups; default: mail_attribute or alias_attribute
    # equal to the address, among inetOrgPerson entries.
    address_filter: str | None = option(optional(string), None)


class PAMBackend(BackendSection):
    service: str = option(nonempty_string, "mailserv")
    # PAM knows no mail addresses: the domain a bare PAM user gets mail under.
    domain: str | None = option(optional(domain_name), None)
    # A PAM stack that has not answered by then is a temporary failure.
    timeout: float = option(duration, 10.0)


AUTH_BACKENDS: dict[str, type[Section]] = {
    "passwd-file": PasswdFileBackend,
    "sql": SQLBackend,
    "ldap": LDAPBackend,
    "pam": PAMBackend,
}


def _backend_map(value: Any, ctx: Context, key: str) -> dict[str, Section]:
    if not isinstance(value, dict):
        raise Invalid("expected a table")
    kind = polymorphic(AUTH_BACKENDS)
    out = {}
    for name, sub in value.items():
        loaded = kind(sub, ctx, f"{key}.{name}")
        if loaded is not None:
            out[name] = loaded
    return out


class AuthSection(Section):
    backends: list[str] = option(list_of(nonempty_string), list)
    backend: dict[str, BackendSection] = option(_backend_map, dict)
    failure_delay: float = option(duration, 2.0)
    max_penalty: float = option(duration, 15.0)
    pop_before_smtp: float = option(duration, 0.0)
    # An sql backend whose database keeps the POP-before-SMTP state (shared by several
    # nodes); by default a SQLite file in state_dir.
    pop_before_smtp_backend: str | None = option(optional(string), None)

    def validate(self, ctx: Context, path: str) -> None:
        for i, name in enumerate(self.backends):
            if name not in self.backend:
                ctx.error(f"{path}.backends[{i}]", f"no [{path}.backend.{name}] table")
        shared = self.pop_before_smtp_backend
        if shared is not None and getattr(self.backend.get(shared), "type", None) != "sql":
            ctx.error(f"{path}.pop_before_smtp_backend", f"no sql backend named {shared!r}")


class StoreSection(Section):
    format: str = option(choice("maildir", "mbox"), "maildir")
    path: str = option(nonempty_string)
    quota: int = option(size, 51_200_000)
    quota_messages: int = option(integer(0), 0)
    over_quota: str = option(choice("tempfail", "reject"), "tempfail")
    fsync: bool = option(boolean, True)

    def validate(self, ctx: Context, path: str) -> None:
        if not any(f"{{{v}}}" in self.path for v in ("localpart", "user", "home")):
            ctx.error(f"{path}.path", "must contain {localpart}, {user} or {home}")
        try:
            self.path.format(domain="d", localpart="l", user="u", home="h")
        except (KeyError, IndexError, ValueError) as exc:
            ctx.error(f"{path}.path", f"bad template: {exc}")


class DNSSection(Section):
    nameservers: list[tuple[str, int]] = option(list_of(host_port(53)), list)
    timeout: float = option(duration, 5.0)
    cache_size: int = option(integer(0), 10_000)


class ThreadsSection(Section):
    """Sizes of the bounded thread pools (mailserv/threads.py)."""

    dns: int = option(integer(1, 256), 10)
    auth: int = option(integer(1, 256), 10)
    disk: int = option(integer(1, 256), 10)
    crypto: int = option(integer(1, 256), 4)
    # Python's GIL switch interval for the daemon (sys.setswitchinterval): how long a pool
    # thread back from a system call may wait for the reactor to hand over the GIL.
    switch_interval: float = option(duration, 0.0005)

    def validate(self, ctx: Context, path: str) -> None:
        if not 0.00001 <= self.switch_interval <= 0.1:
            ctx.error(f"{path or 'threads'}.switch_interval", "must be between 0.01ms and 100ms")


class PipelineEntry(Section):
    """One filter of a pipeline; the filter's own keys are checked by the filter registry."""

    filter: str = option(nonempty_string)
    options: dict[str, Any]

    @classmethod
    def load(cls, raw: Any, ctx: Context, path: str = "") -> PipelineEntry | None:  # type: ignore[override]
        if not isinstance(raw, dict):
            ctx.error(path, "expected a table")
            return None
        if not isinstance(raw.get("filter"), str) or not raw["filter"]:
            ctx.error(f"{path}.filter", "is required")
            return None
        entry = cls(filter=raw["filter"])
        entry.options = {k: v for k, v in raw.items() if k != "filter"}
        return entry


def _pipelines(value: Any, ctx: Context, key: str) -> dict[str, list[PipelineEntry]]:
    if not isinstance(value, dict):
        raise Invalid("expected a table of [[pipelines.NAME]] arrays")
    out: dict[str, list[PipelineEntry]] = {}
    for name, entries in value.items():
        if not isinstance(entries, list):
            ctx.error(f"{key}.{name}", "expected an array of tables ([[pipelines.NAME]])")
            continue
        loaded = [PipelineEntry.load(e, ctx, f"{key}.{name}[{i}]") for i, e in enumerate(entries)]
        out[name] = [e for e in loaded if e is not None]
    return out


def _alias_table(value: Any, ctx: Context, key: str) -> dict[str, list[str]]:
    """``[aliases]``: "addr" or "@domain" (catch-all) = "target" or ["t1", "t2"]."""
    if not isinstance(value, dict):
        raise Invalid("expected a table of address = target(s)")
    out: dict[str, list[str]] = {}
    for name, targets in value.items():
        if isinstance(targets, str):
            targets = [targets]
        if (
            not isinstance(targets, list)
            or not targets
            or not all(isinstance(t, str) and t for t in targets)
        ):
            ctx.error(f"{key}.{name}", "expected an address or a list of addresses")
            continue
        out[name.lower()] = list(targets)
    return out


class DeliverySection(Section):
    """``[delivery]``: local delivery policy of the router (mailserv/smtp/delivery.py)."""

    recipient_delimiter: str = option(string, "+")  # RFC 5233 user+detail; "" disables
    detail_to_folder: bool = option(boolean, True)  # user+detail@ into folder "detail" if it exists
    # Where postmaster@ and abuse@ of every local domain go (RFC 5321 §4.5.1) when no
    # user or alias has that name; default: a maildir under state_dir/postmaster.
    postmaster: str | None = option(optional(string), None)
    # Child processes that write accepted mail to the store and the outbound queue
    # (mailserv/helpers.py); 0 = the disk threads of the listening process.
    processes: int = option(integer(0, 64), 2)


class QueueSection(Section):
    """``[queue]``: the outbound queue and its SMTP client (mailserv/queue/, LIMITS.md)."""

    # "inline": the process with the listeners delivers; "process": a child process
    # (python -m mailserv.queue.worker, restarted if it dies) delivers, on its own core.
    delivery: str = option(choice("inline", "process"), "inline")
    # Port of remote MXs (25; tests and benchmarks point it at a loopback sink).
    smtp_port: int = option(integer(1, 65535), 25)
    retry_first: float = option(duration, 300.0)  # Postfix minimal_backoff_time
    retry_max: float = option(duration, 4000.0)  # Postfix maximal_backoff_time
    lifetime: float = option(duration, 5 * 86400.0)  # Postfix maximal_queue_lifetime
    delay_warning: float = option(duration, 4 * 3600.0)  # 0 disables delay DSNs
    max_deliveries: int = option(integer(1, 10_000), 100)  # messages in flight at once
    destination_concurrency: int = option(integer(1, 1000), 20)  # connections per domain
    connection_reuse_time: float = option(duration, 2.0)  # idle connection kept for reuse
    max_messages_per_connection: int = option(integer(1), 100)
    scan_interval: float = option(duration, 30.0)  # full rescan of the queue directory
    helo_name: str | None = option(optional(domain_name), None)  # default: hostname
    own_addresses: list[str] = option(list_of(string), list)  # besides the listeners'
    prefer_ipv6: bool = option(boolean, True)
    tls_ca_file: str | None = option(optional(string), None)  # default: system roots
    dane: bool = option(boolean, True)  # RFC 7672, needs a validating resolver
    mta_sts: bool = option(boolean, True)  # RFC 8461
    mta_sts_port: int = option(integer(1, 65535), 443)
    relay_host: tuple[str, int] | None = option(optional(host_port(25)), None)  # smarthost
    relay_tls: str = option(choice("may", "encrypt", "verify"), "verify")
    relay_user: str | None = option(optional(string), None)  # AUTH to the smarthost
    relay_password_file: str | None = option(optional(string), None)
    bounce_size_limit: int = option(size, 50_000)  # Postfix bounce_size_limit
    connect_timeout: float = option(duration, 60.0)  # RFC 5321 §4.5.3.2
    greeting_timeout: float = option(duration, 300.0)
    command_timeout: float = option(duration, 300.0)
    data_timeout: float = option(duration, 120.0)
    block_timeout: float = option(duration, 180.0)
    final_timeout: float = option(duration, 600.0)

    def validate(self, ctx: Context, path: str) -> None:
        for i, text in enumerate(self.own_addresses):
            try:
                ipaddress.ip_address(text)
            except ValueError:
                ctx.error(f"{path}.own_addresses[{i}]", f"not an IP address: {text!r}")
        if self.retry_max < self.retry_first:
            ctx.error(f"{path}.retry_max", "must not be shorter than retry_first")


class DKIMSection(Section):
    """``[dkim]``: signing of outbound mail (keys from ``mailserv dkim keygen``)."""

    sign: bool = option(boolean, True)
    key_dir: str | None = option(optional(string), None)  # default: state_dir/dkim


class Config(Section):
    """The whole configuration file."""

    config_version: int = option(integer(1, 1))
    hostname: str = option(domain_name)
    domains: list[str] = option(list_of(domain_name, nonempty=True))
    state_dir: str = option(nonempty_string)
    tls: TLSSection = option(table_of(TLSSection), TLSSection)
    listeners: dict[str, ListenerSection] = option(map_of(ListenerSection), dict)
    auth: AuthSection = option(table_of(AuthSection), AuthSection)
    store: StoreSection = option(table_of(StoreSection))
    dns: DNSSection = option(table_of(DNSSection), DNSSection)
    threads: ThreadsSection = option(table_of(ThreadsSection), ThreadsSection)
    pipelines: dict[str, list[PipelineEntry]] = option(_pipelines, dict)
    aliases: dict[str, list[str]] = option(_alias_table, dict)
    delivery: DeliverySection = option(table_of(DeliverySection), DeliverySection)
    queue: QueueSection = option(table_of(QueueSection), QueueSection)
    dkim: DKIMSection = option(table_of(DKIMSection), DKIMSection)
    shutdown_timeout: float = option(duration, 30.0)

    # Where the file came from; relative paths in it are relative to its directory.
    source: str = ""

    def validate(self, ctx: Context, path: str) -> None:
        for name, listener in self.listeners.items():
            if listener.pipeline is not None and listener.pipeline not in self.pipelines:
                ctx.error(
                    f"listeners.{name}.pipeline", f"no [[pipelines.{listener.pipeline}]] defined"
                )
