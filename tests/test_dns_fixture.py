"""The test DNS server (tests/support/dnsserver.py) survives a TCP port clash at start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "support" / "dnsserver.py"

# Run the server with its first TCP bind refused, as when another test holds that port.
CLASH = """
import runpy, sys
from twisted.internet import reactor
from twisted.internet.error import CannotListenError
listen_tcp = reactor.listenTCP
attempts = []
def clash(port, *args, **kwargs):
    attempts.append(port)
    if len(attempts) == 1:
        raise CannotListenError("127.0.0.1", port, OSError("address in use"))
    return listen_tcp(port, *args, **kwargs)
reactor.listenTCP = clash
reactor.callLater(0.3, reactor.stop)
sys.argv = ["dnsserver.py", sys.argv[1], sys.argv[2]]
runpy.run_path(%r, run_name="__main__")
print(len(attempts))
"""


def test_a_tcp_port_clash_at_start_is_retried_on_another_port(tmp_path: Path) -> None:
    zones = tmp_path / "zones.json"
    zones.write_text("{}")
    portfile = tmp_path / "port"
    result = subprocess.run(
        [sys.executable, "-c", CLASH % str(SCRIPT), str(zones), str(portfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2"
    assert int(portfile.read_text()) > 0
