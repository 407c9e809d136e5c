"""How a bridge connects to NATS (SPEC §7): its credentials and TLS options, checked before
any connection; the keyword arguments they make for ``nats.connect``; URLs with their
secrets hidden; one clear sentence for each way a connection fails; and the command line's
wait for a NATS that is not there yet (or refuses it), with backoff.

Secrets are never printed: a URL's user, password or token and its query are shown as
``***``, the text of an error is scrubbed of them, and a creds file is read only to check
its markers (its content is never quoted). nats-py is imported only inside the functions
that connect: ``import shmfeed`` never needs it.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import importlib.util
import logging
import os
import re
import ssl
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import unquote

if TYPE_CHECKING:
    from ._bridge import Bridge

__all__ = ["ClientCertificateRefused", "ConnectOptions", "FailureKind", "OutageReporter", "add_connection_arguments",
           "classify", "connect_options_of", "describe_failure", "nats_kwargs", "redacted", "start_with_retry"]

CREDS_JWT_MARKER = "-----BEGIN NATS USER JWT-----"
CREDS_SEED_MARKER = "-----BEGIN USER NKEY SEED-----"
CREDS_MAX_BYTES = 1 << 20  # a creds file is a few KiB: more is not one
FIRST_RETRY_SECONDS = 0.5  # the command line's wait after a failed connection, doubled each time...
LAST_RETRY_SECONDS = 5.0  # ...up to this
PROBE_SECONDS = 5.0  # how long one attempt of the command line's may take (TCP, TLS, CONNECT)
CLOSE_SECONDS = 0.5  # how long the command line's attempt waits for its connection to close

# What each option is called, for messages read by command line and Python users alike.
_LABELS = {"creds": "creds file (--creds)", "tls_ca": "CA file (--tls-ca)", "tls_cert": "certificate (--tls-cert)",
           "tls_key": "key (--tls-key)"}


@dataclass(frozen=True)
class ConnectOptions:
    """A bridge's credentials and TLS: paths of files, None where not given.

    Attributes:
        creds: a NATS creds file (a user's JWT and nkey seed, as ``nsc`` writes it).
        tls_ca: PEM file of the CA(s) that signed the server's certificate (else the
            system's CAs); with a ``nats://`` URL it also turns TLS on.
        tls_cert: PEM file of this client's certificate, for servers that verify clients.
        tls_key: PEM file of its (unencrypted) private key; goes with ``tls_cert``.
    """

    creds: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert or self.tls_key)

    def validate(self) -> "ConnectOptions":
        """Check the files now, before any connection: each exists and is readable, a
        certificate comes with its key, the creds file is one, the PEM files load.

        Returns:
            itself, for chaining.

        Raises:
            ValueError: what is wrong and what to do (never a file's content).
        """
        for attribute, label in _LABELS.items():
            path = getattr(self, attribute)
            if path is not None:
                _check_readable(path, label)
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = ("--tls-cert", "--tls-key") if self.tls_cert else ("--tls-key", "--tls-cert")
            raise ValueError(f"shmfeed: {given} was given without {missing}; a client certificate needs its key "
                             f"and the key its certificate: give both or neither")
        if self.creds is not None:
            _check_creds(self.creds)
            if importlib.util.find_spec("nkeys") is None:  # nats-py signs with it, at every connection
                raise ValueError("shmfeed: a creds file needs the nkeys package, which is not installed; install "
                                 "it with pip install 'shmfeed[nats]' (or pip install nkeys)")
        if self.uses_tls:
            self.ssl_context()  # a PEM file that does not load is said now, not at every retry
        return self

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that verifies the server (certificate and host name): against
        ``tls_ca`` if given, else the system's CAs; with this client's certificate if given.

        Raises:
            ValueError: a PEM file that does not load (its reason from OpenSSL, never its content).
        """
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca)
        except (ssl.SSLError, OSError) as error:
            raise ValueError(f"shmfeed: the CA file (--tls-ca) {self.tls_ca} holds no usable certificate "
                             f"({_ssl_reason(error)}); give the PEM file of the CA that signed the server's "
                             f"certificate") from None
        if self.tls_cert and self.tls_key:
            try:
                # An encrypted key would make OpenSSL ask on the terminal: answer nothing, so it fails.
                context.load_cert_chain(self.tls_cert, self.tls_key, password=lambda: b"")
            except (ssl.SSLError, OSError) as error:
                raise ValueError(f"shmfeed: the certificate (--tls-cert) {self.tls_cert} and key (--tls-key) "
                                 f"{self.tls_key} do not load together ({_ssl_reason(error)}); give the PEM "
                                 f"certificate and its own unencrypted private key") from None
        return context


def _check_readable(path: str, label: str) -> None:
    if not os.path.exists(path):
        raise ValueError(f"shmfeed: the {label} {path} does not exist; give the path of an existing file")
    if not os.path.isfile(path):
        raise ValueError(f"shmfeed: the {label} {path} is not a file; give the path of a file")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise ValueError(f"shmfeed: the {label} {path} cannot be read ({error.strerror}); make it readable "
                         f"by this user") from None


def _check_creds(path: str) -> None:
    """A creds file holds a user JWT and a seed, each between its markers. Only the markers
    are looked at and nothing of the file is quoted: it holds a secret."""
    with open(path, "rb") as file:
        text = file.read(CREDS_MAX_BYTES + 1).decode("utf-8", errors="replace")
    if len(text) > CREDS_MAX_BYTES or CREDS_JWT_MARKER not in text or CREDS_SEED_MARKER not in text:
        missing = "user JWT" if CREDS_JWT_MARKER not in text else "nkey seed"
        raise ValueError(f"shmfeed: the creds file (--creds) {path} is not a NATS creds file (it has no "
                         f"{missing} block); give the .creds file made for this user (nsc generate creds)")


def _ssl_reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None) or getattr(error, "strerror", None)
    return str(reason or type(error).__name__).lower().replace("_", " ")


