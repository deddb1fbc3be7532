"""The client engine: one transfer session, its paths and the path manager.

* ``session``: ``TransferSession`` (what both directions share), ``transfer`` and
  ``transfer_async``;
* ``upload`` / ``download``: the two directions (plan, move, commit);
* ``control``: the typed control client (``fallback.control`` requests,
  ``fallback.answers`` answers);
* ``paths``: the path interface, its typed signals, and ``HttpPath``;
* ``manager``: ``PathManager``, which runs the paths, retries failed ones with
  exponential backoff and full jitter, and decides when a phase has failed.
"""

from fallback.client.options import Options, strong_passphrase
from fallback.client.session import transfer, transfer_async

__all__ = ["Options", "strong_passphrase", "transfer", "transfer_async"]
