"""Addressing a daemon: URLs, credentials, TLS choice, the control calls.

``Remote`` wraps one aiohttp ``ClientSession`` to one daemon and speaks the
control API (JSON over HTTP(S)); the block streams themselves are
``transport.http.client``. Errors are translated here into
``transport.errors`` so the engine above handles one family.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aiohttp

from fallback import jsonbody, known_hosts
from fallback.clienttls import PumpedConnector
from fallback.errors import UdpUnavailable, UsageError
from fallback.known_hosts import CertificateChanged, CertificateNotTrusted, KnownHost
from fallback.proxy import Proxy, proxy_for
from fallback.tls import client_ssl, format_fingerprint
from transport.errors import (
    ConnectError,
    ConnectionLost,
    ErrorKind,
    ProtocolError,
    RemoteError,
    TransportError,
)
from transport.http.client import (
    SSLArg,
    describe,
    read_error,
    refuse_redirect,
    remote_error,
)
from transport.http.client import read_bounded as _read_bounded

log = logging.getLogger("fallback.client")
PREFIX = "/.fallback/v1"
DEFAULT_PORTS = {"http": 8080, "https": 8443}


@dataclass(frozen=True, slots=True)
class Url:
    """A parsed ``http(s)://[user[:password]@]host[:port]/path``."""

    scheme: str
    host: str
    port: int
    path: str  # decoded, always starting with '/'
    user: str | None
    password: str | None

    @property
    def into_dir(self) -> bool:
        return self.path.endswith("/")

    def base(self, scheme: str | None = None, port: int | None = None) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme or self.scheme}://{host}:{port or self.port}"


_URLISH = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(s: str) -> bool:
    """True for anything shaped like ``scheme://``: ``parse_url`` then names a wrong scheme
    (``ftp://``, ``HTTP://``) instead of the path being taken for a local file."""
    return _URLISH.match(s) is not None


_USERINFO_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:?#]*):[^/@]*@")


def redacted(s: str) -> str:
    """``s`` with a URL's password replaced by ``***`` (``https://u:***@host/``), for
    messages and logs: an error must not print the password a user put in a URL (CI
    logs keep them). Anything else is returned as it is."""
    return _USERINFO_PASSWORD.sub(r"\1:***@", s)


def parse_url(s: str) -> Url:
    """Split ``http(s)://[user[:password]@]host[:port]/path``; raises ``UsageError``.

    The path is percent-decoded as file names are carried (PEP 383
    ``surrogateescape`` for escapes that are not UTF-8, see ``fallback.paths``).
    A raw ``?`` or ``#`` is refused: a URL parser takes what follows for a query
    or a fragment, so ``/hs/report#2.txt`` would name ``/hs/report``; the hint
    says to write ``%3F`` and ``%23`` (RFC 3986 section 3.3: a path ends at the
    first ``?`` or ``#``).
    """
    shown = redacted(s)
    try:
        u = urlsplit(s)
        port = u.port
    except ValueError as exc:
        raise UsageError(f"bad URL {shown!r}: {redacted(str(exc))}") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise UsageError(f"bad URL {shown!r}: expected http(s)://[user@]host[:port]/path")
    for raw, code in (("?", "%3F"), ("#", "%23")):
        if raw in s:
            raise UsageError(f"bad URL {shown!r}: a raw {raw!r} would end the path there "
                             f"(it starts a URL {'query' if raw == '?' else 'fragment'}); "
                             f"write it as {code}")
    path = unquote(u.path, errors="surrogateescape") or "/"
    if "\x00" in path:
        raise UsageError(f"bad URL {shown!r}: the path contains a NUL byte (%00)")
    return Url(
        scheme=u.scheme,
        host=u.hostname,
        port=port or DEFAULT_PORTS[u.scheme],
        path=path,
        user=unquote(u.username) if u.username else None,
        password=unquote(u.password) if u.password else None,
    )