# --- URLs and secrets ----------------------------------------------------------------------

_USERINFO = re.compile(r"(^|//|,)([^/@?#,\s]*)@")
_QUERY = re.compile(r"\?[^#,\s]*")


def redacted(url: str) -> str:
    """``url`` with any user, password or token (``user:password@``, ``token@``) and any
    query (``?...``) shown as ``***``: secrets are never printed. Each URL of a
    comma-separated list, and one without a scheme, is handled alike."""
    return _QUERY.sub("?***", _USERINFO.sub(lambda match: f"{match.group(1)}***@", url))


def _secrets_of(url: str) -> list[str]:
    """The secret parts of ``url``: what ``redacted`` hides, whole and split, as written
    and unquoted (an error text may hold any of them)."""
    found: list[str] = []
    pieces = [match.group(2) for match in _USERINFO.finditer(url)] + [match.group(0)[1:] for match in _QUERY.finditer(url)]
    for piece in pieces:
        for part in (piece, *piece.split(":", 1), *re.split(r"[&=]", piece)):
            for form in (part, unquote(part)):
                if len(form) >= 3 and form not in found:
                    found.append(form)
    return sorted(found, key=len, reverse=True)


def _scrub(text: str, url: str) -> str:
    for secret in _secrets_of(url):
        text = text.replace(secret, "***")
    return text


# --- failures ------------------------------------------------------------------------------


class ClientCertificateRefused(ConnectionError):
    """The server verifies clients' certificates (its INFO says ``tls_verify``) and closed
    the connection during TLS setup: it took ours for none, or one its CA did not sign."""


class FailureKind(enum.Enum):
    """Why a connection to NATS failed, in the few kinds a user acts on differently."""

    CREDENTIALS = "credentials"  # the server refused who we said we are
    UNREACHABLE = "unreachable"  # nothing answered: refused, no route, unknown host
    TIMEOUT = "timeout"  # something took too long (TCP, TLS or the server's answer)
    TLS = "tls"  # the TLS handshake failed, or TLS is wanted on one side only
    OTHER = "other"


_CREDENTIAL_WORDS = ("authorization violation", "authentication", "user credentials", "nkey", "signature")


