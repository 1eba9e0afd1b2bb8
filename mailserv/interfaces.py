"""Every zope Interface of mailserv, and nothing else.

See docs/architecture.rst for how they fit together.  Implementations live in
the packages named in each docstring.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

# --------------------------------------------------------------------------
# Service plumbing


class IListenerFactoryBuilder(Interface):
    """Builds the protocol factory of one listener kind (smtp, submission, imap, pop3).

    Looked up by protocol name in ``mailserv.service.PROTOCOLS``.
    """

    def __call__(service: object, listener: object) -> object:
        """Return an IProtocolFactory for ``listener`` (a config.ListenerSection).

        ``service`` is the running ``mailserv.service.MailService``: it gives
        access to the portal, the router, the stores, the thread pools, TLS.
        """


class IReloadable(Interface):
    """A component that picks up a new configuration on SIGHUP."""

    def reload(config: object) -> None:
        """Switch to ``config`` (already validated).  Must not drop connections."""


class IDrainable(Interface):
    """A component that can finish work in flight before shutdown (SIGTERM)."""

    def drain() -> object:
        """Stop taking new work; return a Deferred that fires when work in flight is done."""


# --------------------------------------------------------------------------
# Directory and authentication


class IUserDirectory(Interface):
    """Answers "does this address exist, who is it, where is its mailbox".

    Implemented by every auth backend (mailserv/directory/, mailserv/auth/).
    """

    def lookup(address: str) -> object:
        """Return Deferred[mailserv.directory.User | None] for an address or login name.

        ``None`` means the address does not exist.  A backend that cannot
        answer (down, timeout) fails the Deferred with
        ``mailserv.errors.TemporaryFailure``.
        """


class IPasswordVerifier(Interface):
    """A backend that can check a cleartext password for a user."""

    def verify_password(username: str, password: bytes) -> object:
        """Deferred[str | None]: the canonical user name if the password is right."""


class IPlaintextSecrets(Interface):
    """A backend that can reveal a plaintext-equivalent secret (CRAM-MD5, APOP, SCRAM)."""

    def get_secret(username: str, scheme: str) -> object:
        """Deferred[bytes | None] of the secret for ``scheme`` (e.g. 'PLAIN', 'CRAM-MD5')."""


class IPopBeforeSmtp(Interface):
    """Records addresses that logged in recently (POP-before-SMTP)."""

    def record(address: str) -> object:
        """Deferred: note a successful login from ``address``."""

    def allowed(address: str) -> object:
        """Deferred[bool]: did ``address`` log in within the configured time."""


class IMailUser(Interface):
    """The avatar every protocol gets from ``portal.login(creds, None, IMailUser)``.

    ``user`` is the canonical mailserv.directory.User (mailbox expanded); the
    IMAP and POP3 servers open its store with ``service.store_for(avatar.user)``,
    submission records ``avatar.user.name`` as the authenticated sender.
    """

    user = Attribute("mailserv.directory.User of the logged-in account")


class ICramMD5Credentials(Interface):
    """CRAM-MD5 (RFC 2195) response, checked against a plaintext-equivalent secret."""

    username = Attribute("str: the login name sent by the client")

    def check_secret(stored: str) -> bool:
        """Constant-time check against a stored ``{SCHEME}data`` (PLAIN/CLEAR or CRAM-MD5)."""


class IAPOPCredentials(Interface):
    """POP3 APOP digest (RFC 1939 §7), checked against the plaintext password."""

    username = Attribute("str: the login name sent by the client")

    def check_secret(stored: str) -> bool:
        """Constant-time check against a stored ``{PLAIN}``/``{CLEAR}`` password."""


class IScramCredentials(Interface):
    """The final SCRAM-SHA-* proof (RFC 5802 §3), checked against a stored key or plaintext."""

    username = Attribute("str: the login name sent by the client")
    mechanism = Attribute("str: 'SCRAM-SHA-1' or 'SCRAM-SHA-256'")

    def check_secret(stored: str) -> bool:
        """Constant-time check of the ClientProof against ``stored``."""


# --------------------------------------------------------------------------
# Delivery


class IDeliveryTarget(Interface):
    """Something a message can be handed to: the router, a filter chain, the queue."""

    def start_delivery(envelope: object) -> object:
        """Deferred[IDelivery] for a new transaction described by ``envelope``."""


class IDelivery(Interface):
    """One message on its way to a set of recipients (one SMTP transaction).

    The SMTP server calls ``add_recipient`` for every RCPT, ``body`` once the
    message is spooled to disk, then ``commit`` (or ``abort``).  ``commit``
    fires only when the message is durable for every accepted recipient.
    """

    def add_recipient(recipient: object) -> object:
        """Deferred[None]; fails with SMTPReply to refuse this recipient alone."""

    def body(message: object) -> object:
        """Deferred[None]: ``message`` (mailserv.envelope.Message) is complete on disk."""

    def commit() -> object:
        """Deferred[dict[recipient, SMTPReply | None]]: per-recipient outcome (None = ok)."""

    def abort() -> object:
        """Deferred[None]: forget the transaction; nothing may be delivered."""


# --------------------------------------------------------------------------
# Filters (mailserv/filters/)


class IFilterFactory(Interface):
    """A filter plugin (discovered with twisted.plugin) that builds filters from config."""

    name = Attribute("The name used in ``filter = ...`` of a pipeline entry.")

    def build(options: object, service: object) -> object:
        """Return a filter providing one or more of the stage interfaces below."""


class IConnectionFilter(Interface):
    def check_connect(session: object) -> object:
        """Deferred[Verdict] when a client connects."""


class IHeloFilter(Interface):
    def check_helo(session: object) -> object:
        """Deferred[Verdict] after HELO/EHLO."""


class ISenderFilter(Interface):
    def check_sender(session: object, envelope: object) -> object:
        """Deferred[Verdict] after MAIL FROM."""


class IRecipientFilter(Interface):
    def check_recipient(session: object, envelope: object, recipient: object) -> object:
        """Deferred[Verdict] for each RCPT TO."""


class IMessageFilter(Interface):
    def check_message(session: object, envelope: object, message: object) -> object:
        """Deferred[Verdict] once the message is spooled, before the final reply."""


# --------------------------------------------------------------------------
# Storage (mailserv/store/)


class IMailStore(Interface):
    """A mail store format (maildir, mbox).

    Methods are synchronous and may block on disk: callers on the reactor run
    them in the ``disk`` thread pool (mailserv.threads).  They are also safe to
    call from several processes at once.
    """

    def deliver(
        user: object, source: object, folder: str | None = None, prefix: bytes = b""
    ) -> object:
        """Store ``prefix`` + the message read from ``source`` for ``user``.

        ``source`` is a path or a binary file (read from its start); ``prefix``
        holds per-recipient header lines (Return-Path:, Delivered-To:).
        Returns an opaque id.  Returns only once the message is durable (file
        and directory fsynced).  Raises ``mailserv.errors.QuotaExceeded`` or
        ``OSError``.  See mailserv/store/__init__.py.
        """

    def open(user: object) -> object:
        """Return the IMailAccount of ``user``."""


class IMailAccount(Interface):
    """The folders of one user."""

    def list_folders() -> object:
        """List of folder names (IMAP names, '/'-free internal form)."""

    def open_folder(name: str, create: bool = False) -> object:
        """Return the IMailbox of folder ``name`` (INBOX is always there)."""

    def create_folder(name: str) -> None:
        """Create a folder; raises FolderExists / InvalidFolderName."""

    def delete_folder(name: str) -> None:
        """Delete a folder."""

    def rename_folder(old: str, new: str) -> None:
        """Rename a folder."""

    def quota() -> object:
        """(used_bytes, limit_bytes | None, used_messages, limit_messages | None)."""

    def special_use() -> object:
        """dict folder name → RFC 6154 role ("\\\\Sent" ...)."""

    def subscriptions() -> object:
        """List of subscribed folder names (RFC 3501 §6.3.6)."""

    def subscribe(name: str) -> None:
        """Add ``name`` to the subscriptions."""

    def unsubscribe(name: str) -> None:
        """Remove ``name`` from the subscriptions."""


class IMailbox(Interface):
    """One folder, read by IMAP and POP3."""

    uidvalidity = Attribute("int: UIDVALIDITY of this folder")

    def refresh() -> object:
        """Pick up changes made by others; return a list of UIDs that went away."""

    def messages() -> object:
        """The messages in UID order, as a list of MessageInfo (uid, size, flags, modseq, ...)."""

    def uidnext() -> int:
        """The next UID that will be assigned."""

    def highest_modseq() -> int:
        """Highest modification sequence of the folder."""

    def open_message(uid: int) -> object:
        """A binary file object for the message with ``uid`` (KeyError if gone)."""

    def set_flags(uid: int, flags: object) -> object:
        """Replace the flags of a message; returns its new MessageInfo."""

    def append(source: object, flags: object = (), internal_date: float | None = None) -> int:
        """Add a message; returns its UID."""

    def copy_to(uids: object, target: object) -> object:
        """Copy messages into the IMailbox ``target``; returns {old uid: new uid}."""

    def move_to(uids: object, target: object) -> object:
        """Copy then expunge (RFC 6851 MOVE); returns {old uid: new uid}."""

    def message(uid: int) -> object:
        """The MessageInfo of one message (KeyError if unknown)."""

    def expunge(uids: object) -> object:
        """Remove the messages; returns the UIDs actually removed."""

    def expunged_since(modseq: int) -> list[int]:
        """Sorted UIDs expunged with a modseq above ``modseq`` (RFC 7162 VANISHED (EARLIER)).

        As of the last ``refresh()``.  May include UIDs that were never seen
        (when ``modseq`` is older than the bounded history the store keeps).
        """

    def close() -> None:
        """Release what the mailbox holds open."""
