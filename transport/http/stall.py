"""A response write that must make progress: a client that stops reading is cut off.

A download stream's ``write`` waits for the socket to drain. A client that keeps the
connection open and never reads would hold that wait, the stream's slot under
``streams_max`` and the session (a session with a stream open is never reaped)
without bound; its leases come back only at their deadline. ``write_progressing``
watches the transport's write buffer while a write waits: when it has not shrunk for
``stall`` seconds the connection is aborted, and the write fails as for a client that
went away (the stream gives its leases back at once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable

log = logging.getLogger("transport.http")

WRITE_STALL = 120.0
"""Seconds a write may wait with nothing taken off the socket: twice the client's own
stall timeout (``fallback.client.manager.STALL_TIMEOUT``, 60 s), so a real client has
given such a stream up before the daemon does."""


async def write_progressing(write: Awaitable[None], transport: asyncio.BaseTransport | None,
                            stall: float = WRITE_STALL) -> None:
    """Await ``write`` (a write and its drain); abort ``transport`` when its write buffer
    has not shrunk for ``stall`` seconds meanwhile (checked every quarter of it)."""
    if not isinstance(transport, asyncio.WriteTransport):
        await write
        return
    loop = asyncio.get_running_loop()
    period = stall / 4
    last: int | None = None
    since = time.monotonic()  # the last time the buffer was seen to shrink
    handle: asyncio.TimerHandle | None = None

    def check() -> None:
        nonlocal last, since, handle
        size = transport.get_write_buffer_size()
        now = time.monotonic()
        if last is None or size < last:
            since = now
        last = size
        if now - since >= stall and not transport.is_closing():
            log.warning("a client read nothing for %.0f s (%d bytes waiting): connection "
                        "closed", now - since, size)
            transport.abort()
            return
        handle = loop.call_later(period, check)

    handle = loop.call_later(period, check)
    try:
        await write
    finally:
        if handle is not None:
            handle.cancel()
