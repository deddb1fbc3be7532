"""The transfer engine's public names, where they have always been importable from.

The engine itself is the package ``fallback.client`` (session, paths, path
manager, typed control client); this module keeps ``fallback.engine.transfer``,
``transfer_async`` and ``Options`` working for the CLI, the demo, the tests and
users' scripts.
"""

from __future__ import annotations

from fallback.client.options import Options, strong_passphrase
from fallback.client.session import transfer, transfer_async

__all__ = ["Options", "strong_passphrase", "transfer", "transfer_async"]
