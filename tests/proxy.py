"""A small HTTP proxy for the tests: CONNECT tunnels and plain forwarding, Basic auth.

``python -m tests.proxy --listen HOST:PORT [--auth USER:PASSWORD] [--log FILE]``
prints ``ready PORT`` once it listens (PORT 0: any free port). It behaves as the
proxies the client meets in companies (RFC 9110 section 9.3.6, CONNECT; RFC 9112
section 3.2.2, absolute-form targets; RFC 9110 section 11.7.1, 407 and
``Proxy-Authenticate``):

* ``CONNECT host:port``: opens a TCP connection and answers ``200``, then relays
  bytes both ways (TLS to the daemon runs inside: the proxy sees no plaintext);
* any other method with an absolute ``http://host:port/path`` target: forwards
  that one request to the origin in origin form with ``Connection: close``
  (one request per client connection, which keeps the relay a plain byte pipe)
  and relays the answer;
* with ``--auth``: a request without the right ``Proxy-Authorization: Basic``
  gets ``407 Proxy Authentication Required`` with ``Proxy-Authenticate``.
* an origin that cannot be reached: ``502 Bad Gateway``.

Each request is logged as one line (``CONNECT host:port 200``,
``PUT http://... 407``) to ``--log`` so a test can check the proxy was used.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import sys
from urllib.parse import urlsplit

MAX_HEAD = 64 << 10


class Proxy:
    def __init__(self, auth: str | None, log: str | None) -> None:
        self.expected = "Basic " + base64.b64encode(auth.encode()).decode() if auth else None
        self.log_path = log

    def log(self, line: str) -> None:
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(line + "\n")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handle(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEAD:
            return
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers = [tuple(x.split(":", 1)) for x in lines[1:] if ":" in x]
        got = next((v.strip() for k, v in headers if k.lower() == "proxy-authorization"), None)
        if self.expected is not None and got != self.expected:
            self.log(f"{method} {target} 407")
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                         b"Proxy-Authenticate: Basic realm=\"test proxy\"\r\n"
                         b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            try:
                up_r, up_w = await asyncio.open_connection(host.strip("[]"), int(port))
            except OSError:
                self.log(f"CONNECT {target} 502")
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            self.log(f"CONNECT {target} 200")
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await _relay(reader, writer, up_r, up_w)
            return
        u = urlsplit(target)
        if u.scheme != "http" or not u.hostname:
            self.log(f"{method} {target} 400")
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return
        try:
            up_r, up_w = await asyncio.open_connection(u.hostname, u.port or 80)
        except OSError:
            self.log(f"{method} {target} 502")
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return
        self.log(f"{method} {target} forwarded")
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        drop = {"proxy-authorization", "proxy-connection", "connection", "keep-alive"}
        out = [f"{method} {path} {version}"]
        out += [f"{k}:{v}" for k, v in headers if k.lower() not in drop]
        out.append("Connection: close")
        up_w.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
        await _relay(reader, writer, up_r, up_w)


async def _relay(a_r: asyncio.StreamReader, a_w: asyncio.StreamWriter,
                 b_r: asyncio.StreamReader, b_w: asyncio.StreamWriter) -> None:
    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(1 << 16):
                w.write(data)
                await w.drain()
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                if w.can_write_eof():
                    w.write_eof()

    try:
        await asyncio.gather(pipe(a_r, b_w), pipe(b_r, a_w))
    finally:
        b_w.close()


async def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--auth", default=None)
    p.add_argument("--log", default=None)
    a = p.parse_args(argv)
    host, _, port = a.listen.rpartition(":")
    proxy = Proxy(a.auth, a.log)
    server = await asyncio.start_server(proxy.handle, host, int(port), limit=MAX_HEAD)
    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(sys.argv[1:]))
