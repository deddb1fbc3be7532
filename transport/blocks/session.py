"""The data-plane half of a session: what to send, where received blocks go.

A session's files are numbered by their manifest position. The sender side is
a ``BlockSender`` (``transport.blocks.sender``): a lease scheduler any number
of paths draw pieces from, each under its own id, retired by the receiver's
acknowledgements; a dead path's leases go back to the others at once. The
receiver side is a ``BlockSink`` (``transport.blocks.sink``): pieces through
one ``BlockAssembler`` into one ``FileReceiver`` per file. Both are
path-agnostic: HTTP streams use them now, the UDP path (#4) will feed and
drain the very same objects, so a failover (#5) moves the remaining blocks
from one path to the other with nothing re-sent.
"""

from __future__ import annotations

from collections.abc import Callable

from transport.blocks.sender import HTTP_TIMING, BlockSender
from transport.blocks.sink import BlockSink

ProgressFn = Callable[[int, int], None]
"""Called with (file index, wire bytes) for every block moved."""

__all__ = ["HTTP_TIMING", "BlockSender", "BlockSink", "ProgressFn"]
