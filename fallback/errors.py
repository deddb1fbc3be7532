"""The product's errors. ``TransferError`` is the one type ``transfer()`` raises.

Data-plane errors (``transport.errors.TransportError``) are translated into
``TransferError`` at the engine boundary, keeping the message, the error's kind and,
for an error answer of the daemon, the status it answered with; usage and config
problems are ``UsageError`` (CLI exit 2). ``HttpRefusal`` is the daemon's own refusal
with a status the data plane has no kind for (429, 412).
"""

from __future__ import annotations

from transport.errors import ConnectError, ErrorKind, TransportError


class FallbackError(Exception):
    """Base of every error this product raises to its users."""

    exit_code = 1

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class TransferError(FallbackError):
    """A transfer failed. ``result`` holds what was done before it failed, when known;
    ``kind`` is the data-plane error's kind (None for a local OS error); ``status`` is the
    HTTP status of the daemon's error answer when the transfer ended on one (401 for a
    refused login), else None."""

    def __init__(self, message: str, *, kind: ErrorKind | None = None, status: int | None = None,
                 result: object = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.result = result


class UsageError(FallbackError):
    """Bad arguments or options: nothing was attempted."""

    exit_code = 2



class HttpRefusal(TransportError):
    """A refusal of the daemon's HTTP side with a status the data plane has no kind for:
    answered with ``status`` as it is (``fallback.daemonctx.http_status``)."""

    status: int = 400


class Busy(HttpRefusal):
    """Too much is under way at once (a user's sessions, a session's streams, a second
    digests call): 429 Too Many Requests (RFC 6585 section 4). Retry later."""

    kind = ErrorKind.UNAVAILABLE
    status = 429


class PreconditionFailed(HttpRefusal):
    """A plain request's precondition (``If-Match``, ``If-Unmodified-Since``, ...) is
    false: 412 Precondition Failed (RFC 9110 section 13.1 and 15.5.13)."""

    kind = ErrorKind.CONFLICT
    status = 412


class NotOffered(HttpRefusal):
    """The daemon does not offer what was asked (its UDP path is disabled or its port
    could not be bound): 501 Not Implemented (RFC 9110 section 15.6.2)."""

    kind = ErrorKind.UNAVAILABLE
    status = 501


class UdpUnavailable(ConnectError):
    """``--transport udp`` and the UDP path cannot be had (no answer to the probes, port
    unreachable, not offered): the transfer fails at once with this reason in one line;
    re-connecting would not change it (``fallback.client.retry.retryable``)."""
