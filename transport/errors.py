"""One error hierarchy for the data plane.

Every error carries a ``kind`` (``ErrorKind``: what went wrong, such as "not found" or
"conflict"), never a protocol status: the data plane does not know which protocol
carries its answers. The daemon maps a kind to an HTTP status once, at its boundary
(``fallback.daemonctx.HTTP_STATUS``); the CLI maps it to an exit code. Foreign
exceptions (aiohttp's, the OS's) become these classes once, where they enter, through
``map_exceptions`` (httpcore's ``_exceptions.map_exceptions`` shape) rather than
through hand-written ``except`` translators.
"""

from __future__ import annotations

import contextlib
import enum
import errno
from collections.abc import Callable, Iterator, Mapping


class ErrorKind(enum.Enum):
    """What went wrong, independent of the protocol that reports it."""

    BAD_REQUEST = "bad request"
    """The request or data is malformed or names something that cannot be (a bad frame,
    a bad manifest, a path that is not a regular file)."""
    UNAUTHORIZED = "unauthorized"
    """No credentials, or wrong ones (a password, a session token)."""
    FORBIDDEN = "forbidden"
    """Understood and authenticated, but not allowed (a reserved name, a path outside the
    root, a wrong passphrase)."""
    NOT_FOUND = "not found"
    """The thing named does not exist (a file, a session)."""
    CONFLICT = "conflict"
    """The state does not allow it now (a lock held, a source changed, calls out of order)."""
    TOO_LARGE = "too large"
    """The request is larger than the bound the receiver keeps."""
    INTEGRITY = "integrity"
    """Data failed verification (a block or file digest, an AEAD tag)."""
    EXHAUSTED = "exhausted"
    """The local system ran out of a resource (descriptors, memory); retry later."""
    UNAVAILABLE = "unavailable"
    """The peer or this end cannot serve now (shutting down, unreachable, connection lost)."""
    UNTRUSTED = "untrusted"
    """The peer's TLS certificate is not trusted (no CA vouches for it, it changed)."""
    REMOTE = "remote"
    """The peer answered with an error (``RemoteError``, which keeps what it received)."""
    INTERNAL = "internal"
    """Anything else: an I/O error, a bug; not the request's fault."""


class TransportError(Exception):
    """Base of every error raised by ``transport``: a message and a ``kind``.

    Each class has a default kind; a raise site may name another (``kind=``) when the
    class fits but the kind differs (a ``ProtocolError`` for an unknown session is
    ``NOT_FOUND``)."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, message: str, *, kind: ErrorKind | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class ProtocolError(TransportError):
    """The peer sent something malformed (bad frame, bad manifest)."""

    kind = ErrorKind.BAD_REQUEST


class IntegrityError(TransportError):
    """Data failed verification: a block digest, a whole-file digest or an AEAD tag."""

    kind = ErrorKind.INTEGRITY


class BadPassphrase(IntegrityError):
    """The envelope header's key check failed: wrong passphrase, detected before any block."""

    kind = ErrorKind.FORBIDDEN


class ConflictError(TransportError):
    """Another transfer holds the target (its journal lock), or the target changed."""

    kind = ErrorKind.CONFLICT


class PathError(TransportError):
    """A path escapes its root, or names something that cannot be written."""

    kind = ErrorKind.FORBIDDEN


class SourceChanged(TransportError):
    """The source file changed while or between runs; resuming would mix contents."""

    kind = ErrorKind.CONFLICT


class ResourceExhausted(TransportError):
    """The local system ran out of a resource (descriptors, memory): nothing is wrong with
    the request, it may succeed later. ``resource`` is the errno name (``EMFILE``, ...)."""

    kind = ErrorKind.EXHAUSTED

    def __init__(self, message: str, *, resource: str) -> None:
        super().__init__(message)
        self.resource = resource


RESOURCE_ERRNOS: dict[int, str] = {
    errno.EMFILE: "out of file descriptors",
    errno.ENFILE: "out of file descriptors (system-wide limit)",
    errno.ENOMEM: "out of memory",
    errno.ENOBUFS: "out of buffer space",
}
"""OS errors that say "the system is out of something", not "this name is bad"."""


def from_os_error(exc: OSError, what: str) -> TransportError:
    """The error for an ``OSError`` met while reading ``what`` (a path as shown to users).

    Resource errors (``RESOURCE_ERRNOS``) become ``ResourceExhausted`` ("try again"),
    permission errors ``PathError`` (``FORBIDDEN``), anything else (EIO, ESTALE, ...) a
    ``TransportError`` of kind ``INTERNAL``.
    """
    if exc.errno in RESOURCE_ERRNOS:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return ResourceExhausted(f"{RESOURCE_ERRNOS[exc.errno]}, try again", resource=name)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PathError(f"{what}: permission denied")
    return TransportError(f"{what}: {exc.strerror or exc}")


class ConnectionLost(TransportError):
    """The peer or the network went away mid-stream (mapped from aiohttp/OSError)."""

    kind = ErrorKind.UNAVAILABLE


class ConnectError(ConnectionLost):
    """No connection could be made to the peer at all (refused, unreachable, timed out
    while connecting): nothing was sent. A path manager retries it with a backoff."""


class RemoteError(TransportError):
    """The peer answered with an error. ``peer_status`` is the status it answered with
    (an HTTP status over HTTP; None where the path has none): data received, not a hint
    for this end's own answers. ``retry_after`` (seconds) is the peer's ``Retry-After``
    when it gave one (RFC 9110 section 10.2.3)."""

    kind = ErrorKind.REMOTE

    def __init__(self, message: str, *, peer_status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.peer_status = peer_status
        self.retry_after = retry_after


ExceptionMapping = Mapping[type[BaseException] | tuple[type[BaseException], ...],
                           type[TransportError] | None]
"""Foreign exception types to the ``TransportError`` class each becomes, first match
wins (so a subclass is listed before its base); ``None`` lets a type through unmapped
for an enclosing handler (a certificate error that needs an async look-up)."""


@contextlib.contextmanager
def map_exceptions(mapping: ExceptionMapping, what: str,
                   describe: Callable[[BaseException], str] = str) -> Iterator[None]:
    """Map foreign exceptions raised in the block into this hierarchy, once, at the
    boundary (httpcore's ``_exceptions.map_exceptions``): the first entry of
    ``mapping`` that the exception is an instance of gives the class, raised with the
    message ``"{what}: {describe(exc)}"`` and the original as its cause. A
    ``TransportError`` passes unchanged, and so does an exception no entry matches."""
    try:
        yield
    except TransportError:
        raise
    except Exception as exc:
        for foreign, ours in mapping.items():
            if isinstance(exc, foreign):
                if ours is None:
                    raise
                raise ours(f"{what}: {describe(exc)}") from exc
        raise
