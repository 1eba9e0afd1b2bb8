"""IMAP end to end: ``twistd -n mailserv`` on loopback with the real stores, the real portal
and TLS, driven by Python's imaplib and imapclient (with an SMTP delivery during IDLE),
mbsync (isync) and mutt, for maildir and mbox.
"""

from __future__ import annotations

import imaplib
import io
import os
import smtplib
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from mailserv.config import from_dict
from mailserv.directory import User
from mailserv.store import store_for
from tests.support.process import test_config as make_config

pytestmark = pytest.mark.integration

USER = "alice@example.test"
PASSWORD = "secret one"
FORMATS = ["maildir", "mbox"]


def message(n: int, subject: str = "hello") -> bytes:
    return (
        f"From: Sender <sender{n}@example.org>\r\nTo: {USER}\r\nSubject: {subject} {n}\r\n"
        f"Message-ID: <m{n}@example.org>\r\nDate: Mon, 7 Feb 1994 21:52:25 -0800\r\n\r\n"
        f"body of message {n}\r\n"
    ).encode()


class Site:
    """A running mailserv with IMAP (STARTTLS), IMAPS and an MX listener, and one user."""

    def __init__(self, mailserv: Any, state_dir: Path, test_ca: Any, store_format: str) -> None:
        state_dir.joinpath("users.passwd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}::::::\n")
        path = "mail/{domain}/{localpart}/" + ("Maildir" if store_format == "maildir" else "inbox")
        self.config_dict = make_config(
            state_dir,
            listeners={
                "imap": {"allow_plaintext_auth": "never"},
                "imaps": {},
                "mx": {"tls": "none"},
            },
            tls=(test_ca.cert_file, test_ca.key_file),
            store={"format": store_format, "path": str(state_dir / path)},
        )
        self.config = from_dict(self.config_dict)
        self.state_dir = state_dir
        self.ca_file = test_ca.ca_file
        self.process = mailserv.start(self.config_dict)
        self.port = self.process.port("imap")
        self.tls_port = self.process.port("imaps")
        self.mx_port = self.process.port("mx")
        mailbox = self.config.store.path.format(domain="example.test", localpart="alice")
        self.user = User(name=USER, mailbox=mailbox, store_format=store_format)
        self.store = store_for(self.user, self.config.store)

    def deliver(self, *messages: bytes) -> None:
        for m in messages:
            self.store.deliver(self.user, io.BytesIO(m))

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    def starttls_client(self) -> imaplib.IMAP4:
        c = imaplib.IMAP4("127.0.0.1", self.port, timeout=30)
        c.starttls(self.tls_context())
        c.login(USER, PASSWORD)
        return c

    def flags(self, folder: str = "INBOX") -> list[frozenset[str]]:
        box = self.store.open(self.user).open_folder(folder)
        try:
            box.refresh()
            return [m.all_flags for m in box.messages()]
        finally:
            box.close()


@pytest.fixture(params=FORMATS)
def site(request: Any, mailserv: Any, state_dir: Path, test_ca: Any) -> Site:
    return Site(mailserv, state_dir, test_ca, request.param)


