"""POP3 download benchmark: mailserv against Dovecot's pop3 on loopback, same maildir, same client.

One poplib client logs in, RETRs and DELEs every message, then QUITs (the
deletions happen at QUIT, so QUIT is timed too).  Both servers read a fresh
copy of the same maildir each round; plaintext on 127.0.0.1 for both.

    .venv/bin/python bench/pop3.py [--messages 1000] [--size 4096] [--rounds 3]

Needs Debian's dovecot-pop3d (``apt-get install dovecot-pop3d``; where a
policy-rc.d forbids it, installing does not start a system Dovecot).  This
script runs its own Dovecot in the foreground with a private configuration
and stops it afterwards.  Without Dovecot it reports mailserv alone.
"""

from __future__ import annotations

import argparse
import os
import poplib
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
USER = "bench@example.test"
PASSWORD = "bench password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on port {port} within {timeout}s")


def make_maildir(path: Path, count: int, size: int) -> None:
    """``count`` messages of about ``size`` octets in ``path/new`` (CRLF, some "." lines)."""
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    for n in range(count):
        head = (
            b"From: sender@example.test\r\nTo: %s\r\nSubject: benchmark message %d\r\n"
            b"Message-ID: <%d.bench@example.test>\r\n\r\n" % (USER.encode(), n, n)
        )
        body = bytearray()
        while len(head) + len(body) < size - 3:
            body += line if len(body) % 1000 > 80 else b"." + line
        data = head + bytes(body[: size - 3 - len(head)]) + b"\r\n"
        # S= and W= (size with CRLF) as Dovecot and mailserv name delivered files.
        name = f"{1700000000 + n}.M{n}P1.bench,S={len(data)},W={len(data)}"
        (path / "new" / name).write_bytes(data)


def first_login(port: int) -> float:
    """Seconds for a login + QUIT on a maildir the server has never seen (index building)."""
    start = time.perf_counter()
    client = poplib.POP3("127.0.0.1", port, timeout=120)
    client.user(USER)
    client.pass_(PASSWORD)
    client.quit()
    return time.perf_counter() - start


def download(port: int, count: int) -> float:
    """Seconds for one client to fetch and delete everything (login to the end of QUIT)."""
    client = poplib.POP3("127.0.0.1", port, timeout=120)
    start = time.perf_counter()
    client.user(USER)
    client.pass_(PASSWORD)
    n, _ = client.stat()
    if n != count:
        raise SystemExit(f"expected {count} messages on port {port}, found {n}")
    for i in range(1, n + 1):
        client.retr(i)
        client.dele(i)
    client.quit()
    return time.perf_counter() - start


