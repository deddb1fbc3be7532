"""The daemon's listening ports: HTTP, HTTPS, or both on one port, with bounded connections.

The config allows ``http_port == https_port`` so that a single firewall hole is
enough.  Every TLS connection starts with a handshake record whose first byte
is 0x16, while an HTTP request starts with a method name in ASCII; peeking at
that one byte (without consuming it) tells us whether to wrap the connection in
TLS before handing it to aiohttp.

Every port of the daemon goes through ``SniffingSite`` (a plain-only or TLS-only
port is a site that refuses the other kind), so every connection is bounded the
same way: at most ``ConnectionLimits.total`` open connections, and
``per_address`` from one peer address (beyond that a new connection is closed at
once, with one rate-limited log line); the first byte, the TLS handshake and the
first request's line and headers must all arrive within ``header_timeout``
seconds of the accept (slow-header "slowloris" connections are closed, counted
in one rate-limited line). Later requests on a kept-alive connection are
bounded by aiohttp's ``keepalive_timeout`` (set on the runner), which closes a
connection idle, or idle in the middle of a request's headers, that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import re
import socket
import ssl
from typing import Any

from aiohttp import web
from yarl import URL

from fallback.ratelog import RateLimitedLog
from fallback.tlspump import TransportView, start_pump

__all__ = ["ConnectionLimits", "SniffingSite", "TLS_HANDSHAKE_BYTE"]

log = logging.getLogger(__name__)
limited = RateLimitedLog(log)

TLS_HANDSHAKE_BYTE = 0x16
# accept() errors that mean "out of resources", not "bad client": back off
# instead of spinning, like asyncio's own server does.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_RETRY_DELAY = 1.0
HEADER_TIMEOUT = 30.0
"""Seconds from accept to the end of the first request's headers (TLS handshake included):
nginx's ``client_header_timeout`` and Apache's ``RequestReadTimeout header=`` default to
values of this order (60 s and 20-40 s)."""
_HEADERS_END = re.compile(rb"\n\r?\n")  # RFC 9112 section 2.2: a lone LF may end a line


class ConnectionLimits:
    """Connections open per peer address and in total, shared by all the daemon's sites.

    ``admit`` refuses (returns False, one rate-limited warning) when either bound is
    reached; every admitted connection is ``release``d exactly once when it closes.
    """

    def __init__(self, total: int, per_address: int) -> None:
        if total < 1 or per_address < 1:
            raise ValueError("connection limits must be at least 1")
        self.total = total
        self.per_address = per_address
        self.open = 0
        self._by_address: dict[str, int] = {}

    def admit(self, address: str) -> bool:
        here = self._by_address.get(address, 0)
        if self.open >= self.total:
            limited.warning("connections-total", "connection limit reached: %d connections open "
                            "(connections_max); refusing new connections", self.open)
            return False
        if here >= self.per_address:
            limited.warning("connections-address", "connection limit reached: %s has %d "
                            "connections open (connections_per_address_max); refusing its new "
                            "connections", address, here)
            return False
        self.open += 1
        self._by_address[address] = here + 1
        return True

    def release(self, address: str) -> None:
        self.open -= 1
        left = self._by_address.get(address, 1) - 1
        if left > 0:
            self._by_address[address] = left
        else:
            self._by_address.pop(address, None)

    def count(self, address: str) -> int:
        return self._by_address.get(address, 0)


class _Ticket:
    """One admitted connection: released once, whichever path closes it first."""

    __slots__ = ("_address", "_limits")

    def __init__(self, limits: ConnectionLimits | None, address: str) -> None:
        self._limits = limits
        self._address = address

    def release(self) -> None:
        if self._limits is not None:
            limits, self._limits = self._limits, None
            limits.release(self._address)


class _HeaderGuard(asyncio.Protocol):
    """aiohttp's protocol for one connection, with a deadline for the first request's headers.

    Everything is forwarded to the wrapped ``RequestHandler``; on the way, the bytes are
    scanned for the blank line that ends the first request's header block. If it has not
    arrived by the deadline the connection is aborted. Later requests are aiohttp's
    (``keepalive_timeout``). The connection's ticket is released when it is lost.
    """

    def __init__(self, inner: asyncio.Protocol, deadline: float, ticket: _Ticket,
                 extra: dict[str, Any] | None = None) -> None:
        self._inner = inner
        self._extra = extra  # a TLS connection terminated by a pump thread (fallback.tlspump)
        self._deadline = deadline
        self._ticket = ticket
        self._transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""
        self._started = False
        self.made = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
        if self._extra is not None:
            transport = TransportView(transport, self._extra)  # type: ignore[assignment]
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_at(self._deadline, self._expired)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            self._scan(data)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            self._inner.connection_lost(exc)
        finally:
            self._ticket.release()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _scan(self, data: bytes) -> None:
        buf = self._tail + data
        if not self._started:  # empty lines before the request line are allowed (RFC 9112 2.2)
            buf = buf.lstrip(b"\r\n")
            if not buf:
                return
            self._started = True
        if _HEADERS_END.search(buf):
            assert self._timer is not None
            self._timer.cancel()
            self._timer = None
            self._tail = b""
        else:
            self._tail = buf[-2:]

    def _expired(self) -> None:
        self._timer = None
        peer = self._transport.get_extra_info("peername") if self._transport else None
        log.debug("%s: no complete request headers in time; closing", peer)
        limited.warning("header-timeout", "closed a connection that sent no complete request "
                        "headers within the header timeout (first from %s)", _host(peer))
        if self._transport is not None:
            self._transport.abort()  # not close(): a TLS close would wait for the peer's reply


def _host(peer: Any) -> str:
    return str(peer[0]) if isinstance(peer, tuple) and peer else "?"


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
    is held at most *sniff_timeout* + *handshake_timeout*, and never longer than
    *header_timeout*).

    *plain* says whether plain HTTP is served: a site with an SSL context and
    ``plain=False`` is a TLS-only port (a connection whose first byte is not a
    TLS handshake gets ``HTTPS_ONLY_REPLY``, a 400 with a text body, and is closed); a site without an SSL context serves plain HTTP
    only. *limits*, shared by the sites of one daemon, bounds open connections
    per peer address and in total (None: unbounded). *header_timeout* bounds the
    time from accept to the end of the first request's headers.
    """

    __slots__ = (
        "_bound_port",
        "_conn_tasks",
        "_handshake_timeout",
        "_header_timeout",
        "_host",
        "_limits",
        "_max_pending",
        "_plain",
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
        plain: bool = True,
        header_timeout: float = HEADER_TIMEOUT,
        limits: ConnectionLimits | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        if not plain and ssl_context is None:
            raise ValueError("a site without TLS must serve plain HTTP")
        if header_timeout <= 0:
            raise ValueError("header_timeout must be positive")
        self._plain = plain
        self._header_timeout = header_timeout
        self._limits = limits
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
        # Advertise https when TLS is available: it is what clients should prefer.
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
                conn, addr = await loop.sock_accept(lsock)
            except (ConnectionAbortedError, InterruptedError):
                slots.release()  # the client gave up before we accepted
                continue
            except OSError as exc:
                slots.release()
                if exc.errno not in _RESOURCE_ERRNOS:
                    raise
                kind = errno.errorcode.get(exc.errno or 0, "accept")
                limited.warning(kind, "accept failed on %s: %s (%s); new connections wait in the "
                                "backlog, retrying every %gs", self.name, exc.strerror, kind,
                                _ACCEPT_RETRY_DELAY)
                await asyncio.sleep(_ACCEPT_RETRY_DELAY)
                continue
            except BaseException:
                slots.release()
                raise
            peer = _host(addr)
            if self._limits is not None and not self._limits.admit(peer):
                conn.close()
                slots.release()
                continue
            ticket = _Ticket(self._limits, peer)
            deadline = loop.time() + self._header_timeout
            task = loop.create_task(self._handle(conn, ticket, deadline))
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

    async def _handle(self, sock: socket.socket, ticket: _Ticket, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        handed_off = False
        guard: _HeaderGuard | None = None
        try:
            try:
                async with asyncio.timeout(min(self._sniff_timeout, deadline - loop.time())):
                    first = await self._peek(sock)
            except (TimeoutError, OSError):
                return
            if first is None:
                return
            server = self._runner.server
            if server is None:  # runner cleaned up while we waited
                return
            use_tls = first == TLS_HANDSHAKE_BYTE and self._ssl_context is not None
            if not use_tls and not self._plain:
                # A TLS-only port met plain text (an http:// URL): a short 400 that says so.
                await _refuse_plain(sock, min(HTTPS_ONLY_DRAIN, deadline - loop.time()))
                return
            pumped = None
            if use_tls and self._ssl_context is not None:
                # TLS runs in a thread of its own; the loop serves the plaintext as it serves
                # plain HTTP (why: fallback.tlspump). The thread owns ``sock`` from here.
                # Out of descriptors for the socketpair (it takes two): TLS on the loop.
                with contextlib.suppress(OSError):
                    pumped = start_pump(sock, self._ssl_context,
                                        min(deadline, loop.time() + self._handshake_timeout),
                                        loop)
            if pumped is not None:
                plain, extra = pumped
                handed_off = True
                guard = made = _HeaderGuard(server(), deadline, ticket, extra)
                try:
                    await loop.connect_accepted_socket(lambda: made, plain)
                except BaseException:
                    plain.close()  # the pump thread sees the end and closes the TCP socket
                    raise
                return
            guard = made = _HeaderGuard(server(), deadline, ticket)

            def factory() -> asyncio.Protocol:
                return made

            handed_off = True
            if use_tls:
                await loop.connect_accepted_socket(
                    factory,
                    sock,
                    ssl=self._ssl_context,
                    ssl_handshake_timeout=max(
                        0.001, min(self._handshake_timeout, deadline - loop.time())),
                )
            else:
                await loop.connect_accepted_socket(factory, sock)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Failed handshakes (scanners, wrong protocol, timeouts) are routine;
            # asyncio has already closed the transport and thus the socket.
            log.debug("connection setup failed: %r", exc)
        finally:
            if not handed_off:
                sock.close()
            if guard is None or not guard.made:  # else released when the connection is lost
                ticket.release()


HTTPS_ONLY_BODY = (b"This port speaks HTTPS only: use an https:// URL (same host and "
                   b"port).\n")
HTTPS_ONLY_REPLY = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    b"Connection: close\r\nContent-Length: " + str(len(HTTPS_ONLY_BODY)).encode()
                    + b"\r\n\r\n" + HTTPS_ONLY_BODY)
"""What a TLS-only port answers to plain HTTP, rather than an empty reply."""
HTTPS_ONLY_DRAIN = 1.0
"""Seconds (and at most 64 KiB) a refused plain-text request is read after the answer, so
closing with unread bytes does not reset the connection before the client reads it."""


async def _refuse_plain(sock: socket.socket, budget: float) -> None:
    """Answer ``HTTPS_ONLY_REPLY`` on a TLS-only port and close; bounded in time and bytes."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(max(0.001, budget)):
            await loop.sock_sendall(sock, HTTPS_ONLY_REPLY)
            sock.shutdown(socket.SHUT_WR)
            left = 65536
            while left > 0:
                data = await loop.sock_recv(sock, min(left, 16384))
                if not data:
                    break
                left -= len(data)
    except (TimeoutError, OSError):
        pass


def _set_ready(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