@dataclass(frozen=True, slots=True)
class Route:
    """One way to a daemon: a scheme and port, the TLS trust for it, the proxy if any."""

    scheme: str
    port: int
    ssl: Any  # aiohttp's ssl= (True for plain HTTP)
    known: KnownHost | None  # the remembered certificate pinned for it
    proxy: Proxy | None

    def base(self, url: Url) -> str:
        return url.base(self.scheme, self.port)


class Router:
    """Finds a route to one daemon: the URL's scheme first, then (``--transport auto``,
    not ``--no-fallback``) the daemon's other scheme, each through its proxy if any
    (``fallback.proxy``). A route counts as unreachable only when no connection could
    be made (refused, timed out, no route; a proxy that cannot reach the daemon): a
    certificate that is not trusted is an error, never a reason to try plain HTTP."""

    def __init__(self, url: Url, ssl: Any, explicit_trust: bool, *, proxy: str | None,
                 fallback: bool, fallback_port: int | None, connect_timeout: float) -> None:
        self.url = url
        self.ssl = ssl
        self.explicit_trust = explicit_trust
        self.proxy = proxy
        self.fallback = fallback
        self.fallback_port = fallback_port
        self.connect_timeout = connect_timeout

    def route(self, scheme: str, port: int) -> Route:
        """The route over ``scheme`` to ``port``: with a certificate remembered for it in
        ``fallback.known_hosts`` pinned (no ``--cacert``/``--fingerprint``/``--insecure``)."""
        proxy = proxy_for(scheme, self.url.host, self.proxy)
        if scheme != "https":
            return Route(scheme, port, True, None, proxy)
        known = None if self.explicit_trust else known_hosts.lookup(self.url.host, port)
        if known is None:
            return Route(scheme, port, self.ssl, None, proxy)
        log.info("certificate of %s pinned from %s:%d", known.key, known.path, known.line)
        return Route(scheme, port, client_ssl(None, known.fingerprint, False), known, proxy)

    def candidates(self, info: dict[str, Any] | None = None) -> list[Route]:
        """The routes to try, in order. ``info``: the daemon's ``/info`` when known (its
        ports and enabled schemes); else the other scheme's port is ``fallback_port``,
        or its default (8080, 8443) when the URL's port is its own scheme's default."""
        out = [self.route(self.url.scheme, self.url.port)]
        if not self.fallback:
            return out
        other = "http" if self.url.scheme == "https" else "https"
        if info is not None:
            port = info.get(f"{other}_port")
            if info.get(f"enable_{other}") and isinstance(port, int) and 0 < port < 65536:
                out.append(self.route(other, port))
            return out
        if self.fallback_port is not None:
            out.append(self.route(other, self.fallback_port))
        elif self.url.port == DEFAULT_PORTS[self.url.scheme]:
            # Only a URL on its scheme's default port suggests the daemon uses the defaults:
            # the password never goes to a guessed port beside a port the user named.
            out.append(self.route(other, DEFAULT_PORTS[other]))
        return out

    async def find(self, info: dict[str, Any] | None = None
                   ) -> tuple[Route, dict[str, Any], str]:
        """The first route whose ``/info`` answers, that answer, and why it was chosen.
        ``ConnectError`` naming every route tried when none answers."""
        failures: list[tuple[Route, TransportError]] = []
        for route in self.candidates(info):
            try:
                got = await _info(self.url, route, self.connect_timeout)
            except ConnectError as exc:
                log.info("%s", exc.message)
                failures.append((route, exc))
                continue
            except TransportError as exc:
                # The fallback's port answers, but not as a fallback daemon (another service,
                # a proxy's refusal...): the URL's own failure is what to report. Certificate
                # errors are not passed over: the user must see those.
                if not failures or isinstance(exc, CertificateNotTrusted | CertificateChanged) \
                        or isinstance(exc, ProxyRefused) or exc.kind is ErrorKind.UNTRUSTED:
                    raise
                log.info("%s: %s", route.base(self.url), exc.message)
                failures.append((route, exc))
                continue
            if not failures:
                why = f"the URL says {route.scheme}://"
            else:
                first = failures[0][0]
                why = (f"{first.scheme} on port {first.port} cannot be reached "
                       f"({_short(failures[0][1].message)}); the daemon answers "
                       f"{route.scheme} on port {route.port}")
                log.warning("%s%s", why, ": plain HTTP, neither the password nor the data "
                            "is encrypted (--no-fallback refuses)"
                            if route.scheme == "http" else "")
            return route, got, why + via(route)
        if len(failures) == 1 or not isinstance(failures[1][1], ConnectError):
            raise failures[0][1]
        raise ConnectError("cannot reach the daemon: " + "; ".join(
            f"{r.base(self.url)}: {_short(e.message)}" for r, e in failures))