def classify(error: BaseException) -> FailureKind:
    """The kind of a nats-py connection failure (what its ``error_cb`` gets, or ``connect``
    raises)."""
    refused: tuple[type[BaseException], ...] = ()
    lost: tuple[type[BaseException], ...] = ()
    try:
        import nats.errors

        refused = (nats.errors.AuthorizationError,)
        lost = (nats.errors.UnexpectedEOF, nats.errors.StaleConnectionError, nats.errors.ConnectionClosedError,
                nats.errors.NoServersError)
    except ImportError:  # pragma: no cover (the bridge needs nats-py before it can fail)
        pass
    text = str(error).lower()
    if isinstance(error, (ssl.SSLError, ClientCertificateRefused)):  # first: an alert's text may say "signature"
        return FailureKind.TLS
    if isinstance(error, refused) or any(word in text for word in _CREDENTIAL_WORDS):
        return FailureKind.CREDENTIALS
    if isinstance(error, lost):  # the server went away (the bridge's "disconnected" line says it)
        return FailureKind.UNREACHABLE
    if "tls" in text or "ssl" in text:
        return FailureKind.TLS
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)) or "timeout" in text or "timed out" in text:
        return FailureKind.TIMEOUT
    if isinstance(error, OSError):  # refused, reset, no route, unknown host (socket.gaierror)
        return FailureKind.UNREACHABLE
    return FailureKind.OTHER


def describe_failure(error: BaseException, url: str, options: ConnectOptions | None = None) -> str:
    """One clear sentence, ``<what went wrong>; <what to do>``, for a failed connection to
    NATS at ``url``: never a secret (not even one the error's own text would show)."""
    options = options or ConnectOptions()
    if type(error).__module__.startswith("nats.js"):  # connected, but JetStream (a durable bridge's) did not answer
        return (f"JetStream did not answer ({type(error).__name__}); check that JetStream is on in nats-server (-js, "
                f"or a jetstream block) and this account may use it")
    kind = classify(error)
    detail = _scrub(str(error).strip() or type(error).__name__, url).removeprefix("nats: ").strip("'")
    if kind is FailureKind.CREDENTIALS:
        return (f"NATS refused the credentials ({detail.lower()}); check the user/password (or token) in the URL "
                f"or --creds")
    if kind is FailureKind.TLS:
        alert = _ssl_reason(error) if isinstance(error, ssl.SSLError) else ""
        if isinstance(error, ClientCertificateRefused) or ("alert" in alert and "certificate" in alert):
            detail = alert or detail
            if options.tls_cert:
                return (f"TLS: the server refused the client certificate {options.tls_cert} ({detail.lower()}); "
                        f"give a client certificate (for clientAuth) signed by a CA the server trusts (its ca_file)")
            return (f"TLS: the server wants a client certificate and closed the connection ({detail.lower()}); "
                    f"give one with --tls-cert and --tls-key")
        if isinstance(error, ssl.SSLCertVerificationError):
            if "hostname" in detail.lower() or "ip address mismatch" in detail.lower():
                return (f"TLS: the server's certificate is not for this host ({_ssl_reason(error)}); use in the "
                        f"URL a host name or address that its certificate names")
            where = f"the CA in {options.tls_ca}" if options.tls_ca else "the system's CAs"
            return (f"TLS: the server's certificate is not trusted by {where} ({_ssl_reason(error)}); give the "
                    f"CA that signed it with --tls-ca")
        return (f"TLS failed ({alert or detail}); check that the server has TLS on and the --tls-ca/--tls-cert/"
                f"--tls-key files")
    if kind is FailureKind.TIMEOUT:
        return "no answer in time (timeout); check the host and port, and any firewall between"
    if kind is FailureKind.UNREACHABLE:
        if isinstance(error, ConnectionError) and options.uses_tls:
            return (f"the server closed the connection during TLS setup ({_errno_text(error, detail)}); if it "
                    f"verifies clients, give a certificate its CA signed with --tls-cert and --tls-key")
        return f"nothing answers there ({_errno_text(error, detail)}); check that nats-server runs there and the URL"
    return f"{type(error).__name__}: {detail}; check the URL and the connection options"


