"""Delivery status notifications (RFC 3464) for failures, delays and successes.

A DSN is a multipart/report (RFC 6522) with a human-readable part, a
message/delivery-status part (one per-recipient block with Action, Status,
Remote-MTA, Diagnostic-Code) and the original message: its header section
when the sender asked RET=HDRS, otherwise its first ``limit`` bytes (Postfix's
bounce_size_limit, 50 000).  Whether a recipient is reported follows its
NOTIFY parameter (RFC 3461 §4.1: absent means FAILURE, and DELAY at the
MTA's discretion; NEVER means nothing).  The DSN of an SMTPUTF8 message is
a global one (RFC 6533): message/global-delivery-status with utf-8 address
types for non-ASCII addresses, and message/global or message/global-headers.
A DSN is never sent to the null reverse-path (RFC 3461 §6.2, RFC 5321
§4.5.5), so bounces never loop.
"""

from __future__ import annotations

import email.utils
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from mailserv.queue.state import QueueItem

BOUNCE_SIZE_LIMIT = 50_000

FAILED, DELAYED, DELIVERED, RELAYED = "failed", "delayed", "delivered", "relayed"

_SUBJECTS = {
    FAILED: "Undelivered Mail Returned to Sender",
    DELAYED: "Delayed Mail (still being retried)",
    DELIVERED: "Successful Mail Delivery Report",
    RELAYED: "Successful Mail Delivery Report",
}

_INTRO = {
    FAILED: "I'm sorry to have to inform you that your message could not\r\n"
    "be delivered to one or more recipients. It's attached below.",
    DELAYED: "Your message could not be delivered yet to one or more recipients.\r\n"
    "Delivery will be retried; you do not need to resend it.",
    DELIVERED: "Your message was successfully delivered to the destination(s) listed below.",
    RELAYED: "Your message was relayed to the destination(s) listed below, which do not\r\n"
    "return delivery notifications themselves.",
}


def wants(notify: Sequence[str] | None, action: str) -> bool:
    """Whether a recipient with this NOTIFY asked for a DSN of ``action`` (RFC 3461 §4.1)."""
    if notify:
        upper = {n.upper() for n in notify}
        if "NEVER" in upper:
            return False
        key = {FAILED: "FAILURE", DELAYED: "DELAY"}.get(action, "SUCCESS")
        return key in upper
    return action in (FAILED, DELAYED)


@dataclass
class Report:
    """One recipient's line of a DSN."""

    address: str
    orcpt: str | None
    action: str
    status: str  # RFC 3463 code, e.g. 5.1.1
    diagnostic: str | None = None  # the remote reply, "550 5.1.1 no such user"
    remote_mta: str | None = None


def status_of(reason: str | None, action: str) -> str:
    """The RFC 3463 code inside a stored reason ("550 5.1.1 text"), or a default."""
    if reason:
        for word in reason.split()[:2]:
            parts = word.split(".")
            if len(parts) == 3 and all(p.isdigit() for p in parts) and word[0] in "245":
                return word
        code = reason[:3]
        if code.isdigit():
            return f"{code[0]}.0.0"
    return {FAILED: "5.0.0", DELAYED: "4.0.0"}.get(action, "2.0.0")


def _header_section(original: bytes) -> bytes:
    end = original.find(b"\r\n\r\n")
    return original[: end + 2] if end >= 0 else original


def _field(value: str) -> str:
    """A DSN field value on one line (no CR/LF can leak into the report)."""
    return " ".join(value.replace("\r", " ").replace("\n", " ").split())


def build(
    hostname: str,
    item: QueueItem,
    reports: Sequence[Report],
    action: str,
    original: bytes,
    complete: bool,
    now: float | None = None,
    retry_until: float | None = None,
) -> bytes:
    """The DSN message (CRLF lines) for ``reports`` about ``item``.

    ``original`` is the start of the queued message; ``complete`` says whether
    it is the whole of it.
    """
    now = time.time() if now is None else now
    entry = item.entry
    boundary = f"{entry.id}.{secrets.token_hex(6)}/{hostname}"
    date = email.utils.formatdate(now, localtime=False)
    arrival = email.utils.formatdate(entry.arrival, localtime=False)
    msgid = f"<{entry.id}.{secrets.token_hex(4)}.dsn@{hostname}>"
    utf8 = entry.smtputf8
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{entry.sender}>",
        f"Subject: {_SUBJECTS[action]}",
        f"Date: {date}",
        f"Message-ID: {msgid}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"This is the mail system at host {hostname}.",
        "",
        _INTRO[action],
        "",
    ]
    for r in reports:
        detail = f": {_field(r.diagnostic)}" if r.diagnostic else ""
        where = f" (from {r.remote_mta})" if r.remote_mta else ""
        lines.append(f"<{r.address}>{where}{detail}")
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    lines += [
        "",
        f"--{boundary}",
        f"Content-Type: {status_type}",
        "",
        f"Reporting-MTA: dns; {hostname}",
    ]
    if entry.envid:
        lines.append(f"Original-Envelope-Id: {_field(entry.envid)}")
    lines.append(f"Arrival-Date: {arrival}")
    for r in reports:
        lines.append("")
        # RFC 6533 §3: a non-ASCII address is of type utf-8 (global DSNs only).
        kind = "utf-8" if utf8 and not r.address.isascii() else "rfc822"
        lines.append(f"Final-Recipient: {kind}; {_field(r.address)}")
        if r.orcpt:
            kind, _, value = r.orcpt.partition(";")
            lines.append(f"Original-Recipient: {kind.strip()}; {_field(value.strip())}")
        lines.append(f"Action: {r.action}")
        lines.append(f"Status: {r.status}")
        if r.remote_mta:
            lines.append(f"Remote-MTA: dns; {_field(r.remote_mta)}")
        if r.diagnostic:
            lines.append(f"Diagnostic-Code: smtp; {_field(r.diagnostic)}")
        if item.last_attempt:
            lines.append(f"Last-Attempt-Date: {email.utils.formatdate(item.last_attempt)}")
        if action == DELAYED and retry_until:
            lines.append(f"Will-Retry-Until: {email.utils.formatdate(retry_until)}")
    lines += ["", f"--{boundary}"]
    head = "\r\n".join(lines).encode("utf-8") + b"\r\n"
    headers_only = (entry.ret or "").upper() == "HDRS" or entry.requiretls  # RFC 8689 §5
    if headers_only or action in (DELIVERED, RELAYED, DELAYED):
        kind = "message/global-headers" if utf8 else "text/rfc822-headers"
        part = f"Content-Type: {kind}\r\n\r\n".encode() + _header_section(original)
    else:
        kind = "message/global" if utf8 else "message/rfc822"
        body = original
        if not complete:
            # Cut at a line end so the last line is whole (Postfix bounce_size_limit).
            cut = body.rfind(b"\r\n")
            body = body[: cut + 2] if cut > 0 else body
        part = f"Content-Type: {kind}\r\n".encode()
        if entry.body == "8BITMIME" or not body.isascii():
            part += b"Content-Transfer-Encoding: 8bit\r\n"
        part += b"\r\n" + body
    if not part.endswith(b"\r\n"):
        part += b"\r\n"
    return head + part + f"\r\n--{boundary}--\r\n".encode()