def via(route: Route) -> str:
    """``; through the proxy ...`` for a reason, when ``route`` goes through one."""
    if route.proxy is None:
        return ""
    return (f"; through the proxy {route.proxy.shown} (from {route.proxy.source}), "
            "which carries no UDP")


def _short(message: str) -> str:
    """An error message without the ``cannot reach BASE:`` it starts with."""
    head, sep, tail = message.partition(": ")
    return tail if sep and head.startswith("cannot reach") else message


class Remote:
    """One daemon, reached over HTTP or HTTPS, with Basic then session-token auth."""

    def __init__(self, url: Url, *, user: str, password: str, route: Route, streams: int,
                 features: frozenset[str] = frozenset(), router: Router | None = None,
                 info: dict[str, Any] | None = None, reason: str = "",
                 connect_timeout: float = 15.0) -> None:
        self.url = url
        self.features = features
        """What the daemon's ``/info`` says it supports beyond API 1 (``keepalive``, ``acks``,
        ``frames2``): the client uses a newer call only with a daemon that has it."""
        self.user = user
        self._password = password
        self.route = route
        self.router = router
        self.info = info or {}
        self.reason = reason
        """Why this scheme and port (``transport_reason`` in the result)."""
        self.ssl: SSLArg = route.ssl if route.scheme == "https" else True
        self.scheme = route.scheme
        self.port = route.port
        self.known = route.known  # the remembered certificate pinned for this daemon, if any
        self.proxy = route.proxy
        self.base = url.base(route.scheme, route.port)
        # StreamConnector: upload streams see their socket (TCP_INFO for --policy fair/low)
        # PumpedConnector: TLS in a thread per connection, off the loop (fallback.clienttls)
        connector = PumpedConnector(limit=streams + 4, force_close=False)
        # sock_connect, not connect: a control call waiting for a pooled connection while
        # the streams hold them all is not a connect that failed.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout,
                                        sock_read=120)
        # A 1 MiB read buffer (aiohttp's default is 64 KiB) lets a 4 MiB block
        # arrive without dozens of pause/resume round trips on the socket.
        self.http = aiohttp.ClientSession(connector=connector, timeout=timeout,
                                          auto_decompress=False, read_bufsize=1 << 20,
                                          proxy=route.proxy.url if route.proxy else None)
        self.sid: str | None = None
        self.token: str | None = None
        self.last_call = time.monotonic()  # when the latest control call started

    @property
    def no_udp(self) -> str | None:
        """Why UDP cannot be tried on this route (a proxy carries none), or None."""
        if self.proxy is None:
            return None
        return f"through the proxy {self.proxy.address}: a proxy carries no UDP"

    @classmethod
    async def connect(cls, url: Url, *, transport: str, user: str | None, password: str | None,
                      cacert: str | None, fingerprint: str | None, insecure: bool,
                      streams: int, proxy: str | None = None, fallback: bool = True,
                      fallback_port: int | None = None, connect_timeout: float = 15.0,
                      known_info: dict[str, Any] | None = None) -> Remote:
        """Pick the scheme and the trust, check the daemon answers, return a ``Remote``.

        The scheme is the URL's: ``auto`` never turns an ``http://`` URL into HTTPS
        (an ``http://`` URL means HTTP, as for curl) unless that cannot be reached:
        then (``fallback``) the daemon's other scheme, on ``fallback_port`` or its
        default port (``Router``), and the result's reason says so. ``--transport
        https`` or ``http`` switches to the daemon's port for that scheme (from its
        ``/info``), says so on the ``fallback.client`` logger and never falls back.
        Credentials: ``fallback.credentials``. Without ``cacert``/``fingerprint``/
        ``insecure``, a certificate remembered in ``fallback.known_hosts`` for the
        HTTPS ``host:port`` is pinned. ``proxy``: ``fallback.proxy.proxy_for``.
        ``known_info``: the daemon's ``/info`` from an earlier attempt (its ports for the
        other scheme).
        """
        from fallback.credentials import resolve

        creds = resolve(url.host, user or url.user, url.password, explicit=password)
        name = creds.user
        if not name:
            raise UsageError("no user name: put it in the URL (https://USER@host/...) or use --user")
        pw = creds.password
        if pw is None:
            raise UsageError("no password: set FALLBACK_PASSWORD, put it in the URL, in "
                             "~/.netrc or (CLI) in --password-file")
        if creds.source != "argument":
            log.debug("password from %s", creds.source)
        if insecure:
            warnings.warn("--insecure: the server certificate is not verified", stacklevel=2)
        from pathlib import Path

        try:
            ssl = client_ssl(Path(cacert) if cacert else None, fingerprint, insecure)
        except ValueError as exc:  # options combined, or a malformed fingerprint
            msg = str(exc)
            if "mutually exclusive" in msg:
                msg = "--cacert, --fingerprint and --insecure are mutually exclusive: give one"
            raise UsageError(msg) from None
        except OSError as exc:  # missing/unreadable --cacert, or no certificate in it
            why = exc.strerror or getattr(exc, "reason", None) or exc
            raise UsageError(f"--cacert {cacert}: cannot load CA certificate: {why}") from None
        explicit = cacert is not None or fingerprint is not None or insecure
        router = Router(url, ssl, explicit, proxy=proxy,
                        fallback=fallback and transport == "auto",
                        fallback_port=fallback_port, connect_timeout=connect_timeout)
        route, info, why = await router.find(known_info)
        if transport in ("auto", "udp"):  # udp: the control channel is the URL's scheme
            if route.scheme == "http" and url.scheme == "http" and info.get("enable_https"):
                log.info("the daemon also offers HTTPS on port %s: --transport https",
                         info.get("https_port"))
            log.info("transport %s: %s", route.scheme, why)
        elif transport != url.scheme:
            key = f"enable_{transport}"
            if not info.get(key):
                what = "HTTPS" if transport == "https" else "plain HTTP"
                raise TransportError(f"the daemon does not offer {what}", kind=ErrorKind.BAD_REQUEST)
            route = router.route(transport, _port(info, f"{transport}_port", url))
            log.warning("switching %s to %s (--transport %s)", url.base(),
                        route.base(url), transport)
            why = f"--transport {transport} (the daemon's port for it)" + via(route)
        else:
            why = f"--transport {transport}" + via(route)
            log.info("transport %s: %s", route.scheme, why)
        raw = info.get("features")
        features = frozenset(f for f in raw if isinstance(f, str)) if isinstance(raw, list) \
            else frozenset()
        if transport == "udp" and not info.get("udp"):
            raise UdpUnavailable("UDP: the daemon offers no UDP path (disabled, or its port "
                               "could not be bound); use --transport auto or https")
        return cls(url, user=name, password=pw, route=route, streams=streams, features=features,
                   router=router, info=info, reason=why, connect_timeout=connect_timeout)

    # -- control calls --------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        if self.token:
            return {"Authorization": f"Bearer {self.token}"}
        return {"Authorization": _basic(self.user, self._password)}

    @property
    def stream_headers(self) -> dict[str, str]:
        return self._headers()

    def session_url(self, tail: str = "") -> str:
        return f"{self.base}{PREFIX}/session/{self.sid}{tail}"

    async def call(self, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
        self.last_call = time.monotonic()
        try:
            data = jsonbody.encode(body or {})  # long lists a slice at a time (``Items``)
            async with self.http.request(method, url, data=data, headers={
                    **self._headers(), "Content-Type": "application/json"},
                    ssl=self.ssl, allow_redirects=False) as resp:
                if resp.status == 407:  # a forwarding proxy refused (HTTP; CONNECT raises)
                    raise proxy_refused(self.proxy)
                refuse_redirect(resp, self.base)
                if resp.status != 200:
                    raw = await read_error(resp)
                    log.debug("%s %s: %d, %d bytes", method, url, resp.status, len(raw))
                    raise remote_error(resp, raw)
                raw = await read_bounded(resp, self.base)
                log.debug("%s %s: %d, %d bytes", method, url, resp.status, len(raw))
                return parse_answer(raw, self.base)
        except TransportError:
            raise
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ServerFingerprintMismatch) as exc:
            raise await _tls_error(exc, self.url.host, self.port, self.known,
                                   self.proxy) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise net_error(exc, self.base, self.proxy) from None

    async def open(self, body: dict[str, Any]) -> dict[str, Any]:
        out = await self.call("POST", f"{self.base}{PREFIX}/session", body)
        if not isinstance(out, dict):
            raise ProtocolError(f"{self.base}: the session answer is not a JSON object")
        sid, token = out.get("id"), out.get("token")
        # Both go into later requests (the URL path, the Authorization header).
        if not isinstance(sid, str) or not _SESSION_ID.fullmatch(sid) \
                or not isinstance(token, str) or not _TOKEN.fullmatch(token):
            raise ProtocolError(f"{self.base}: the session answer has no valid id and token")
        self.sid, self.token = sid, token
        return out

    async def close(self, error: str | None = None, timeout: float | None = None
                    ) -> dict[str, Any] | None:
        """End the session (``DELETE``), waiting at most ``timeout`` seconds for the daemon
        (a cut network must not hold the client up), then release the connections.
        Returns the daemon's answer (a download's UDP figures are in it), None if none."""
        answer: dict[str, Any] | None = None
        if self.sid and self.token:
            try:
                out = await asyncio.wait_for(
                    self.call("DELETE", self.session_url(), {"error": error}), timeout)
                answer = out if isinstance(out, dict) else None
            except (TransportError, TimeoutError):
                pass
        await self.http.close()
        return answer

    async def end_earlier(self, sid: str, token: str, error: str, timeout: float) -> None:
        """End an earlier session of this transfer that an outage cut off, over this
        route (it may be the other scheme): the daemon releases its targets and journals
        at once instead of keeping them until it notices its streams are dead. Errors
        are ignored (a restarted daemon no longer knows it)."""
        url = f"{self.base}{PREFIX}/session/{sid}"
        try:
            async with asyncio.timeout(timeout):
                async with self.http.delete(url, json={"error": error}, ssl=self.ssl,
                                            headers={"Authorization": f"Bearer {token}"},
                                            allow_redirects=False) as resp:
                    log.debug("ended the earlier session %s: HTTP %d", sid[:8], resp.status)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.debug("ending the earlier session %s: %s", sid[:8], describe(exc))


