"""A stream's payload reaches the sink in parts, as the socket delivers it (issue 11 section 4).

``receive_blocks`` no longer joins each 4 MiB frame into one fresh buffer: it hands the
chunks to the sink about 1 MiB at a time, in order, joining only chunks shorter than
``INLINE_HASH_MIN``. Checked over a real aiohttp server on loopback with a client
whose body arrives in odd small chunks and in large ones: the file is whole and
verified, every block was hashed on arrival (nothing read back from the partial), and
the pieces were many (not one per block).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from transport.blocks.digest import block_digest, file_digest
from transport.blocks.receiver import FileReceiver
from transport.blocks.session import BlockSink
from transport.blocks.source import entry_for
from transport.http.framing import PieceHeader
from transport.http.server import receive_blocks

BS = 1 << 20
SIZE = 5 * BS + 12345


async def put_frames(sink: BlockSink, body: Any) -> int:
    """PUT ``body`` to a loopback aiohttp server whose handler runs ``receive_blocks`` into
    ``sink``; returns the frame count it answered."""
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"frames": await receive_blocks(request.content, sink)})

    app = web.Application()
    app.router.add_put("/blocks", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as http, \
                http.put(f"http://127.0.0.1:{port}/blocks", data=body) as resp:
            assert resp.status == 200
            return int((await resp.json())["frames"])
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("chunk,pause", [(5000, 0.0005), (300_000, 0.0)])
def test_parts_are_hashed_on_arrival_and_written_in_place(tmp_path: Path, chunk: int,
                                                          pause: float) -> None:
    """``pause``: the sender waits after each chunk, so the reader gets them one by one
    (small pieces that must be joined before the sink, or the block is read back)."""
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(SIZE))
    data = src.read_bytes()
    entry = entry_for(src, "dst.bin", BS)
    blocks = [data[k:k + BS] for k in range(0, SIZE, BS)]
    target = tmp_path / "dst.bin"
    stats: dict[str, int] = {}

    async def body() -> AsyncIterator[bytes]:
        for i, b in enumerate(blocks):
            yield PieceHeader(0, i, 0, len(b), block_digest(b)).pack()
            for k in range(0, len(b), chunk):  # the payload in chunk-sized HTTP chunks
                yield b[k:k + chunk]
                if pause:
                    await asyncio.sleep(pause)

    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            rec = FileReceiver(target, entry, fsync=False)
            sink = BlockSink({0: rec}, pool)

            assert await put_frames(sink, body()) == len(blocks)
            await sink.flush()
            asm = sink._assembler
            assert asm is not None
            st = asm.stats
            stats.update(pieces=st.pieces, readback=st.hashed_readback, inline=st.hashed_inline,
                         verified=st.verified)
            root = file_digest(BS, SIZE, (block_digest(b) for b in blocks))
            assert rec.commit(root) == root

    asyncio.run(main())
    assert target.read_bytes() == data
    assert stats["verified"] == len(blocks)
    assert stats["readback"] == 0, stats  # every block hashed as its pieces arrived
    assert stats["inline"] == SIZE
    assert stats["pieces"] > len(blocks), stats  # not joined into one piece per block


class _SecondJobLate(ThreadPoolExecutor):
    """Four workers; the second job submitted sleeps first, as a busy machine's thread might."""

    def __init__(self) -> None:
        super().__init__(4)
        self.jobs = 0

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        self.jobs += 1
        if self.jobs != 2:
            return super().submit(fn, *args, **kwargs)

        def late():  # type: ignore[no-untyped-def]
            time.sleep(0.3)
            return fn(*args, **kwargs)
        return super().submit(late)


def test_a_streams_pieces_reach_the_assembler_in_the_order_sent(tmp_path: Path) -> None:
    """Before: a stream's worker jobs could overtake each other. A block of two parts (two
    jobs) followed by a late duplicate of it: the duplicate's job ran while the block's
    last part was still queued, overlapped it as an open block, and was never counted
    (``duplicates=0`` in the daemon's log, one CI run in six under load)."""
    data = os.urandom(2 * BS + 999)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    entry = entry_for(src, "dst.bin", 2 * BS)
    b0, b1 = data[:2 * BS], data[2 * BS:]
    frames = [PieceHeader(0, 0, 0, len(b0), block_digest(b0)).pack() + b0,  # two jobs
              PieceHeader(0, 0, 0, len(b0), block_digest(b0)).pack() + b0,  # late duplicate
              PieceHeader(0, 1, 0, len(b1), block_digest(b1)).pack() + b1]
    target = tmp_path / "dst.bin"

    async def main() -> tuple[int, int]:
        with _SecondJobLate() as pool:
            rec = FileReceiver(target, entry, fsync=False)
            sink = BlockSink({0: rec}, pool)

            assert await put_frames(sink, b"".join(frames)) == 3
            await sink.flush()
            root = file_digest(2 * BS, len(data), (block_digest(b0), block_digest(b1)))
            assert rec.commit(root) == root
            assert pool.jobs >= 4  # the first block did go in two jobs
            return sink.duplicates, sink.failed

    assert asyncio.run(main()) == (1, 0)
    assert target.read_bytes() == data
