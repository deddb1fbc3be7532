"""One listening port that serves both plain HTTP and HTTPS.

The config allows ``http_port == https_port`` so that a single firewall hole is
enough.  Every TLS connection starts with a handshake record whose first byte
is 0x16, while an HTTP request starts with a method name in ASCII; peeking at
that one byte (without consuming it) tells us whether to wrap the connection in
TLS before handing it to aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import ssl
from typing import Any

from aiohttp import web
from yarl import URL

__all__ = ["SniffingSite", "TLS_HANDSHAKE_BYTE"]

log = logging.getLogger(__name__)

TLS_HANDSHAKE_BYTE = 0x16
# accept() errors that mean "out of resources", not "bad client": back off
# instead of spinning, like asyncio's own server does.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_RETRY_DELAY = 1.0


class _SniffingServer(asyncio.AbstractServer):
    """The object stored in ``BaseSite._server``.

    aiohttp's runner only uses ``close()`` and ``sockets`` (for
    ``runner.addresses``); the rest of the AbstractServer API is implemented
    so the object behaves sensibly if someone else pokes at it.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        accept_task: asyncio.Task[None],
        conn_tasks: set[asyncio.Task[None]],
    ) -> None:
        self._loop = loop
        self._sock: socket.socket | None = sock
        self._accept_task = accept_task
        self._conn_tasks = conn_tasks
        # The listening socket is closed only once the accept task has finished:
        # closing it while sock_accept still has the fd registered with the
        # selector could, after fd reuse, unregister an unrelated socket.
        accept_task.add_done_callback(self._on_accept_done)

    def _on_accept_done(self, task: asyncio.Task[None]) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if not task.cancelled() and task.exception() is not None:
            log.error("accept loop failed", exc_info=task.exception())

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._sock is None else (self._sock,)

    def close(self) -> None:
        self._accept_task.cancel()
        for task in list(self._conn_tasks):
            task.cancel()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return not self._accept_task.done()

    async def start_serving(self) -> None:
        """Serving starts as soon as the site starts; nothing to do."""

    async def serve_forever(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._accept_task)

    async def wait_closed(self) -> None:
        tasks = [self._accept_task, *self._conn_tasks]
        await asyncio.gather(*tasks, return_exceptions=True)


class SniffingSite(web.BaseSite):
    """An aiohttp site that serves HTTP and HTTPS on the same port.

    Connections are accepted by our own loop rather than ``loop.create_server``
    because asyncio decides about TLS per server, not per connection.  After the
    first byte is peeked, the socket goes to ``loop.connect_accepted_socket`` with
    the runner's protocol factory, so aiohttp handles it exactly as for a
    ``TCPSite`` (keep-alive, graceful shutdown, ``request.secure``).

    At most *max_pending* connections may be between accept and the end of the
    TLS handshake; beyond that, accepting pauses and new clients wait in the
    kernel backlog.  This bounds the memory an idle-connection flood can pin
    while still letting legitimate clients through once slots free up (each slot
    is held at most *sniff_timeout* + *handshake_timeout*).
    """

    __slots__ = (
        "_bound_port",
        "_conn_tasks",
        "_handshake_timeout",
        "_host",
        "_max_pending",
        "_port",
        "_reuse_port",
        "_sniff_timeout",
    )

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None,
        port: int,
        ssl_context: ssl.SSLContext | None,
        *,
        backlog: int = 128,
        reuse_port: bool = False,
        sniff_timeout: float = 10.0,
        handshake_timeout: float = 10.0,
        max_pending: int = 256,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self._host = host
        self._port = port
        self._bound_port: int | None = None
        self._reuse_port = reuse_port
        self._sniff_timeout = sniff_timeout
        self._handshake_timeout = handshake_timeout
        self._max_pending = max_pending
        self._conn_tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound port once started (useful with port 0), else the requested one."""
        return self._bound_port if self._bound_port is not None else self._port

    @property
    def name(self) -> str:
        # Both schemes work; advertise https when TLS is available since that is
        # what clients should prefer.
        scheme = "https" if self._ssl_context is not None else "http"
        host = self._host or "0.0.0.0"
        return str(URL.build(scheme=scheme, host=host, port=self.port))

    def _make_socket(self) -> socket.socket:
        host = self._host or "0.0.0.0"
        try:
            family = (
                socket.AF_INET6
                if ipaddress.ip_address(host.strip("[]")).version == 6
                else socket.AF_INET
            )
            addr: Any = (host.strip("[]"), self._port)
        except ValueError:  # a hostname: let the resolver pick the family
            info = socket.getaddrinfo(
                host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            if not info:
                raise OSError(f"cannot resolve listen address {host!r}") from None
            family, _, _, _, addr = info[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if hasattr(socket, "SO_REUSEADDR") and hasattr(socket, "AF_UNIX"):  # POSIX
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self._reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                # Same as asyncio.create_server: "::" means IPv6 only.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(self._backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        try:
            sock = self._make_socket()
        except BaseException:
            self._runner._unreg_site(self)
            raise
        self._bound_port = sock.getsockname()[1]
        task = loop.create_task(self._accept_loop(sock), name=f"accept {self.name}")
        self._server = _SniffingServer(loop, sock, task, self._conn_tasks)

    async def stop(self) -> None:
        server = self._server
        await super().stop()  # closes: cancels the accept loop and pending sniffs
        if server is not None:
            await server.wait_closed()

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self._max_pending)
        while True:
            await slots.acquire()
            try:
                conn, _addr = await loop.sock_accept(lsock)
            except (ConnectionAbortedError, InterruptedError):
                slots.release()  # the client gave up before we accepted
                continue
            except OSError as exc:
                slots.release()
                if exc.errno not in _RESOURCE_ERRNOS:
                    raise
                log.warning("accept failed (%s); retrying in %.0fs", exc, _ACCEPT_RETRY_DELAY)
                await asyncio.sleep(_ACCEPT_RETRY_DELAY)
                continue
            except BaseException:
                slots.release()
                raise
            task = loop.create_task(self._handle(conn))
            self._conn_tasks.add(task)
            task.add_done_callback(self._conn_tasks.discard)
            task.add_done_callback(lambda _t: slots.release())

    async def _peek(self, sock: socket.socket) -> int | None:
        """Wait for and return the first byte without consuming it (None on EOF)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = sock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                pass
            else:
                return data[0] if data else None
            readable = loop.create_future()
            loop.add_reader(sock, _set_ready, readable)
            try:
                await readable
            finally:
                loop.remove_reader(sock)

    async def _handle(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        handed_off = False
        try:
            try:
                async with asyncio.timeout(self._sniff_timeout):
                    first = await self._peek(sock)
            except (TimeoutError, OSError):
                return
            if first is None:
                return
            server = self._runner.server
            if server is None:  # runner cleaned up while we waited
                return
            use_tls = first == TLS_HANDSHAKE_BYTE and self._ssl_context is not None
            handed_off = True
            if use_tls:
                await loop.connect_accepted_socket(
                    server,
                    sock,
                    ssl=self._ssl_context,
                    ssl_handshake_timeout=self._handshake_timeout,
                )
            else:
                await loop.connect_accepted_socket(server, sock)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Failed handshakes (scanners, wrong protocol, timeouts) are routine;
            # asyncio has already closed the transport and thus the socket.
            log.debug("connection setup failed: %r", exc)
        finally:
            if not handed_off:
                sock.close()


def _set_ready(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
