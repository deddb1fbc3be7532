"""The client's TLS in a thread per connection (``fallback.clienttls.PumpedConnector``):
bodies both ways intact, trust decided exactly as aiohttp decides it (CA, fingerprint,
hostname), the governor's socket is the TCP one, and no thread outlives its connection.
A real aiohttp HTTPS server on loopback, real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from fallback.clienttls import PumpedConnector
from fallback.tls import ensure_self_signed, parse_fingerprint, server_ssl_context
from transport.http.client import _STREAM_SOCKET

BODY = os.urandom(6 << 20)  # larger than the pump's 256 KiB buffer and the socket buffers


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[str, str, Path]]:
    """(https base URL, the certificate's fingerprint, the certificate's path)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    fp = ensure_self_signed(cert, key, hostnames=("localhost",), ips=("127.0.0.1",))

    async def get(_: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(_)
        for i in range(0, len(BODY), 1 << 20):
            await resp.write(BODY[i:i + (1 << 20)])
        await resp.write_eof()
        return resp

    async def put(request: web.Request) -> web.Response:
        h = hashlib.sha256()
        n = 0
        while chunk := await request.content.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
        return web.json_response({"bytes": n, "sha256": h.hexdigest()})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_get("/blob", get)
    app.router.add_put("/blob", put)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ssl_context(cert, key))
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"https://127.0.0.1:{port}", fp, cert
    finally:
        await runner.cleanup()


def _pump_threads() -> int:
    return sum(t.name == "fallback-tls-client" for t in threading.enumerate())


async def _body() -> AsyncIterator[bytes]:
    for i in range(0, len(BODY), 1 << 20):
        yield BODY[i:i + (1 << 20)]


async def test_pinned_fingerprint_moves_bodies_both_ways_in_a_thread(server) -> None:
    base, fp, _ = server
    pin = aiohttp.Fingerprint(parse_fingerprint(fp))
    async with aiohttp.ClientSession(connector=PumpedConnector()) as http:
        async with http.get(f"{base}/blob", ssl=pin) as resp:
            assert resp.status == 200
            assert _pump_threads() == 1  # TLS of this connection runs in its thread
            assert await resp.read() == BODY
        async with http.put(f"{base}/blob", data=_body(), ssl=pin) as resp:
            got = await resp.json()
        assert got == {"bytes": len(BODY), "sha256": hashlib.sha256(BODY).hexdigest()}
    for _ in range(100):  # the session closed its connections: the threads end
        if _pump_threads() == 0:
            break
        await asyncio.sleep(0.02)
    assert _pump_threads() == 0


async def test_wrong_fingerprint_is_aiohttps_mismatch(server) -> None:
    base, fp, _ = server
    wrong = bytes(b ^ 0xFF for b in parse_fingerprint(fp))
    async with aiohttp.ClientSession(connector=PumpedConnector()) as http:
        with pytest.raises(aiohttp.ServerFingerprintMismatch) as info:
            await http.get(f"{base}/blob", ssl=aiohttp.Fingerprint(wrong))
    assert info.value.got == parse_fingerprint(fp)  # what the daemon presented, for the message


async def test_untrusted_chain_and_wrong_name_are_certificate_errors(server) -> None:
    base, _, cert = server
    async with aiohttp.ClientSession(connector=PumpedConnector()) as http:
        # the system CAs do not know a self-signed certificate
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await http.get(f"{base}/blob", ssl=ssl.create_default_context())
        # trusted, but the URL names a host the certificate does not
        ctx = ssl.create_default_context(cafile=str(cert))
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await http.get(base.replace("127.0.0.1", "localhost") + "/blob", ssl=ctx,
                           server_hostname="other.example")
        # trusted with --cacert and the right name: served
        async with http.get(f"{base}/blob", ssl=ctx) as resp:
            assert await resp.read() == BODY


async def test_insecure_and_stream_socket_is_tcp(server) -> None:
    base, _, _ = server
    slot: list[object] = []
    token = _STREAM_SOCKET.set(slot)  # type: ignore[arg-type]
    try:
        async with aiohttp.ClientSession(connector=PumpedConnector()) as http:
            async with http.get(f"{base}/blob", ssl=False) as resp:
                assert await resp.read() == BODY
    finally:
        _STREAM_SOCKET.reset(token)
    assert len(slot) == 1
    sock = slot[0]
    assert isinstance(sock, socket.socket) and sock.family == socket.AF_INET  # TCP_INFO works


async def test_closed_port_is_a_connect_error(unused_tcp_port: int) -> None:
    async with aiohttp.ClientSession(connector=PumpedConnector()) as http:
        with pytest.raises(aiohttp.ClientConnectorError):
            await http.get(f"https://127.0.0.1:{unused_tcp_port}/", ssl=False)
