"""Fewer copies of stream payloads through aiohttp, on both ends of a stream.

Two copies of every payload byte were made on the event loop (``perf``/``py-spy`` of a
2 GiB loopback download: the two joins were about a fifth of the loop's samples):

* **sending**: aiohttp frames each chunked write as ``(size line, data, CRLF)`` and, on
  Pythons where it does not trust ``transport.writelines``, joins the three into one new
  ``bytes`` (``aiohttp.http_writer.SKIP_WRITELINES``: a 4 MiB copy per block). That guard
  is for the zero-copy ``writelines`` of asyncio's selector transport in Python
  3.12.0-3.12.8 and 3.13.0-3.13.1; before 3.12 asyncio's ``writelines`` joins by itself
  and uvloop's (both ends run on uvloop) queues the buffers and ``writev``s them.
  ``allow_writelines`` lifts the guard where it is not needed. The transport may then
  hold a payload buffer after ``write`` returned, so a sender never reuses one (every
  block read is a fresh ``bytes``).
* **receiving**: ``StreamReader.read(n)`` joins every chunk buffered into one new
  ``bytes`` of up to ``n`` bytes. ``read_part`` asks for exactly the first buffered chunk
  when it fits in ``n`` (``bytes.join`` of one ``bytes`` returns it as it is; the rest
  of a chunk whose start a frame header took is one slice of that chunk).
"""

from __future__ import annotations

import sys

import aiohttp.http_writer
from aiohttp import StreamReader


def writelines_safe(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> bool:
    """True where asyncio's ``writelines`` has no zero-copy bug: before 3.12 (it joins),
    3.12.9 and later 3.12s, 3.13.2 and later."""
    return version < (3, 12) or (3, 12, 9) <= version < (3, 13) or version >= (3, 13, 2)


def allow_writelines() -> bool:
    """Let aiohttp hand a chunk's framing and data to the transport as they are (no join)
    where that is safe (``writelines_safe``); returns whether it does."""
    if writelines_safe() and getattr(aiohttp.http_writer, "SKIP_WRITELINES", False):
        aiohttp.http_writer.SKIP_WRITELINES = False
    return not getattr(aiohttp.http_writer, "SKIP_WRITELINES", False)


async def read_part(content: StreamReader, n: int) -> bytes:
    """At most ``n`` bytes from ``content`` (empty at its end), without joining: the first
    buffered chunk (or what is left of it) when it fits, else what ``read(n)`` gives. Uses the reader's
    buffer only to learn the first chunk's size; falls back to ``read(n)`` if aiohttp
    changes it."""
    buf = getattr(content, "_buffer", None)
    offset = getattr(content, "_buffer_offset", None)
    if buf and isinstance(offset, int):
        first = len(buf[0]) - offset  # the rest of a chunk a frame header began
        if 0 < first <= n:
            return await content.read(first)
    return await content.read(n)


allow_writelines()
