"""fallback: bulk file transfer with resumable, verified HTTP(S) fallback.

``transfer(src, dst, **options)`` copies between a local path and a daemon URL
(``http(s)://[user@]host[:port]/path``); ``transfer_async`` is its async twin.
Both return a ``TransferResult`` and raise ``TransferError`` on failure.
"""

from fallback.engine import Options, transfer, transfer_async
from fallback.errors import FallbackError, TransferError, UsageError
from fallback.result import ProgressEvent, TransferResult

__all__ = [
    "FallbackError",
    "Options",
    "ProgressEvent",
    "TransferError",
    "TransferResult",
    "UsageError",
    "transfer",
    "transfer_async",
]
__version__ = "0.1.0"
