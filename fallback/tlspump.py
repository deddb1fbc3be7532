"""TLS off the event loop: one thread per TLS connection, plaintext to aiohttp over a socketpair.

Why (issue 11 section 4, measured on this machine, 2 shared vCPUs, 1 GiB received over
TLS on loopback, CPU of the receiving thread): uvloop's ``SSLProtocol`` on the event
loop took 1.9 s/GiB (median of 4; 0.8-2.5), a blocking ``ssl.SSLSocket`` reading into a
reused buffer in a thread 0.83 s/GiB (0.82-1.15), and OpenSSL releases the GIL while it
encrypts and decrypts. The daemon's event loop already parses HTTP, runs the routes
and feeds the worker threads; with TLS on it too it is the limit of an HTTPS stream
(HTTPS moved at about half the HTTP rate, while nginx/curl lose little to TLS). So a
TLS connection is terminated by a thread of its own, which hands the plaintext to the
loop through an ``AF_UNIX`` socketpair: the loop then serves it exactly as a plain HTTP
connection (two kernel copies of the plaintext, cheaper than the TLS record handling
they replace), and the encryption runs on the other core.

The alternatives: worker processes with ``SO_REUSEPORT`` would split one daemon's
sessions (their schedulers, sinks and leases live in one process) across processes;
kTLS (``ssl.OP_ENABLE_KTLS``) needs Python 3.12 and the kernel's ``tls`` module, and
this kernel offers none (``/proc/sys/net/ipv4/tcp_available_ulp``: ``mptcp``), so it
could only be an optional extra, and it too needs a blocking ``SSLSocket``.

Bounds: one thread per admitted TLS connection (``ConnectionLimits`` caps them), a
256 KiB buffer each way; the handshake must finish within the connection's header
deadline; a thread ends when either side closes, errs or the loop's end is aborted.
"""

from __future__ import annotations

import asyncio
import logging
import selectors
import socket
import ssl
import threading
from typing import Any

__all__ = ["TransportView", "drain", "move", "start_pump"]

log = logging.getLogger(__name__)

BUFFER = 256 << 10
"""Bytes moved per read in each direction (the size asyncio reads a socket with)."""


class TransportView:
    """The loop's transport of a pumped connection, as aiohttp sees it: everything is the
    socketpair's transport's, except the extra info of the TLS connection (``peername``,
    ``sockname``, ``sslcontext``), so ``request.remote``, ``request.secure`` and the
    daemon's ``https`` scheme are what they would be with TLS on the loop."""

    def __init__(self, inner: Any, extra: dict[str, Any]) -> None:
        self._inner = inner
        self._extra = extra

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self._extra:
            return self._extra[name]
        return self._inner.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def start_pump(raw: socket.socket, context: ssl.SSLContext, deadline: float,
               loop: asyncio.AbstractEventLoop) -> tuple[socket.socket, dict[str, Any]]:
    """Hand ``raw`` (an accepted TCP socket whose first byte is a TLS handshake) to a new
    thread that terminates TLS; returns (the loop's end of the socketpair, the extra info
    for ``TransportView``). ``deadline`` is in ``loop.time()`` seconds: the handshake must
    end by then. The thread owns ``raw`` from now on. ``OSError`` if the peer is gone, or
    no socketpair (two descriptors) or thread could be had: ``raw`` is then still the
    caller's, who serves it with TLS on the loop."""
    extra = {"peername": raw.getpeername(), "sockname": raw.getsockname(),
             "sslcontext": context}
    ours, theirs = socket.socketpair()
    timeout = max(0.001, deadline - loop.time())
    try:
        threading.Thread(target=_pump, args=(raw, context, ours, timeout), daemon=True,
                         name="fallback-tls").start()
    except RuntimeError as exc:  # no thread could be started
        ours.close()
        theirs.close()
        raise OSError(f"cannot start a TLS thread: {exc}") from None
    return theirs, extra


def _pump(raw: socket.socket, context: ssl.SSLContext, inner: socket.socket,
          timeout: float) -> None:
    tls: ssl.SSLSocket | None = None
    try:
        raw.settimeout(timeout)
        tls = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        tls.do_handshake()
        tls.setblocking(False)
        inner.setblocking(False)
        move(tls, inner)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; a reset, a timeout
        log.debug("TLS connection ended: %r", exc)
    finally:
        drain(tls if tls is not None else raw)  # wrap_socket detached ``raw``
        for s in (tls, raw, inner):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass


def drain(sock: socket.socket) -> None:
    """Read what the peer sent and nobody will read (a garbage handshake, a late
    close_notify): closing a socket with unread bytes makes the kernel answer with a
    reset instead of a clean end (RFC 1122 4.2.2.13), which the peer sees as an error."""
    try:
        socket.socket.setblocking(sock, False)
        for _ in range(64):  # bounded: a peer that keeps sending gets the reset
            if not socket.socket.recv(sock, BUFFER):  # the raw bytes, below any TLS
                break
    except OSError:
        pass


def move(tls: ssl.SSLSocket, inner: socket.socket) -> None:
    """Move bytes both ways until the loop's end closes (or both ends have closed)."""
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    up: memoryview = view[:0]  # decrypted, not yet given to the loop
    down: memoryview = memoryview(b"")  # from the loop, not yet encrypted and sent
    tls_eof = inner_eof = shut = False
    send_wants_read = False
    sel = selectors.DefaultSelector()
    try:
        while True:
            moved = False
            if not up and not tls_eof:
                filled = 0
                try:
                    while filled < BUFFER - (16 << 10):  # a TLS record holds at most 16 KiB
                        n = tls.recv_into(view[filled:])
                        if n == 0:
                            tls_eof = True
                            break
                        filled += n
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                except ssl.SSLZeroReturnError:
                    tls_eof = True
                if filled:
                    up = view[:filled]
                    moved = True
            if up:
                try:
                    n = inner.send(up)
                    up = up[n:]
                    moved = True
                except BlockingIOError:
                    pass
            if tls_eof and not up and not shut:
                # The loop sees the client's EOF once it has every byte read before it (the
                # last read may have brought both: shutting down only when a read found
                # nothing left a killed client's stream open on the daemon for ever).
                inner.shutdown(socket.SHUT_WR)
                shut = True
            if not down and not inner_eof:
                try:
                    data = inner.recv(BUFFER)
                    if data:
                        down = memoryview(data)
                    else:
                        inner_eof = True
                    moved = True
                except BlockingIOError:
                    pass
            if down:
                try:
                    n = tls.send(down)
                    down = down[n:]
                    send_wants_read = False
                    moved = True
                except ssl.SSLWantWriteError:
                    pass
                except ssl.SSLWantReadError:
                    send_wants_read = True
            if inner_eof and not down:
                return  # the loop closed the connection; everything it wrote is sent
            if moved:
                continue
            tls_events = 0
            if (not up and not tls_eof) or send_wants_read:
                tls_events |= selectors.EVENT_READ
            if down:
                tls_events |= selectors.EVENT_WRITE
            inner_events = (selectors.EVENT_WRITE if up else 0) | \
                (selectors.EVENT_READ if not down and not inner_eof else 0)
            _watch(sel, tls, tls_events)
            _watch(sel, inner, inner_events)
            if not tls_events and not inner_events:
                return
            sel.select()
    finally:
        sel.close()


def _watch(sel: selectors.BaseSelector, sock: socket.socket, events: int) -> None:
    try:
        key = sel.get_key(sock)
    except KeyError:
        if events:
            sel.register(sock, events)
        return
    if not events:
        sel.unregister(sock)
    elif key.events != events:
        sel.modify(sock, events)
