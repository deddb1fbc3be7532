"""The client's TLS off its event loop: a thread per HTTPS connection (``fallback.tlspump``).

The daemon terminates TLS in a thread per connection; the client did it on its event
loop (aiohttp over asyncio's ``SSLProtocol``), where the same loop also parses the
HTTP chunks of every stream, feeds the hashing and writing workers and frames the
upload bodies. ``PumpedConnector`` connects as aiohttp would (its resolver, happy
eyeballs, ``sock_connect`` timeout), then runs the handshake in a worker thread with a
blocking ``ssl.SSLSocket`` and the very ``SSLContext`` aiohttp would have used (so
``--cacert``, the system CAs, ``--insecure`` and the hostname check are unchanged), and
hands the loop the plaintext end of an ``AF_UNIX`` socketpair, moved by a thread of
its own (``fallback.tlspump.move``). The transport aiohttp gets back answers
``ssl_object`` and ``peercert`` from the TLS socket, so ``aiohttp.Fingerprint`` (pinning,
``--fingerprint``, ``known_hosts``) checks the certificate exactly as before and raises
the same ``ServerFingerprintMismatch``; a refused chain raises the same
``ClientConnectorCertificateError``, other TLS errors ``ClientConnectorSSLError``.

Only direct connections are pumped: through a proxy (a CONNECT tunnel, then TLS on
it) aiohttp's own path is kept. Bounds: one thread per pooled HTTPS connection
(``streams + 4`` at most), 256 KiB of buffer each way.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import weakref
from collections.abc import Callable
from typing import Any

import aiohttp

from fallback.tlspump import TransportView, drain, move
from transport.http.client import StreamConnector

__all__ = ["PumpedConnector"]

log = logging.getLogger(__name__)


class PumpedConnector(StreamConnector):
    """A ``StreamConnector`` whose direct HTTPS connections have TLS in a thread."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tcp: weakref.WeakKeyDictionary[Any, socket.socket] = weakref.WeakKeyDictionary()
        self._live: set[ssl.SSLSocket] = set()  # TLS sockets whose thread still runs

    async def close(self, *, abort_ssl: bool = False) -> None:
        """Close the pool, then end every pumped TCP connection whose thread still runs
        with a FIN queued behind what it still has to send (``shutdown`` at the
        descriptor: the thread owns the TLS object; the thread then wakes, reads what is
        unread and closes). A thread blocked on a cut network would otherwise hold its
        socket until the process exits, and a close with unread bytes is a reset, which
        a cut network loses: the daemon would never learn that the stream is gone and
        would keep the session's targets (asyncio's TLS, which reads the socket
        whatever happens, closed with a FIN that the kernel retransmits)."""
        live = list(self._live)
        await super().close(abort_ssl=abort_ssl)
        for sock in live:
            try:
                socket.socket.shutdown(sock, socket.SHUT_WR)
            except (OSError, ValueError):  # closed meanwhile by its thread
                pass

    def stream_socket(self, conn: Any) -> Any:
        """The TCP socket under ``conn`` (``TCP_INFO`` for the governor): for a pumped
        connection the TLS socket, not the loop's end of the socketpair."""
        sock = self._tcp.get(conn.protocol) if conn.protocol is not None else None
        return sock if sock is not None else super().stream_socket(conn)

    async def _wrap_create_connection(self, *args: Any, addr_infos: Any, req: Any,
                                      timeout: aiohttp.ClientTimeout,
                                      client_error: type[Exception] = aiohttp.ClientConnectorError,
                                      **kwargs: Any) -> tuple[Any, Any]:
        context = kwargs.get("ssl")
        if not isinstance(context, ssl.SSLContext) or len(args) != 1:
            return await super()._wrap_create_connection(
                *args, addr_infos=addr_infos, req=req, timeout=timeout,
                client_error=client_error, **kwargs)
        # The TCP connection exactly as aiohttp makes it, without TLS on the loop.
        plain = {k: v for k, v in kwargs.items() if k not in ("ssl", "server_hostname")}
        transport, _ = await super()._wrap_create_connection(
            asyncio.Protocol, addr_infos=addr_infos, req=req, timeout=timeout,
            client_error=client_error, **plain)
        raw: socket.socket = transport.get_extra_info("socket").dup()
        transport.abort()  # the loop lets go of the socket; ``raw`` keeps the connection
        loop = asyncio.get_running_loop()
        budget = timeout.sock_connect or timeout.total or 60.0
        try:
            tls = await _in_thread(loop, raw, context, kwargs.get("server_hostname"), budget)
        except ssl.SSLCertVerificationError as exc:
            raise aiohttp.ClientConnectorCertificateError(req.connection_key, exc) from exc
        except ssl.SSLError as exc:
            raise aiohttp.ClientConnectorSSLError(req.connection_key, exc) from exc
        except OSError as exc:
            raise client_error(req.connection_key, exc) from exc
        # What aiohttp and callers may ask of the TLS object, read before the pump thread
        # owns it (an ``SSL`` object is not to be used from two threads at once).
        seen = Handshake(tls)
        extra = {"ssl_object": seen, "peercert": seen.getpeercert(), "sslcontext": context,
                 "cipher": seen.cipher(), "compression": None, "socket": tls,
                 "peername": tls.getpeername(), "sockname": tls.getsockname()}
        ours, theirs = socket.socketpair()
        try:
            self._live.add(tls)
            threading.Thread(target=_pump, args=(tls, ours, self._live.discard), daemon=True,
                             name="fallback-tls-client").start()
        except RuntimeError as exc:
            self._live.discard(tls)
            for s in (ours, theirs, tls):
                s.close()
            raise client_error(req.connection_key, OSError(f"no TLS thread: {exc}")) from None
        inner, proto = await loop.create_connection(args[0], sock=theirs)
        self._tcp[proto] = tls
        return TransportView(inner, extra), proto