async def _info(url: Url, route: Route, connect_timeout: float) -> dict[str, Any]:
    """The daemon's public facts (ports, enabled schemes) over ``route``: no auth needed.
    ``ConnectError`` when no connection could be made."""
    base = route.base(url)
    timeout = aiohttp.ClientTimeout(total=15 + connect_timeout, sock_connect=connect_timeout)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.get(f"{base}{PREFIX}/info", allow_redirects=False,
                                ssl=route.ssl if route.scheme == "https" else True,
                                proxy=route.proxy.url if route.proxy else None) as resp:
                if resp.status == 407:
                    raise proxy_refused(route.proxy)
                if resp.status in (502, 503, 504) and route.proxy is not None:
                    raise ConnectError(f"cannot reach {base}: the proxy {route.proxy.address} "
                                       f"answered HTTP {resp.status}")
                refuse_redirect(resp, base)
                if resp.status == 400 and route.scheme == "http" and "HTTPS" in (
                        await resp.content.read(512)).decode(errors="replace"):
                    raise ConnectError(f"port {route.port} speaks HTTPS only: use "
                                       f"https://{url.host}:{route.port}{url.path}")
                if resp.status != 200:
                    raise RemoteError(f"{base} is not a fallback daemon (HTTP {resp.status})",
                                      peer_status=resp.status)
                info = parse_answer(await read_bounded(resp, base), base)
                if not isinstance(info, dict):
                    raise ProtocolError(f"{base} is not a fallback daemon (bad /info answer)")
                return info
    except TransportError:
        raise
    except TLS_REFUSALS as exc:
        raise await _tls_error(exc, url.host, route.port, route.known, route.proxy) from None
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
        raise unreachable(url, route, exc) from None


