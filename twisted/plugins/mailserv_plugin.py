"""twistd plugin: ``twistd mailserv``.  Declares the ServiceMaker only; imports nothing heavy."""

from twisted.application.service import ServiceMaker

mailserv = ServiceMaker(
    "mailserv",
    "mailserv.tap",
    "A complete mail server: SMTP MX, submission, IMAP4 and POP3",
    "mailserv",
)
