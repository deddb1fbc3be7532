"""What a sending stream writes next: one piece, or a bundle of whole one-block files.

Both ends send through these (an upload body on the client, a download response on
the daemon), so a frame is built one way only (``transport.http.framing``). A lease
that reads as a ``Hole`` (``transport.blocks.sparse``) goes as a hole frame (``FBK2``
flag ``0x02``, no payload) when the peer reads them, else as its zeros; a one-block
file in a hole is never a bundle item (bundle items always carry their bytes): it
leaves as a hole frame beside the bundle, or as zeros inside it for a peer without
hole frames.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from transport.blocks.scheduler import Lease
from transport.blocks.sender import BlockSender, Payload
from transport.blocks.sparse import Hole, zeros
from transport.http.framing import BUNDLE_BYTES, BUNDLE_ITEMS, BundleItem, PieceHeader, pack_bundle

Buffer = bytes | bytearray | memoryview
Unit = tuple[list[Lease], bool]
"""Leases to send together, and whether they go as one bundle frame."""
Reads = asyncio.Future[list[tuple[Payload, bytes | None]]]
"""The reads of a unit's leases, in order: (bytes or hole, the block's digest at offset 0)."""


@dataclass(frozen=True, slots=True)
class UnitFrames:
    """A unit ready for the wire: its buffers in order, the payload bytes they carry (what
    pacing counts: a hole costs a header only), and per lease whether it went as a hole."""

    buffers: list[Buffer]
    payload: int
    holes: list[bool]


def frame(lease: Lease, data: Payload, digest: bytes | None, version: int,
          holes: bool) -> tuple[bytes, Buffer, bool]:
    """(header, payload, sent as a hole) of the frame carrying ``lease``'s ``data``: a
    ``Hole`` becomes a hole frame when the peer reads them (``holes``, version 2, digest
    known), else its zeros."""
    if isinstance(data, Hole):
        if holes and version == 2 and lease.offset == 0 and digest is not None:
            return PieceHeader(lease.file, lease.block, 0, lease.length, digest,
                               hole=True).pack(2), b"", True
        data = zeros(lease.length)
    return PieceHeader(lease.file, lease.block, lease.offset, lease.length,
                       digest).pack(version), data, False


def unit_frame(leases: list[Lease], bundle: bool, got: list[tuple[Payload, bytes | None]],
               version: int, holes: bool) -> UnitFrames:
    """The frames of one unit: one piece, or a bundle of whole one-block files (those in
    a hole as hole frames after it, when the peer reads them)."""
    if not bundle:
        head, body, hole = frame(leases[0], got[0][0], got[0][1], version, holes)
        return UnitFrames([head, body] if body else [head], len(body), [hole])
    items: list[BundleItem] = []
    after: list[Buffer] = []
    flags: list[bool] = []
    payload = 0
    for lease, (data, digest) in zip(leases, got, strict=True):
        if isinstance(data, Hole):
            if holes and version == 2 and digest is not None:
                head, _, _ = frame(lease, data, digest, version, holes)
                after.append(head)
                flags.append(True)
                continue
            data = zeros(lease.length)
        items.append(BundleItem(lease.file, data, digest or b""))
        payload += len(data)
        flags.append(False)
    out: list[Buffer] = [b"".join(pack_bundle(items))] if items else []
    return UnitFrames(out + after, payload, flags)


def take_unit(sender: BlockSender, path: str, bundles: bool) -> tuple[Unit, Reads | None]:
    """The path's next unit of work and its reads, started (None: nothing to send)."""
    unit = sender.take(path, max_items=BUNDLE_ITEMS if bundles else 1, max_bytes=BUNDLE_BYTES)
    return unit, asyncio.ensure_future(sender.read_many(unit[0])) if unit[0] else None


def no_unit() -> tuple[Unit, Reads | None]:
    """No unit in hand (a parked or stopping stream)."""
    return ([], False), None