def download_pipelined(port: int, count: int, window: int = 32) -> float:
    """As ``download``, with RETR/DELE pairs sent ``window`` at a time (RFC 2449 PIPELINING)."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = sock.makefile("rb")

        def status() -> bytes:
            line = f.readline()
            if not line.startswith(b"+OK"):
                raise SystemExit(f"port {port}: unexpected {line!r}")
            return line

        status()
        sock.sendall(f"USER {USER}\r\nPASS {PASSWORD}\r\nSTAT\r\n".encode())
        status()
        status()
        if int(status().split()[1]) != count:
            raise SystemExit(f"expected {count} messages on port {port}")
        for first in range(1, count + 1, window):
            numbers = range(first, min(first + window, count + 1))
            sock.sendall(b"".join(b"RETR %d\r\nDELE %d\r\n" % (n, n) for n in numbers))
            for _ in numbers:
                status()
                while f.readline() != b".\r\n":
                    pass
                status()
        sock.sendall(b"QUIT\r\n")
        status()
    return time.perf_counter() - start


class Dovecot:
    """A private Dovecot serving one protocol (pop3 here) over ``mail_root/<user>/Maildir``.

    bench/imap.py's subclass changes only the protocol and its extra settings.
    """

    PROTOCOL = "pop3"
    EXTRA = "pop3_uidl_format = %08Xu%08Xv\n"

    def __init__(self, work: Path, mail_root: Path) -> None:
        self.binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
        self.port = free_port()
        self.work = work
        self.mail_root = mail_root
        # Dovecot never accesses mail as root: as root, the mail belongs to "nobody".
        self.uid, self.gid = (65534, 65534) if os.getuid() == 0 else (os.getuid(), os.getgid())
        (work / "passwd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
        me = pwd.getpwuid(os.getuid())
        if os.getuid() == 0:
            users = "default_internal_user = dovecot\ndefault_login_user = dovenull\n"
        else:
            users = (
                f"default_internal_user = {me.pw_name}\ndefault_login_user = {me.pw_name}\n"
                f"default_internal_group = {me.pw_name}\n"
            )
        proto = self.PROTOCOL
        (work / "dovecot.conf").write_text(
            f"base_dir = {work}/run\nstate_dir = {work}/state\n"
            f"log_path = {work}/dovecot.log\ninfo_log_path = {work}/dovecot.log\n"
            f"{users}protocols = {proto}\nlisten = 127.0.0.1\nssl = no\n"
            "disable_plaintext_auth = no\nauth_mechanisms = plain\n"
            "first_valid_uid = 0\nfirst_valid_gid = 0\n"
            f"mail_location = maildir:{mail_root}/%u/Maildir\n"
            f"{self.EXTRA}"
            f"passdb {{\n  driver = passwd-file\n  args = {work}/passwd\n}}\n"
            f"userdb {{\n  driver = static\n  args = uid={self.uid} gid={self.gid}"
            f" home={mail_root}/%u\n}}\n"
            f"service {proto}-login {{\n  inet_listener {proto} {{\n"
            f"    address = 127.0.0.1\n    port = {self.port}\n  }}\n"
            f"  inet_listener {proto}s {{\n    port = 0\n  }}\n}}\n"
            "service anvil {\n  chroot =\n}\nservice stats {\n  chroot =\n}\n"
        )
        self.proc = subprocess.Popen(
            [self.binary, "-F", "-c", str(work / "dovecot.conf")], start_new_session=True
        )
        wait_port(self.port, self.proc, "dovecot")

    def own(self, path: Path) -> None:
        """Give the copied maildir to the mail user."""
        for directory, _, files in os.walk(path):
            os.chown(directory, self.uid, self.gid)
            for name in files:
                os.chown(os.path.join(directory, name), self.uid, self.gid)

    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True)
        return out.stdout.strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(15)


class Mailserv:
    """``twistd -n mailserv`` with a POP3 listener over ``mail_root/<user>/Maildir``."""

    def __init__(self, work: Path, mail_root: Path) -> None:
        self.port = free_port()
        state = work / "state"
        state.mkdir()
        (state / "users.passwd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}::::::\n")
        config = work / "mailserv.toml"
        config.write_text(
            'config_version = 1\nhostname = "mail.example.test"\ndomains = ["example.test"]\n'
            f'state_dir = "{state}"\n\n'
            "[listeners.pop3]\n"
            f'protocol = "pop3"\nendpoints = ["tcp:{self.port}:interface=127.0.0.1"]\n'
            'tls = "none"\n\n'
            '[auth]\nbackends = ["local"]\n[auth.backend.local]\n'
            f'type = "passwd-file"\npath = "{state}/users.passwd"\n\n'
            f'[store]\nformat = "maildir"\npath = "{mail_root}/{{user}}/Maildir"\n'
        )
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from twisted.scripts.twistd import run; sys.exit(run())",
                "-n",
                "--pidfile=",
                "-l",
                str(work / "mailserv.log"),
                "mailserv",
                "--config",
                str(config),
            ],
            cwd=work,
            env=env,
            start_new_session=True,
        )
        wait_port(self.port, self.proc, "mailserv")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pop3bench-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # Dovecot's mail processes run as an unprivileged user
        template = root / "template"
        make_maildir(template, args.messages, args.size)
        servers: dict[str, tuple[object, Path]] = {}
        dovecot_root = root / "dovecot-mail"
        mailserv_root = root / "mailserv-mail"
        (root / "dovecot").mkdir()
        (root / "mailserv").mkdir()
        try:
            if shutil.which("dovecot") or os.path.exists("/usr/sbin/dovecot"):
                servers["dovecot"] = (Dovecot(root / "dovecot", dovecot_root), dovecot_root)
            else:
                print("dovecot is not installed (apt-get install dovecot-pop3d): mailserv only")
            servers["mailserv"] = (Mailserv(root / "mailserv", mailserv_root), mailserv_root)
            modes = {"poplib": download, "pipelined": download_pipelined}
            results: dict[tuple[str, str], list[float]] = {
                (mode, name): [] for mode in modes for name in servers
            }
            firsts: dict[str, list[float]] = {name: [] for name in servers}
            for _ in range(args.rounds):
                for mode, fetch in modes.items():
                    for name, (server, mail_root) in servers.items():
                        maildir = mail_root / USER / "Maildir"
                        shutil.rmtree(mail_root, ignore_errors=True)
                        shutil.copytree(template, maildir)
                        if isinstance(server, Dovecot):
                            server.own(mail_root)
                        port = server.port  # type: ignore[attr-defined]
                        firsts[name].append(first_login(port))
                        results[mode, name].append(fetch(port, args.messages))
        finally:
            for server, _ in servers.values():
                server.stop()  # type: ignore[attr-defined]

    print(
        f"POP3: one client, {args.messages} messages of {args.size} octets: login, RETR + DELE "
        f"each, QUIT; {args.rounds} rounds, median.  poplib waits for every reply; pipelined "
        "sends 32 RETR/DELE pairs at a time.  'first login' (login + QUIT on the fresh copy "
        "of the maildir, where the server builds its index) is not counted."
    )
    print(f"{'client':<10} {'server':<10} {'download s':>10} {'msgs/s':>8}   (every round)")
    for (mode, name), times in results.items():
        median = statistics.median(times)
        rounds = " ".join(f"{args.messages / t:.0f}" for t in times)
        print(f"{mode:<10} {name:<10} {median:>10.3f} {args.messages / median:>8.0f}   ({rounds})")
    for name, times in firsts.items():
        print(f"first login on a fresh maildir, {name}: {statistics.median(times):.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
