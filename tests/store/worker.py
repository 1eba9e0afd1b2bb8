"""A delivering process for the concurrency test: ``python -m tests.store.worker``.

Arguments: format, mailbox path, worker number, message count, start time.
It delivers its messages, synchronises the INBOX after every fifth one and at
the end (so UIDs are handed out while the others deliver) and prints, as
JSON, every uid → key pair it saw.
"""

from __future__ import annotations

import io
import json
import sys
import time

from mailserv.directory import User
from tests.store.helpers import checked_message, config, make_store


def main(argv: list[str]) -> int:
    fmt, mailbox = argv[0], argv[1]
    number, count, start = int(argv[2]), int(argv[3]), float(argv[4])
    # fsync off: this test is about locking and UIDs; the SIGKILL test covers durability.
    store = make_store(fmt, config(format=fmt, fsync=False))
    user = User(name="alice", mailbox=mailbox, store_format=fmt)
    while time.time() < start:
        time.sleep(0.005)
    seen: dict[int, str] = {}
    box = None
    for i in range(count):
        store.deliver(user, io.BytesIO(checked_message(f"w{number}-{i}", 300 + i)))
        if i % 5 and i != count - 1:
            continue
        if box is None:
            box = store.open(user).open_folder("INBOX")
        box.refresh()
        for info in box.messages():
            if seen.setdefault(info.uid, info.key) != info.key:
                print(json.dumps({"error": f"uid {info.uid} changed its message"}))
                return 1
    print(json.dumps({"seen": seen}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
