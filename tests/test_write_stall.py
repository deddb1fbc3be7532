"""A download write that makes no progress is cut off (``transport.http.stall``); a slow
reader that keeps reading is not."""

from __future__ import annotations

import asyncio
import socket
import time

from aiohttp import web

from transport.http.stall import write_progressing

CHUNK = 1 << 20


async def _serve(stall: float, total: int) -> tuple[web.AppRunner, int, asyncio.Future[str]]:
    """A server whose one route writes ``total`` bytes through ``write_progressing``;
    the future says how the handler ended ('done' or the error's name)."""
    ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            for _ in range(total // CHUNK):
                await write_progressing(resp.write(b"x" * CHUNK), request.transport, stall)
            ended.set_result("done")
        except Exception as exc:
            ended.set_result(type(exc).__name__)
            raise
        return resp

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port, ended


def _client(port: int) -> socket.socket:
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    c.connect(("127.0.0.1", port))
    c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    return c


async def test_a_client_that_stops_reading_is_cut_off() -> None:
    runner, port, ended = await _serve(0.4, 64 * CHUNK)
    c = _client(port)
    try:
        start = time.monotonic()
        assert await asyncio.wait_for(ended, 10) != "done"  # aborted: the write failed
        assert time.monotonic() - start < 3  # within the bound (0.4 s, and a quarter)
    finally:
        c.close()
        await runner.cleanup()


async def test_a_slow_reader_that_keeps_reading_is_not_cut_off() -> None:
    runner, port, ended = await _serve(1.0, 8 * CHUNK)
    c = _client(port)
    c.setblocking(False)
    loop = asyncio.get_running_loop()
    got = 0
    try:
        while not ended.done() or got < 8 * CHUNK:
            data = await asyncio.wait_for(loop.sock_recv(c, 32 << 10), 5)
            if not data:
                break
            got += len(data)
            await asyncio.sleep(0.01)  # about 3 MB/s: each 1 MiB write waits ~0.3 s
        assert await asyncio.wait_for(ended, 5) == "done"
        assert got >= 8 * CHUNK
    finally:
        c.close()
        await runner.cleanup()