class Handshake:
    """The facts of a finished handshake, as ``ssl.SSLObject`` answers them
    (``getpeercert``, also in binary form for ``aiohttp.Fingerprint``; ``cipher``,
    ``version``, ``selected_alpn_protocol``), read once in the loop's thread."""

    __slots__ = ("_alpn", "_cert", "_cert_der", "_cipher", "_version")

    def __init__(self, tls: ssl.SSLSocket) -> None:
        self._cert = tls.getpeercert()
        self._cert_der = tls.getpeercert(binary_form=True)
        self._cipher = tls.cipher()
        self._version = tls.version()
        self._alpn = tls.selected_alpn_protocol()

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._cert_der if binary_form else self._cert

    def cipher(self) -> tuple[str, str, int] | None:
        return self._cipher

    def version(self) -> str | None:
        return self._version

    def selected_alpn_protocol(self) -> str | None:
        return self._alpn


async def _in_thread(loop: asyncio.AbstractEventLoop, raw: socket.socket,
                     context: ssl.SSLContext, hostname: str | None,
                     budget: float) -> ssl.SSLSocket:
    """``_handshake`` in a thread of its own (the default executor may be busy with the
    transfer's hashing and writing)."""
    done: asyncio.Future[ssl.SSLSocket] = loop.create_future()

    def settle(result: ssl.SSLSocket | None, exc: BaseException | None) -> None:
        if done.cancelled():
            if result is not None:
                result.close()
        elif exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            tls = _handshake(raw, context, hostname, budget)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop
            loop.call_soon_threadsafe(settle, None, exc)
            return
        try:
            loop.call_soon_threadsafe(settle, tls, None)
        except RuntimeError:  # the loop is closed
            tls.close()

    threading.Thread(target=run, daemon=True, name="fallback-tls-handshake").start()
    return await done


def _handshake(raw: socket.socket, context: ssl.SSLContext, hostname: str | None,
               budget: float) -> ssl.SSLSocket:
    """A blocking TLS handshake on ``raw`` within ``budget`` seconds; closes ``raw`` when
    it fails."""
    try:
        raw.setblocking(True)
        if raw.family in (socket.AF_INET, socket.AF_INET6):
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.settimeout(budget)
        tls = context.wrap_socket(raw, server_hostname=hostname,
                                  do_handshake_on_connect=False)
        tls.do_handshake()
        tls.settimeout(None)
        return tls
    except BaseException:
        raw.close()
        raise


def _pump(tls: ssl.SSLSocket, inner: socket.socket,
          ended: Callable[[ssl.SSLSocket], None]) -> None:
    try:
        tls.setblocking(False)
        inner.setblocking(False)
        move(tls, inner)
    except (OSError, ValueError) as exc:
        log.debug("TLS connection ended: %r", exc)
    finally:
        drain(tls)  # unread bytes at close would make the kernel send a reset, not a FIN
        ended(tls)
        for s in (tls, inner):
            try:
                s.close()
            except OSError:
                pass
