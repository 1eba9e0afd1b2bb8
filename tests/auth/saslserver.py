"""Just enough SMTP (RFC 4954) and IMAP (RFC 3501 §6.2.2) to run stdlib clients against us.

Not a mail server: EHLO/AUTH/QUIT and CAPABILITY/AUTHENTICATE/LOGIN/LOGOUT,
driving the real SASL mechanisms, throttle and portal over a real socket.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import LoginFailed
from twisted.internet import defer, protocol
from twisted.protocols.basic import LineOnlyReceiver

from mailserv.auth import sasl
from mailserv.errors import TemporaryFailure
from mailserv.interfaces import IMailUser


class SASLLineServer(LineOnlyReceiver):
    delimiter = b"\r\n"
    imap = False

    def connectionMade(self) -> None:
        self.mech: Any = None
        self.tag = b""
        self.send(b"* OK ready" if self.imap else b"220 ready")

    def send(self, line: bytes) -> None:
        self.transport.write(line + b"\r\n")

    def reply(self, ok: bool, temporary: bool = False) -> None:
        if self.imap:
            text = b"OK done" if ok else (b"NO [UNAVAILABLE] later" if temporary else b"NO failed")
            self.send(self.tag + b" " + text)
        else:
            self.send(
                b"235 2.7.0 ok" if ok else (b"454 4.7.0 later" if temporary else b"535 5.7.8 no")
            )

    def lineReceived(self, line: bytes) -> None:
        if self.mech is not None:
            self.advance(lambda: self.mech.step(sasl.decode_response(line)))
            return
        words = line.split()
        if self.imap:
            self.tag, words = words[0], words[1:]
        verb = words[0].upper() if words else b""
        mechs = " ".join(sasl.mechanisms_for(self.factory.portal, secure=True)).encode()
        if verb == b"EHLO":
            self.send(b"250-hello")
            self.send(b"250 AUTH " + mechs)
        elif verb == b"CAPABILITY":
            caps = b" ".join(b"AUTH=" + m for m in mechs.split())
            self.send(b"* CAPABILITY IMAP4rev1 " + caps)
            self.reply(True)
        elif verb in (b"AUTH", b"AUTHENTICATE"):
            mech = sasl.new_mechanism(words[1].decode(), "mail.example.org", self.factory.portal)
            initial = sasl.decode_response(words[2]) if len(words) > 2 else None
            self.mech = mech
            self.advance(lambda: mech.start(initial))
        elif verb == b"LOGIN":  # IMAP LOGIN with atoms or quoted strings
            args = re.findall(rb'"((?:[^"\\]|\\.)*)"|(\S+)', line)[2:4]
            user, password = (quoted or atom for quoted, atom in args)
            self.login(UsernamePassword(user, password))
        elif verb in (b"QUIT", b"LOGOUT"):
            self.send(b"* BYE" if self.imap else b"221 bye")
            if self.imap:
                self.reply(True)
            self.transport.loseConnection()
        else:
            self.send(self.tag + b" BAD ?" if self.imap else b"500 ?")

    def advance(self, step: Any) -> None:
        try:
            d = step()
        except sasl.SASLError:
            d = defer.fail(sasl.SASLError())

        def next_step(result: Any) -> None:
            if isinstance(result, sasl.Challenge):
                self.send((b"+ " if self.imap else b"334 ") + sasl.encode_challenge(result.data))
            else:
                self.mech = None
                self.login(result)

        def bad(failure: Any) -> None:
            failure.trap(sasl.SASLError)
            self.mech = None
            self.send(self.tag + b" BAD sasl" if self.imap else b"501 5.5.2 sasl")

        d.addCallbacks(next_step, bad)

    def login(self, creds: Any) -> None:
        peer = self.transport.getPeer().host
        d = self.factory.throttle.login(self.factory.portal, creds, peer, IMailUser)

        def done(result: Any) -> None:
            self.factory.logins.append(result[1].user.name)
            self.reply(True)

        def failed(failure: Any) -> None:
            failure.trap(LoginFailed, TemporaryFailure)
            self.reply(False, temporary=failure.check(TemporaryFailure) is not None)

        d.addCallbacks(done, failed)


class IMAPServer(SASLLineServer):
    imap = True


class SASLFactory(protocol.Factory):
    def __init__(self, portal: Any, throttle: Any, imap: bool = False) -> None:
        self.portal, self.throttle, self.logins = portal, throttle, []
        self.protocol = IMAPServer if imap else SASLLineServer
