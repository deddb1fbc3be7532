"""Per-block transforms: what is stored may differ from what the user's file holds.

A transform maps plaintext block ``i`` to its stored form and back. The stored
object is ``header`` followed by the transformed blocks, each at most
``block_size + overhead`` bytes, so offsets stay computable without an index.
Both data paths (HTTP now, UDP in #4) move *stored* blocks; only the two ends
apply the transform, so encryption at rest (#6) is the same on every path and
survives a failover between them.
"""

from __future__ import annotations

from typing import Protocol


class BlockTransform(Protocol):
    """Encode plaintext blocks into stored blocks and back.

    Implementations must be deterministic per (index, plaintext) so a resumed
    transfer re-encodes a block identically, and must raise
    ``transport.errors.IntegrityError`` from ``decode`` on tampered input.
    """

    @property
    def name(self) -> str: ...

    @property
    def header(self) -> bytes: ...

    @property
    def overhead(self) -> int: ...

    def encode(self, index: int, plain: bytes | bytearray | memoryview) -> bytes | bytearray: ...

    def decode(self, index: int, stored: bytes | bytearray | memoryview) -> bytes | bytearray: ...


class Identity:
    """The plain transform: stored bytes are the file's bytes."""

    name = "identity"
    header = b""
    overhead = 0

    def encode(self, index: int, plain: bytes | bytearray | memoryview) -> bytes:
        return bytes(plain)

    def decode(self, index: int, stored: bytes | bytearray | memoryview) -> bytes:
        return bytes(stored)


IDENTITY = Identity()
