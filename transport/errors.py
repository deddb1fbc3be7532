"""One error hierarchy for the data plane.

Every error carries a ``status`` hint (the HTTP status a server should answer
with, in the manner of h11's ``error_status_hint``) so the boundary that
translates it into a response or an exit code does not need a lookup table.
"""

from __future__ import annotations


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


class ConnectionLost(TransportError):
    """The peer or the network went away mid-stream (translated from aiohttp/OSError)."""

    status = 503


class RemoteError(TransportError):
    """The peer answered with an error; ``status`` is its HTTP status."""
