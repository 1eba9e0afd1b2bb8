"""Exceptions shared by every layer, and how they map to protocol replies."""

from __future__ import annotations

from dataclasses import dataclass


class MailservError(Exception):
    """Base class of mailserv's own errors."""


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a configuration: where it is and what is wrong."""

    file: str
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        return f"{where}{self.key}: {self.message}" if self.key else f"{where}{self.message}"


class ConfigError(MailservError):
    """A configuration that cannot be used.  Carries every problem found, not just the first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class SMTPReply(MailservError):
    """An SMTP reply: code, enhanced status code (RFC 3463) and text.

    Raised anywhere below the SMTP server to refuse something with a precise reply.
    """

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SMTPReply) and (self.code, self.enhanced, self.text) == (
            other.code,
            other.enhanced,
            other.text,
        )

    def __hash__(self) -> int:
        return hash((self.code, self.enhanced, self.text))

    def __repr__(self) -> str:
        return f"SMTPReply({self.code}, {self.enhanced!r}, {self.text!r})"


class TemporaryFailure(MailservError):
    """A backend could not answer now (down, timeout); the client should retry later.

    SMTP ``454 4.7.0`` / ``451 4.3.0``, IMAP ``NO [UNAVAILABLE]``, POP3 ``-ERR [SYS/TEMP]``.
    """


class QuotaExceeded(MailservError):
    """A delivery would take the mailbox over its quota."""

    def __init__(self, message: str = "mailbox is over quota", permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class InvalidFolderName(MailservError):
    """A mailbox name that could leave the user's store or is malformed."""


class FolderExists(MailservError):
    """The folder to create is already there."""


class NoSuchFolder(MailservError):
    """The folder does not exist."""


def smtp_reply_for(failure: BaseException) -> SMTPReply:
    """Map an exception raised below the SMTP server to the reply the client gets.

    Anything unknown is a temporary local error: a bug or an I/O failure must
    never turn into a permanent rejection (defect 5 of ARCHITECTURE.md).
    """
    if isinstance(failure, SMTPReply):
        return failure
    if isinstance(failure, QuotaExceeded):
        if failure.permanent:
            return SMTPReply(552, "5.2.2", "Mailbox full")
        return SMTPReply(452, "4.2.2", "Mailbox full, try again later")
    if isinstance(failure, TemporaryFailure):
        return SMTPReply(451, "4.3.0", "Temporary lookup failure, try again later")
    return SMTPReply(451, "4.3.0", "Local error in processing, try again later")