TLS_REFUSALS = (aiohttp.ClientConnectorCertificateError, aiohttp.ServerFingerprintMismatch)
"""A certificate not accepted: reported by ``_tls_error`` with what the daemon presented
(an async look-up, so not an entry of a mapping)."""

PLAIN_HTTP_REPLIES = ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG",
                      "RECORD_LAYER_FAILURE", "UNKNOWN_PROTOCOL")
"""OpenSSL reasons for a TLS hello answered in plain text (an HTTP server's reply)."""


def unreachable(url: Url, route: Route, exc: BaseException) -> TransportError:
    """The first contact over ``route`` failed: say which port and what to do (a closed
    port, an ``https://`` URL aimed at a plain-HTTP port, an ``http://`` one at a TLS-only
    port); through a proxy, or otherwise, as ``net_error`` (``ConnectError`` when no
    connection was made: the ``Router`` then tries the next route)."""
    import ssl as _ssl

    base = route.base(url)
    if route.proxy is not None:
        return net_error(exc, base, route.proxy)
    where = f"port {route.port} of {url.host}"
    inner = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    if isinstance(inner, ConnectionRefusedError):
        return ConnectError(f"{where}: connection refused (nothing listens there: is the "
                            f"daemon running, and is {route.port} its port?)")
    if route.scheme == "https" and isinstance(inner, _ssl.SSLError) \
            and (inner.reason or "") in PLAIN_HTTP_REPLIES:
        return ConnectError(f"port {route.port} speaks plain HTTP: use "
                            f"http://{url.host}:{route.port}{url.path}")
    if route.scheme == "http" and isinstance(exc, aiohttp.ServerDisconnectedError):
        return ConnectionLost(f"{where} closed the connection without an answer (an "
                              f"HTTPS-only port? try https://{url.host}:{route.port}{url.path})")
    if isinstance(exc, ValueError):
        return ConnectionLost(f"cannot reach {base}: {describe(exc)}")
    return net_error(exc, base, None)