def _errno_text(error: BaseException, fallback: str) -> str:
    """An OSError's reason without its number ("connection refused"), else ``fallback``."""
    number, text = getattr(error, "errno", None), getattr(error, "strerror", None)
    if isinstance(number, int) and number > 0:
        return os.strerror(number).lower()
    return str(text or fallback).lower()  # socket.gaierror: a negative number and its own text


class OutageReporter:
    """What a running bridge's nats-py ``error_cb`` gets, said on stderr at most once per
    kind of failure per outage (nats-py calls it at every reconnection attempt: bad
    credentials or a lost server would otherwise print a line every half second).
    ``failed`` records every error (the most telling of an outage explains a failed
    ``start()``); ``recovered`` starts a new outage. An unreachable server or a timeout
    is not said again: the bridge's "disconnected" line says it already."""

    def __init__(self, url: str, options: ConnectOptions) -> None:
        self.url = url
        self.options = options
        self.count = 0  # failures reported, said or not
        self._seen: dict[FailureKind, BaseException] = {}  # the last of each kind, this outage
        self._said: set[FailureKind] = set()

    def failed(self, error: BaseException, announce: bool) -> None:
        self.count += 1
        kind = classify(error)
        self._seen[kind] = error
        if not announce or kind in self._said or kind in (FailureKind.UNREACHABLE, FailureKind.TIMEOUT):
            return
        self._said.add(kind)
        print(f"shmfeed bridge: NATS at {redacted(self.url)}: {describe_failure(error, self.url, self.options)}",
              file=sys.stderr, flush=True)

    def recovered(self) -> None:
        self._said.clear()
        self._seen.clear()

    def describe(self, error: BaseException) -> str:
        """Why a connection failed: the most telling error nats-py reported this outage (a
        refusal of the credentials or of TLS over a reset that followed it; the error
        ``connect`` raises, or a timeout, may only say it gave up), else ``error``."""
        return describe_failure(_most_telling([*self._seen.values(), error]), self.url, self.options)


_TELLING_ORDER = (FailureKind.CREDENTIALS, FailureKind.TLS, FailureKind.OTHER, FailureKind.UNREACHABLE,
                  FailureKind.TIMEOUT)


def _most_telling(errors: list[BaseException]) -> BaseException:
    """Of the errors of one outage, the one that says most: a refusal of the credentials
    or of TLS over a reset or a timeout that may follow it; the first of its kind."""
    return min(errors, key=lambda error: _TELLING_ORDER.index(classify(error)))


# --- nats.connect ----------------------------------------------------------------------


