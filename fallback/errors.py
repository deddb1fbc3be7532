"""The product's errors. ``TransferError`` is the one type ``transfer()`` raises.

Data-plane errors (``transport.errors.TransportError``) are translated into
``TransferError`` at the engine boundary, keeping the message and the HTTP
status hint; usage and config problems are ``UsageError`` (CLI exit 2).
"""

from __future__ import annotations


class FallbackError(Exception):
    """Base of every error this product raises to its users."""

    exit_code = 1

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class TransferError(FallbackError):
    """A transfer failed. ``result`` holds what was done before it failed, when known."""

    def __init__(self, message: str, *, status: int | None = None, result: object = None) -> None:
        super().__init__(message)
        self.status = status
        self.result = result


class UsageError(FallbackError):
    """Bad arguments or options: nothing was attempted."""

    exit_code = 2