class ProxyRefused(RemoteError):
    """The proxy refused our credentials, or wanted some (407, RFC 9110 section 15.5.8).
    The CLI exits with the code of a refused login (3)."""


def proxy_refused(proxy: Proxy | None) -> ProxyRefused:
    where = proxy.address if proxy is not None else "the proxy"
    what = "refused the credentials in the proxy URL" if proxy is not None \
        and proxy.authenticated else "asks for credentials"
    return ProxyRefused(f"the proxy {where} {what} (HTTP 407 Proxy Authentication Required): "
                        "give http://USER:PASSWORD@host:port in --proxy or "
                        f"{proxy.source if proxy is not None else 'HTTPS_PROXY'}", peer_status=407)


def net_error(exc: BaseException, base: str, proxy: Proxy | None) -> TransportError:
    """The transport error for an aiohttp or socket error on the way to ``base``:
    ``ConnectError`` when no connection was made (the daemon or the proxy refused,
    timed out, no route; the proxy could not reach the daemon), ``ProxyRefused`` for
    a proxy's 407, else ``ConnectionLost``."""
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        if exc.status == 407:
            return proxy_refused(proxy)
        return ConnectError(f"cannot reach {base}: the proxy "
                            f"{proxy.address if proxy else ''} answered HTTP {exc.status} "
                            "to CONNECT")
    if isinstance(exc, aiohttp.ClientProxyConnectionError) or (
            proxy is not None and isinstance(exc, aiohttp.ClientConnectorError)
            and exc.host == urlsplit(proxy.address).hostname):  # the proxy's name unknown
        return ConnectError(f"cannot reach the proxy {proxy.address if proxy else ''}: "
                            f"{describe(exc)}")
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return ConnectError(f"cannot reach {base}: {describe(exc)}")
    return ConnectionLost(f"cannot reach {base}: {describe(exc)}")