class _QuietSslEofNotice(logging.Filter):
    """asyncio logs a warning when a TLS connection nats-py made is closed ("returning true
    from eof_received() has no effect when using ssl"): nats-py's protocol, nothing a user
    can act on, printed at every clean stop. Only that message is held back."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


_quiet_filter = _QuietSslEofNotice()


def nats_kwargs(url: str, options: ConnectOptions) -> dict[str, Any]:
    """The keyword arguments of ``nats.connect`` for these options: ``user_credentials``
    for a creds file, ``tls`` (a verifying ``ssl.SSLContext``) when a TLS file is given.
    A ``tls://`` URL turns TLS on by itself (with the system's CAs unless ``tls_ca``);
    nats-py checks the certificate against the URL's host (its IP address SAN for an
    address), so no ``tls_hostname`` is needed. User and password stay in the URL, where
    nats-py reads them."""
    kwargs: dict[str, Any] = {}
    if options.creds:
        kwargs["user_credentials"] = options.creds
    if options.uses_tls:
        kwargs["tls"] = options.ssl_context()
    asyncio_logger = logging.getLogger("asyncio")
    if _quiet_filter not in asyncio_logger.filters:
        asyncio_logger.addFilter(_quiet_filter)
    return kwargs


async def _try_connect(url: str, options: ConnectOptions, timeout: float) -> BaseException | None:
    """Connect once (no reconnects) and close: None if NATS took us, else why not."""
    import nats.aio.client

    client = nats.aio.client.Client()
    reported: list[BaseException] = []

    async def remember(error: Exception) -> None:  # instead of nats-py's, which logs a traceback
        reported.append(error)

    # Two tries at most (nats-py's count), no reconnects: one attempt of ours.
    settings: dict[str, Any] = {"error_cb": remember, "allow_reconnect": False, "max_reconnect_attempts": 1,
                                "reconnect_time_wait": 0.1, "connect_timeout": timeout, **nats_kwargs(url, options)}
    try:
        await asyncio.wait_for(client.connect(url, **settings), timeout * 3)
    except Exception as error:  # nats-py raises its own errors, OSErrors and timeouts
        failure = _most_telling([*reported, error])
        server_info = getattr(client, "_server_info", None) or {}
        if isinstance(failure, ConnectionError) and server_info.get("tls_verify"):
            # Closed during TLS setup by a server that verifies clients: the certificate is why.
            failure = ClientCertificateRefused(_errno_text(failure, str(failure)))
        return failure
    finally:
        try:
            # nats-py's close can hang after a failed TLS handshake (waiting for the transport
            # to close): a probe does not wait for it, else each retry would take that long.
            await asyncio.wait_for(client.close(), CLOSE_SECONDS)
        except Exception:
            pass
    return None


def start_with_retry(make_bridge: Callable[[], "Bridge"], url: str, options: ConnectOptions,
                     stop: threading.Event) -> "Bridge | None":
    """The command line's start: connect, or say why not in one line and try again, waiting
    ``FIRST_RETRY_SECONDS`` doubled each time up to ``LAST_RETRY_SECONDS``, until it
    connects (the started bridge is returned) or ``stop`` is set (None). A kind of failure
    is said once while it lasts, not at every attempt.

    Each attempt first connects on its own and closes (fails fast, with nats-py's reason,
    where ``Bridge.start`` would retry until its timeout); once that works, the bridge is
    started. Its own failures (a server lost between the two, JetStream refusing a durable
    bridge) are raised as ``ShmfeedError``, not retried: a durable bridge's start holds a
    lock that only ``close()`` lets go.

    Raises:
        ImportError: nats-py is not installed.
        ShmfeedError: the bridge's own start failed (see above).
        ValueError: the bridge's arguments are wrong (from ``make_bridge``)."""
    try:
        import nats  # noqa: F401
    except ImportError as error:
        raise ImportError("shmfeed: the bridge needs nats-py; install it with pip install 'shmfeed[nats]'") from error
    delay = FIRST_RETRY_SECONDS
    said: set[FailureKind] = set()
    while not stop.is_set():
        failure = asyncio.run(_try_connect(url, options, PROBE_SECONDS))
        if failure is None:
            return make_bridge().start()
        kind = classify(failure)
        if kind not in said:
            said.add(kind)
            why = f"cannot connect to {redacted(url)}: {describe_failure(failure, url, options)}"
            print(f"shmfeed bridge: {why}; retrying every {FIRST_RETRY_SECONDS:g} s (slowing to {LAST_RETRY_SECONDS:g} s) "
                  f"until it connects or is stopped", file=sys.stderr, flush=True)
        if stop.wait(delay):
            break
        delay = min(delay * 2, LAST_RETRY_SECONDS)
    print(f"shmfeed bridge: stopped before it could connect to {redacted(url)}; nothing was bridged",
          file=sys.stderr, flush=True)
    return None


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """``--creds``, ``--tls-ca``, ``--tls-cert`` and ``--tls-key`` on ``shmfeed bridge``."""
    parser.add_argument("--creds", metavar="FILE", help="NATS creds file (user JWT and nkey seed) to connect with")
    parser.add_argument("--tls-ca", metavar="FILE", help="PEM file of the CA that signed the server's certificate "
                                                         "(turns TLS on; default: the system's CAs for tls:// URLs)")
    parser.add_argument("--tls-cert", metavar="FILE", help="PEM client certificate, for servers that verify "
                                                           "clients (with --tls-key)")
    parser.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert (unencrypted)")


def connect_options_of(args: argparse.Namespace) -> ConnectOptions:
    """The options ``add_connection_arguments`` parsed."""
    return ConnectOptions(args.creds, args.tls_ca, args.tls_cert, args.tls_key)
