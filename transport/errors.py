"""One error hierarchy for the data plane.

Every error carries a ``status`` hint (the HTTP status a server should answer
with, in the manner of h11's ``error_status_hint``) so the boundary that
translates it into a response or an exit code does not need a lookup table.
"""

from __future__ import annotations

import errno


class TransportError(Exception):
    """Base of every error raised by ``transport``."""

    status: int = 500

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class ProtocolError(TransportError):
    """The peer sent something malformed (bad frame, bad manifest)."""

    status = 400


class IntegrityError(TransportError):
    """Data failed verification: a block digest, a whole-file digest or an AEAD tag."""

    status = 422


class BadPassphrase(IntegrityError):
    """The envelope header's key check failed: wrong passphrase, detected before any block."""

    status = 403


class ConflictError(TransportError):
    """Another transfer holds the target (its journal lock), or the target changed."""

    status = 409


class PathError(TransportError):
    """A path escapes its root, or names something that cannot be written."""

    status = 403


class SourceChanged(TransportError):
    """The source file changed while or between runs; resuming would mix contents."""

    status = 409


class ResourceExhausted(TransportError):
    """The local system ran out of a resource (descriptors, memory): nothing is wrong with
    the request, it may succeed later. ``kind`` is the errno name (``EMFILE``, ...)."""

    status = 503

    def __init__(self, message: str, *, kind: str, status: int | None = None) -> None:
        super().__init__(message, status=status)
        self.kind = kind


RESOURCE_ERRNOS: dict[int, str] = {
    errno.EMFILE: "out of file descriptors",
    errno.ENFILE: "out of file descriptors (system-wide limit)",
    errno.ENOMEM: "out of memory",
    errno.ENOBUFS: "out of buffer space",
}
"""OS errors that say "the system is out of something", not "this name is bad"."""


def from_os_error(exc: OSError, what: str) -> TransportError:
    """The kind for an ``OSError`` met while reading ``what`` (a path as shown to users).

    Resource errors (``RESOURCE_ERRNOS``) become ``ResourceExhausted`` (503, "try again"),
    permission errors ``PathError`` (403), anything else (EIO, ESTALE, ...) a 500.
    """
    if exc.errno in RESOURCE_ERRNOS:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return ResourceExhausted(f"{RESOURCE_ERRNOS[exc.errno]}, try again", kind=name)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PathError(f"{what}: permission denied")
    return TransportError(f"{what}: {exc.strerror or exc}", status=500)


class ConnectionLost(TransportError):
    """The peer or the network went away mid-stream (translated from aiohttp/OSError)."""

    status = 503


class ConnectError(ConnectionLost):
    """No connection could be made to the peer at all (refused, unreachable, timed out
    while connecting): nothing was sent. A path manager retries it with a backoff."""


class RemoteError(TransportError):
    """The peer answered with an error; ``status`` is its HTTP status. ``retry_after``
    (seconds) is the peer's ``Retry-After`` when it gave one (RFC 9110 section 10.2.3)."""

    retry_after: float | None = None

    def __init__(self, message: str, *, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after
