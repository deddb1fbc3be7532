"""Tests for fallback.listener.SniffingSite: HTTP and HTTPS on one real port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from fallback.listener import SniffingSite
from fallback.tls import client_ssl, ensure_self_signed, server_ssl_context


@dataclass(frozen=True, slots=True)
class Tls:
    cert: Path
    key: Path
    fp: str


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    d = tmp_path_factory.mktemp("tls")
    fp = ensure_self_signed(d / "cert.pem", d / "key.pem")
    return Tls(d / "cert.pem", d / "key.pem", fp)


def _app() -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello {request.scheme}")

    async def echo_len(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(text=f"{request.scheme} {len(body)} {body[:4].decode()}")

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_get("/", hello)
    app.router.add_post("/echo", echo_len)
    return app


@contextlib.asynccontextmanager
async def serving(
    tls: Tls | None, host: str = "127.0.0.1", **kwargs: Any
) -> AsyncIterator[SniffingSite]:
    runner = web.AppRunner(_app())
    await runner.setup()
    ctx = server_ssl_context(tls.cert, tls.key) if tls is not None else None
    site = SniffingSite(runner, host, 0, ctx, **kwargs)
    await site.start()
    try:
        yield site
    finally:
        await runner.cleanup()


async def _get(url: str, tls: Tls, **kwargs: Any) -> tuple[int, str]:
    ssl_arg = client_ssl(None, tls.fp, False) if url.startswith("https") else True
    async with aiohttp.ClientSession() as session:
        async with session.get(url, ssl=ssl_arg, **kwargs) as resp:
            return resp.status, await resp.text()


async def test_http_and_https_on_one_port(tls: Tls) -> None:
    async with serving(tls) as site:
        assert site.port != 0
        assert site.name == f"https://127.0.0.1:{site.port}"
        assert await _get(f"http://127.0.0.1:{site.port}/", tls) == (200, "hello http")
        assert await _get(f"https://127.0.0.1:{site.port}/", tls) == (200, "hello https")


async def test_keepalive_and_many_requests(tls: Tls) -> None:
    async with serving(tls) as site:
        async with aiohttp.ClientSession() as session:
            pin = client_ssl(None, tls.fp, False)

            async def one(i: int) -> str:
                scheme = "https" if i % 2 else "http"
                ssl_arg = pin if i % 2 else True
                async with session.get(f"{scheme}://127.0.0.1:{site.port}/", ssl=ssl_arg) as r:
                    assert r.status == 200
                    return await r.text()

            bodies = await asyncio.gather(*(one(i) for i in range(40)))
        assert bodies == ["hello https" if i % 2 else "hello http" for i in range(40)]


async def test_large_body_not_corrupted_by_peek(tls: Tls) -> None:
    payload = b"ABCD" + bytes(range(256)) * 2048  # 512 KiB: many TLS records
    async with serving(tls) as site:
        async with aiohttp.ClientSession() as session:
            for scheme, ssl_arg in (("http", True), ("https", client_ssl(None, tls.fp, False))):
                url = f"{scheme}://127.0.0.1:{site.port}/echo"
                async with session.post(url, data=payload, ssl=ssl_arg) as resp:
                    assert resp.status == 200
                    assert await resp.text() == f"{scheme} {len(payload)} ABCD"


async def test_runner_addresses_and_stop(tls: Tls) -> None:
    runner = web.AppRunner(_app())
    await runner.setup()
    site = SniffingSite(runner, "127.0.0.1", 0, server_ssl_context(tls.cert, tls.key))
    await site.start()
    port = site.port
    assert runner.addresses == [("127.0.0.1", port)]
    assert await _get(f"http://127.0.0.1:{port}/", tls) == (200, "hello http")
    await runner.cleanup()
    assert runner.addresses == []
    with pytest.raises(OSError):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()


async def test_stop_with_idle_connections_pending(tls: Tls) -> None:
    """Idle sniffing connections must not delay shutdown by the sniff timeout."""
    async with contextlib.AsyncExitStack() as stack:
        site = await stack.enter_async_context(serving(tls))
        idle = [await asyncio.open_connection("127.0.0.1", site.port) for _ in range(5)]
        for _, w in idle:
            stack.callback(w.close)
        await asyncio.sleep(0.1)
        assert len(site._conn_tasks) == 5
        t0 = time.monotonic()
        await site.stop()
        assert time.monotonic() - t0 < 2
        assert not site._conn_tasks
        for reader, _ in idle:  # the server side was closed
            assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_idle_client_does_not_block_others(tls: Tls) -> None:
    async with serving(tls) as site:
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", site.port)
        try:
            t0 = time.monotonic()
            results = await asyncio.wait_for(
                asyncio.gather(
                    _get(f"http://127.0.0.1:{site.port}/", tls),
                    _get(f"https://127.0.0.1:{site.port}/", tls),
                ),
                5,
            )
            assert list(results) == [(200, "hello http"), (200, "hello https")]
            assert time.monotonic() - t0 < 5
        finally:
            idle_w.close()


async def test_idle_client_times_out(tls: Tls) -> None:
    async with serving(tls, sniff_timeout=0.3) as site:
        reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
        try:
            t0 = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
            assert 0.2 < time.monotonic() - t0 < 3
        finally:
            writer.close()
        assert await _get(f"http://127.0.0.1:{site.port}/", tls) == (200, "hello http")


async def test_slow_first_byte_is_waited_for(tls: Tls) -> None:
    async with serving(tls, sniff_timeout=5) as site:
        reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
        await asyncio.sleep(0.3)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"Connection: close\r\n\r\n")
        response = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert response.startswith(b"HTTP/1.1 200 ")
        assert response.endswith(b"hello http")


async def test_quiet_on_early_close_and_garbage(tls: Tls, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with serving(tls) as site:
        # Connect and close without sending anything, also with an RST.
        for linger in (False, True):
            s = socket.create_connection(("127.0.0.1", site.port))
            if linger:
                s.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            s.close()
        # A "TLS" record that is garbage: handshake fails, connection is closed.
        reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
        writer.write(b"\x16\x03\x01\x00\x05hello-not-tls" * 4)
        await writer.drain()
        # Closed: at most a TLS alert record first (the handshake runs on a blocking
        # SSLSocket in a thread, fallback.tlspump, whose OpenSSL sends the alert).
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer == b"" or (answer[:1] == b"\x15" and len(answer) == 7), answer
        writer.close()
        await asyncio.sleep(0.1)
        assert not site._conn_tasks
        assert await _get(f"https://127.0.0.1:{site.port}/", tls) == (200, "hello https")
    errors = [r for r in caplog.records if r.name.startswith("fallback")]
    assert errors == []


async def test_pending_connections_are_bounded(tls: Tls) -> None:
    async with serving(tls, sniff_timeout=0.5, max_pending=2) as site:
        idle = [await asyncio.open_connection("127.0.0.1", site.port) for _ in range(4)]
        try:
            await asyncio.sleep(0.1)
            assert len(site._conn_tasks) == 2  # the others wait in the kernel backlog
            t0 = time.monotonic()
            # Served once the idle ones time out and free their slots.
            assert await asyncio.wait_for(_get(f"http://127.0.0.1:{site.port}/", tls), 10) == (
                200,
                "hello http",
            )
            assert time.monotonic() - t0 >= 0.3
            assert len(site._conn_tasks) <= 2
        finally:
            for _, w in idle:
                w.close()


async def test_plain_only_site(tls: Tls) -> None:
    async with serving(None) as site:
        assert site.name.startswith("http://")
        assert await _get(f"http://127.0.0.1:{site.port}/", tls) == (200, "hello http")


def _have_ipv6() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _have_ipv6(), reason="no IPv6 loopback")
async def test_ipv6(tls: Tls) -> None:
    async with serving(tls, host="::1") as site:
        assert site.name == f"https://[::1]:{site.port}"
        assert await _get(f"http://[::1]:{site.port}/", tls) == (200, "hello http")
        assert await _get(f"https://[::1]:{site.port}/", tls) == (200, "hello https")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_curl_both_schemes(tls: Tls) -> None:
    async with serving(tls) as site:
        for scheme in ("http", "https"):
            proc = await asyncio.create_subprocess_exec(
                "curl",
                "-sSk",
                "--max-time",
                "10",
                "-w",
                " %{http_code}",
                f"{scheme}://127.0.0.1:{site.port}/",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
            assert out.decode() == f"hello {scheme} 200"


def test_under_uvloop(tls: Tls) -> None:
    """The daemon runs on uvloop; add_reader/peek/connect_accepted_socket must work there."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with serving(tls, sniff_timeout=0.5) as site:
            idle_r, idle_w = await asyncio.open_connection("127.0.0.1", site.port)
            assert await _get(f"http://127.0.0.1:{site.port}/", tls) == (200, "hello http")
            assert await _get(f"https://127.0.0.1:{site.port}/", tls) == (200, "hello https")
            assert await asyncio.wait_for(idle_r.read(), 5) == b""
            idle_w.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
