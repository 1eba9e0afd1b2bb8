"""``mailserv queue list|show ID|flush|retry ID|delete ID|hold ID|release ID``.

The queue is ``<state_dir>/queue`` of the configuration (``--config FILE``, else
$MAILSERV_CONFIG, else the embedded default).  While the server runs (it holds
the queue's lock) changes are sent to it as control requests, which it applies
within a moment; otherwise they are made on disk directly.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Any

from mailserv.config import default_config, load_config
from mailserv.errors import MailservError
from mailserv.queue import queue_dir
from mailserv.queue.state import QueueItem, QueueStore

ACTIONS = ("flush", "retry", "delete", "hold", "release")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "queue",
        help="inspect and manage the outbound queue",
        description="Inspect and manage the outbound mail queue.",
    )
    parser.add_argument("--config", metavar="FILE", help="configuration file")
    sub = parser.add_subparsers(dest="queue_command", metavar="ACTION")
    sub.required = True
    sub.add_parser("list", help="list queued messages").set_defaults(func=run_list)
    show = sub.add_parser("show", help="show one message's envelope, state and headers")
    show.add_argument("id")
    show.set_defaults(func=run_show)
    sub.add_parser("flush", help="try every queued message now").set_defaults(
        func=run_action, action="flush", id=None
    )
    for action, text in (
        ("retry", "try one message now"),
        ("delete", "delete one message without a bounce"),
        ("hold", "keep one message from being delivered"),
        ("release", "release a held message"),
    ):
        p = sub.add_parser(action, help=text)
        p.add_argument("id")
        p.set_defaults(func=run_action, action=action)


def _store(args: argparse.Namespace) -> QueueStore:
    path = args.config or os.environ.get("MAILSERV_CONFIG")
    config = load_config(path) if path else default_config()
    return QueueStore(queue_dir(config))


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _load(store: QueueStore, entry_id: str) -> QueueItem:
    if "/" in entry_id or not store.exists(entry_id):
        raise MailservError(f"no queued message {entry_id}")
    return store.load(entry_id)


def run_list(args: argparse.Namespace) -> int:
    store = _store(args)
    ids = store.ids()
    total = 0
    for entry_id in ids:
        try:
            item = store.load(entry_id)
        except FileNotFoundError:
            continue
        total += item.size
        flag = " (held)" if item.hold else ""
        sender = item.entry.sender or "<>"
        print(f"{entry_id}{flag}  {item.size:>9}  {_when(item.entry.arrival)}  {sender}")
        for queued, state in zip(item.entry.recipients, item.recipients, strict=True):
            if state.status in ("pending", "failed"):
                reason = f"  ({state.reason})" if state.reason else ""
                print(f"        {queued.address}{reason}")
        if item.attempts:
            print(f"        attempts: {item.attempts}, next: {_when(item.next_attempt)}")
    print(f"-- {total // 1024} KiB in {len(ids)} message(s)")
    return 0


def run_show(args: argparse.Namespace) -> int:
    store = _store(args)
    item = _load(store, args.id)
    entry = item.entry
    print(f"id: {entry.id}")
    print(f"arrival: {_when(entry.arrival)}")
    print(f"sender: <{entry.sender}>")
    print(f"size: {item.size}  body: {entry.body}  smtputf8: {entry.smtputf8}")
    if entry.envid or entry.ret:
        print(f"envid: {entry.envid or '-'}  ret: {entry.ret or '-'}")
    print(
        f"attempts: {item.attempts}  last: {_when(item.last_attempt)}  "
        f"next: {_when(item.next_attempt)}  hold: {item.hold}"
    )
    for queued, state in zip(entry.recipients, item.recipients, strict=True):
        notify = f" notify={','.join(queued.notify)}" if queued.notify else ""
        reason = f" {state.reason}" if state.reason else ""
        via = f" via {state.mta}" if state.mta else ""
        print(f"recipient: <{queued.address}>{notify} {state.status}{via}{reason}")
    print()
    with open(store.entry_path(entry.id), "rb") as f:
        f.seek(item.offset)
        head = f.read(65536)
    end = head.find(b"\r\n\r\n")
    sys.stdout.write(head[: end + 2 if end >= 0 else len(head)].decode("utf-8", "replace"))
    return 0


def run_action(args: argparse.Namespace) -> int:
    store = _store(args)
    action, entry_id = args.action, args.id
    if entry_id is not None:
        _load(store, entry_id)  # a clear error for an unknown id
    if not store.try_lock():
        store.post_control(action, entry_id)
        print(f"queue {action}: sent to the running server")
        return 0
    try:
        count = apply_offline(store, action, entry_id)
    finally:
        store.unlock()
    print(f"queue {action}: {count} message(s); the server applies it when it starts")
    return 0


def apply_offline(store: QueueStore, action: str, entry_id: str | None) -> int:
    """Change the state files directly (no server is running)."""
    ids = store.ids() if entry_id is None else [entry_id]
    for one in ids:
        if action == "delete":
            store.remove(one)
            continue
        item = store.load(one)
        if action in ("flush", "retry"):
            if action == "flush" and item.hold:
                continue
            item.next_attempt = 0.0
        elif action in ("hold", "release"):
            item.hold = action == "hold"
            if not item.hold:
                item.next_attempt = 0.0
        store.save(item)
    return len(ids)