MAX_ANSWER = 64 << 20
"""Largest control answer the client reads, in bytes: the daemon's own cap on a
control request (``fallback.server.MAX_CONTROL_BODY``). A download's manifest
is one answer, so a folder of up to about 500,000 entries can be downloaded."""

_SESSION_ID = re.compile(r"[0-9A-Za-z_-]{1,128}")
_TOKEN = re.compile(r"[0-9A-Za-z_.~+/=-]{1,512}")


async def read_bounded(resp: aiohttp.ClientResponse, base: str, limit: int = MAX_ANSWER) -> bytes:
    """A control answer's body, refusing (``ProtocolError``) more than ``limit`` bytes
    (``transport.http.client.read_bounded``, its message naming ``base``)."""
    try:
        return await _read_bounded(resp, limit)
    except ProtocolError as exc:
        raise ProtocolError(f"{base}: {exc.message}") from None


def parse_answer(raw: bytes, base: str) -> Any:
    """JSON of a control answer; ``ProtocolError`` when it is not JSON."""
    try:
        return json.loads(raw)
    except ValueError:  # UnicodeDecodeError included
        raise ProtocolError(f"{base}: the daemon's answer is not valid JSON") from None
    except RecursionError:
        raise ProtocolError(f"{base}: the daemon's answer is nested too deeply") from None


async def _tls_error(exc: aiohttp.ClientError, host: str, port: int,
                     known: KnownHost | None, proxy: Proxy | None = None) -> TransportError:
    """The error for a certificate that was not accepted, with what the daemon presented
    (read through ``proxy`` when the daemon is reached through one)."""
    if isinstance(exc, aiohttp.ServerFingerprintMismatch):
        got = format_fingerprint(exc.got)
        if known is not None:
            return CertificateChanged(known, got)
        return ConnectionLost(f"TLS certificate does not match --fingerprint (the daemon "
                              f"presented SHA256 {got})", kind=ErrorKind.UNTRUSTED)
    reason = getattr(exc, "certificate_error", exc)
    if proxy is not None:
        presented = await _presented_via(proxy, host, port)
    else:
        presented = await known_hosts.presented_fingerprint(host, port)
    return CertificateNotTrusted(str(reason), host=host, port=port, presented=presented)


async def _presented_via(proxy: Proxy, host: str, port: int, timeout: float = 10.0) -> str | None:
    """``known_hosts.presented_fingerprint`` through a proxy's CONNECT tunnel: the SHA-256
    fingerprint of the certificate the daemon presents, or None when it cannot be read.
    A handshake pinned to a fingerprint nothing has (32 zero bytes) fails before any
    request is sent, and aiohttp's mismatch error carries the digest it got."""
    h = f"[{host}]" if ":" in host else host
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            async with http.get(f"https://{h}:{port}{PREFIX}/info", proxy=proxy.url,
                                ssl=aiohttp.Fingerprint(bytes(32)), allow_redirects=False):
                return None
    except aiohttp.ServerFingerprintMismatch as exc:
        return format_fingerprint(exc.got)
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
        return None


def _port(info: dict[str, Any], key: str, url: Url) -> int:
    port = info.get(key)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ProtocolError(f"{url.base()}: bad {key} {port!r} in the /info answer")
    return port


def _basic(user: str, password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def quote_path(path: str) -> str:
    return quote(path, safe="/")