def test_imaplib_session_over_starttls(site: Site) -> None:
    site.deliver(message(1), message(2), message(3))
    plain = imaplib.IMAP4("127.0.0.1", site.port, timeout=30)
    assert "LOGINDISABLED" in plain.capabilities and "STARTTLS" in plain.capabilities
    plain.logout()
    c = site.starttls_client()
    typ, data = c.select("INBOX")
    assert (typ, data) == ("OK", [b"3"])
    assert c.untagged_responses.get("UIDNEXT") == [b"4"]
    typ, data = c.fetch("1", "(BODY.PEEK[]<0.20>)")
    assert data[0][1] == message(1)[:20]
    typ, data = c.uid("FETCH", "2", "(RFC822.SIZE BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"RFC822.SIZE %d" % len(message(2)) in data[0][0]
    assert data[0][1] == b"Subject: hello 2\r\n\r\n"
    typ, data = c.append("INBOX", None, None, message(4))
    assert typ == "OK" and b"APPENDUID" in data[0]
    typ, data = c.append("Nope", None, None, message(5))
    assert typ == "NO" and b"TRYCREATE" in data[0]
    c.store("1", "+FLAGS", "(\\Seen \\Flagged)")
    assert c.search(None, "FLAGGED") == ("OK", [b"1"])
    typ, data = c.copy("2", "Archive")
    assert typ == "OK" and b"COPYUID" in data[0]
    c.store("2", "+FLAGS", "(\\Deleted)")
    typ, data = c.expunge()
    assert data == [b"2"]
    c.close()
    c.logout()
    assert site.flags()[0] == {"\\Seen", "\\Flagged"}
    assert len(site.flags("Archive")) == 1


def test_imapclient_over_implicit_tls_with_idle_and_smtp_delivery(site: Site) -> None:
    try:
        import imapclient
    except ImportError:
        if os.environ.get("MAILSERV_REQUIRE_INTEGRATION") == "1":
            pytest.fail("imapclient is not installed (pip install -e '.[test]')")
        pytest.skip("imapclient is not installed (pip install -e '.[test]')")
    site.deliver(message(1))
    c = imapclient.IMAPClient("127.0.0.1", port=site.tls_port, ssl_context=site.tls_context())
    c.login(USER, PASSWORD)
    caps = c.capabilities()
    for cap in (b"IDLE", b"UIDPLUS", b"MOVE", b"CONDSTORE", b"SPECIAL-USE", b"QUOTA"):
        assert cap in caps
    folders = {name: flags for flags, _, name in c.list_folders()}
    assert b"\\Sent" in folders["Sent"] and b"\\Trash" in folders["Trash"]
    c.select_folder("INBOX")
    c.idle()
    with smtplib.SMTP("127.0.0.1", site.mx_port, timeout=30) as smtp:
        smtp.sendmail("bob@example.org", [USER], message(2, "pushed"))
    started = time.monotonic()
    responses = c.idle_check(timeout=10)
    c.idle_done()
    assert (2, b"EXISTS") in responses, responses
    assert time.monotonic() - started < 2
    fetched = c.fetch([2], ["ENVELOPE", "FLAGS"])
    assert fetched[2][b"ENVELOPE"].subject == b"pushed 2"
    c.move([2], "Trash")
    assert c.search() == [1]
    c.logout()


def test_idle_sees_other_session_within_a_second(site: Site) -> None:
    site.deliver(message(1), message(2))
    idler = site.starttls_client()
    idler.select("INBOX")
    tag = idler._new_tag()
    idler.send(tag + b" IDLE\r\n")
    assert idler.readline().startswith(b"+")
    other = site.starttls_client()
    other.select("INBOX")
    other.store("1", "+FLAGS", "(\\Flagged)")
    started = time.monotonic()
    line = idler.readline()
    assert line == b"* 1 FETCH (FLAGS (\\Flagged))\r\n" or b"FETCH" in line, line
    assert time.monotonic() - started < 1
    other.store("2", "+FLAGS", "(\\Deleted)")
    other.expunge()
    lines = [idler.readline()]
    while lines[-1].startswith(b"* 2 FETCH"):
        lines.append(idler.readline())
    assert lines[-1] == b"* 2 EXPUNGE\r\n", lines
    idler.send(b"DONE\r\n")
    assert idler.readline() == tag + b" OK IDLE terminated\r\n"
    other.logout()
    idler.logout()


def _mbsync_config(site: Site, local: Path) -> Path:
    conf = site.state_dir / "mbsyncrc"
    conf.write_text(
        f"""IMAPAccount test
Host localhost
Port {site.tls_port}
User {USER}
Pass "{PASSWORD}"
SSLType IMAPS
CertificateFile {site.ca_file}

IMAPStore remote
Account test

MaildirStore local
Path {local}/
Inbox {local}/INBOX
SubFolders Verbatim

Channel sync
Far :remote:
Near :local:
Patterns INBOX Archive
Create Both
SyncState *
"""
    )
    return conf


def _mbsync(mbsync: str, conf: Path) -> subprocess.CompletedProcess[str]:
    log = conf.with_suffix(".log")
    with open(log, "w") as out:
        try:
            proc = subprocess.run(
                [mbsync, "-V", "-c", str(conf), "-a"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=60,
            )
        except subprocess.TimeoutExpired:
            raise AssertionError("mbsync timed out:\n" + log.read_text()[-3000:]) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text(), "")


def test_mbsync_pull_and_push_with_flags(site: Site, require_program: Any) -> None:
    mbsync = require_program("mbsync")
    site.deliver(message(1), message(2))
    local = site.state_dir / "local"
    local.mkdir()
    conf = _mbsync_config(site, local)
    run = _mbsync(mbsync, conf)
    assert run.returncode == 0, run.stdout + run.stderr
    pulled = sorted(os.listdir(local / "INBOX" / "cur") + os.listdir(local / "INBOX" / "new"))
    assert len(pulled) == 2
    # mark one read and flagged locally, add a new local message, push
    cur = local / "INBOX" / "cur"
    new = local / "INBOX" / "new"
    name = sorted(os.listdir(new))[0] if os.listdir(new) else sorted(os.listdir(cur))[0]
    src = (new if (new / name).exists() else cur) / name
    base = name.split(":2,")[0]
    os.rename(src, cur / f"{base}:2,FS")
    (new / "12345.local.host").write_bytes(message(3).replace(b"\r\n", b"\n"))
    run = _mbsync(mbsync, conf)
    assert run.returncode == 0, run.stdout + run.stderr
    flags = site.flags()
    assert len(flags) == 3
    assert {"\\Seen", "\\Flagged"} in flags


def test_mutt_reads_and_saves_over_imap(site: Site, require_program: Any) -> None:
    mutt = require_program("mutt")
    site.deliver(message(1, "for mutt"))
    home = site.state_dir / "home"
    home.mkdir()
    muttrc = home / ".muttrc"
    muttrc.write_text(
        f"""set folder="imaps://{USER.replace("@", "%40")}@localhost:{site.tls_port}/"
set imap_pass="{PASSWORD}"
set spoolfile="+INBOX"
set ssl_ca_certificates_file="{site.ca_file}"
set certificate_file="{home}/certs"
set delete=yes
set header_cache=""
set record=""
set move=no
set confirmappend=no
set confirmcreate=no
push "<save-message>=Archive<enter><sync-mailbox><quit>"
"""
    )
    env = dict(os.environ, HOME=str(home), TERM="vt100", COLUMNS="80", LINES="24")
    # mutt needs a terminal to read a mailbox: script(1) gives it a pseudo-terminal
    script = require_program("script")
    command = f"{mutt} -n -F {muttrc} -f =INBOX"
    run = subprocess.run(
        [script, "-qec", command, "/dev/null"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    archived = site.flags("Archive")
    assert len(archived) == 1, (run.returncode, run.stdout[-2000:], run.stderr[-2000:])
    assert len(site.flags("INBOX")) == 0
