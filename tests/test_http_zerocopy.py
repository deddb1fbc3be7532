"""Stream payloads through aiohttp without joins (transport/http/zerocopy.py)."""

from __future__ import annotations

import asyncio
import socket
import sys

import aiohttp.http_writer
import pytest
from aiohttp import StreamReader
from aiohttp.base_protocol import BaseProtocol

from transport.http import server  # noqa: F401 - importing the data path lifts the guard
from transport.http.zerocopy import read_part, writelines_safe


@pytest.mark.parametrize(("version", "safe"), [
    ((3, 11, 7), True), ((3, 12, 0), False), ((3, 12, 8), False), ((3, 12, 9), True),
    ((3, 13, 0), False), ((3, 13, 1), False), ((3, 13, 2), True), ((3, 14, 0), True)])
def test_writelines_safe_only_outside_the_buggy_pythons(version: tuple[int, int, int],
                                                         safe: bool) -> None:
    assert writelines_safe(version) is safe


def test_the_data_path_lifts_aiohttps_join_where_safe() -> None:
    assert aiohttp.http_writer.SKIP_WRITELINES is (not writelines_safe(sys.version_info[:3]))


async def _reader() -> StreamReader:
    """A reader whose protocol is connected to one end of a real socket pair."""
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    proto = BaseProtocol(loop)
    await loop.connect_accepted_socket(lambda: proto, a)
    b.close()
    return StreamReader(proto, 1 << 20, loop=loop)  # no pause: nothing parses here


async def test_read_part_hands_over_the_chunk_the_socket_gave() -> None:
    r = await _reader()
    a, b, c = b"a" * 300_000, b"b" * 200_000, b"c" * 100
    for chunk in (a, b, c):
        r.feed_data(chunk)
    r.feed_eof()
    got = [await read_part(r, 1 << 20), await read_part(r, 1 << 20)]
    assert got[0] is a and got[1] is b  # the same objects: not copied, not joined
    assert await read_part(r, 50) == b"c" * 50  # larger than asked for: a slice
    assert await read_part(r, 1 << 20) == b"c" * 50  # the rest after a slice
    assert await read_part(r, 1 << 20) == b""


async def test_read_part_after_a_header_takes_the_rest_of_that_chunk_only() -> None:
    r = await _reader()
    r.feed_data(b"H" * 28 + b"x" * 100_000)
    r.feed_data(b"y" * 100_000)
    assert await r.readexactly(28) == b"H" * 28  # a frame header
    assert await read_part(r, 1 << 20) == b"x" * 100_000  # not joined with the next chunk
    assert await read_part(r, 1 << 20) == b"y" * 100_000


async def test_read_part_waits_for_data_and_reads_no_further_than_asked() -> None:
    r = await _reader()
    task = asyncio.ensure_future(read_part(r, 10))
    await asyncio.sleep(0)
    assert not task.done()
    r.feed_data(b"0123456789abcdef")
    assert await task == b"0123456789"
    r.feed_eof()
    assert await read_part(r, 100) == b"abcdef"
