"""Addressing a daemon: URLs, credentials, TLS choice, the control calls.

``Remote`` wraps one aiohttp ``ClientSession`` to one daemon and speaks the
control API (JSON over HTTP(S)); the block streams themselves are
``transport.http.client``. Errors are translated here into
``transport.errors`` so the engine above handles one family.
"""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aiohttp

from fallback import known_hosts
from fallback.errors import UsageError
from fallback.known_hosts import CertificateChanged, CertificateNotTrusted, KnownHost
from fallback.tls import client_ssl, format_fingerprint
from transport.errors import (
    ConnectError,
    ConnectionLost,
    ProtocolError,
    RemoteError,
    TransportError,
)
from transport.http.client import SSLArg, describe, read_error, refuse_redirect, remote_error
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


def parse_url(s: str) -> Url:
    """Split ``http(s)://[user[:password]@]host[:port]/path``; raises ``UsageError``.

    The path is percent-decoded as file names are carried (PEP 383
    ``surrogateescape`` for escapes that are not UTF-8, see ``fallback.paths``).
    A raw ``?`` or ``#`` is refused: a URL parser takes what follows for a query
    or a fragment, so ``/hs/report#2.txt`` would name ``/hs/report``; the hint
    says to write ``%3F`` and ``%23`` (RFC 3986 section 3.3: a path ends at the
    first ``?`` or ``#``).
    """
    try:
        u = urlsplit(s)
        port = u.port
    except ValueError as exc:
        raise UsageError(f"bad URL {s!r}: {exc}") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise UsageError(f"bad URL {s!r}: expected http(s)://[user@]host[:port]/path")
    for raw, code in (("?", "%3F"), ("#", "%23")):
        if raw in s:
            raise UsageError(f"bad URL {s!r}: a raw {raw!r} would end the path there "
                             f"(it starts a URL {'query' if raw == '?' else 'fragment'}); "
                             f"write it as {code}")
    path = unquote(u.path, errors="surrogateescape") or "/"
    if "\x00" in path:
        raise UsageError(f"bad URL {s!r}: the path contains a NUL byte (%00)")
    return Url(
        scheme=u.scheme,
        host=u.hostname,
        port=port or DEFAULT_PORTS[u.scheme],
        path=path,
        user=unquote(u.username) if u.username else None,
        password=unquote(u.password) if u.password else None,
    )


class Remote:
    """One daemon, reached over HTTP or HTTPS, with Basic then session-token auth."""

    def __init__(self, url: Url, *, user: str, password: str, ssl: Any, scheme: str,
                 port: int, streams: int, known: KnownHost | None = None,
                 features: frozenset[str] = frozenset()) -> None:
        self.url = url
        self.features = features
        """What the daemon's ``/info`` says it supports beyond API 1 (``keepalive``, ``acks``,
        ``frames2``): the client uses a newer call only with a daemon that has it."""
        self.user = user
        self._password = password
        self.ssl: SSLArg = ssl if scheme == "https" else True
        self.scheme = scheme
        self.port = port
        self.known = known  # the remembered certificate pinned for this daemon, if any
        self.base = url.base(scheme, port)
        connector = aiohttp.TCPConnector(limit=streams + 4, force_close=False)
        timeout = aiohttp.ClientTimeout(total=None, connect=15, sock_read=120)
        # A 1 MiB read buffer (aiohttp's default is 64 KiB) lets a 4 MiB block
        # arrive without dozens of pause/resume round trips on the socket.
        self.http = aiohttp.ClientSession(connector=connector, timeout=timeout,
                                          auto_decompress=False, read_bufsize=1 << 20)
        self.sid: str | None = None
        self.token: str | None = None
        self.last_call = time.monotonic()  # when the latest control call started

    @classmethod
    async def connect(cls, url: Url, *, transport: str, user: str | None, password: str | None,
                      cacert: str | None, fingerprint: str | None, insecure: bool,
                      streams: int) -> Remote:
        """Pick the scheme and the trust, check the daemon answers, return a ``Remote``.

        The scheme is the URL's: ``auto`` never turns an ``http://`` URL into HTTPS
        (an ``http://`` URL means HTTP, as for curl); ``--transport https`` or ``http``
        switches to the daemon's port for that scheme (from its ``/info``) and says so
        on the ``fallback.client`` logger. Credentials: ``fallback.credentials``.
        Without ``cacert``/``fingerprint``/``insecure``, a certificate remembered in
        ``fallback.known_hosts`` for the HTTPS ``host:port`` is pinned.
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
        if transport in ("udp",):
            raise UsageError("the UDP transport is not wired in yet (issue #12); use auto, http or https")
        explicit = cacert is not None or fingerprint is not None or insecure

        def trust(port: int) -> tuple[Any, KnownHost | None]:
            known = None if explicit else known_hosts.lookup(url.host, port)
            if known is None:
                return ssl, None
            log.info("certificate of %s pinned from %s:%d", known.key, known.path, known.line)
            return client_ssl(None, known.fingerprint, False), known

        scheme, port = url.scheme, url.port
        link_ssl, known = trust(port) if scheme == "https" else (ssl, None)
        info = await _info(url, link_ssl, known)
        if transport == "auto":
            why = f"the URL says {url.scheme}://"
            if url.scheme == "http" and info.get("enable_https"):
                why += f" (the daemon also offers HTTPS on port {info.get('https_port')}: " \
                       "--transport https)"
            log.info("transport %s: %s", scheme, why)
        elif transport != url.scheme:
            key = f"enable_{transport}"
            if not info.get(key):
                what = "HTTPS" if transport == "https" else "plain HTTP"
                raise TransportError(f"the daemon does not offer {what}", status=400)
            scheme, port = transport, _port(info, f"{transport}_port", url)
            log.warning("switching %s to %s (--transport %s)", url.base(),
                        url.base(scheme, port), transport)
            link_ssl, known = trust(port) if scheme == "https" else (ssl, None)
        else:
            log.info("transport %s: --transport %s", scheme, transport)
        raw = info.get("features")
        features = frozenset(f for f in raw if isinstance(f, str)) if isinstance(raw, list) \
            else frozenset()
        return cls(url, user=name, password=pw, ssl=link_ssl, scheme=scheme, port=port,
                   streams=streams, known=known, features=features)

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
            async with self.http.request(method, url, json=body or {}, headers=self._headers(),
                                         ssl=self.ssl, allow_redirects=False) as resp:
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
            raise await _tls_error(exc, self.url.host, self.port, self.known) from None
        except aiohttp.ClientConnectorError as exc:
            raise ConnectError(f"cannot reach {self.base}: {describe(exc)}") from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise ConnectionLost(f"cannot reach {self.base}: {describe(exc)}") from None

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

    async def close(self, error: str | None = None) -> None:
        if self.sid and self.token:
            try:
                await self.call("DELETE", self.session_url(), {"error": error})
            except TransportError:
                pass
        await self.http.close()


async def _info(url: Url, ssl: Any, known: KnownHost | None = None) -> dict[str, Any]:
    """The daemon's public facts (ports, enabled schemes): no auth needed."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
            async with http.get(f"{url.base()}{PREFIX}/info", allow_redirects=False,
                                ssl=ssl if url.scheme == "https" else True) as resp:
                refuse_redirect(resp, url.base())
                if resp.status != 200:
                    raise RemoteError(f"{url.base()} is not a fallback daemon (HTTP {resp.status})",
                                      status=resp.status)
                info = parse_answer(await read_bounded(resp, url.base()), url.base())
                if not isinstance(info, dict):
                    raise ProtocolError(f"{url.base()} is not a fallback daemon (bad /info answer)")
                return info
    except TransportError:
        raise
    except (aiohttp.ClientConnectorCertificateError, aiohttp.ServerFingerprintMismatch) as exc:
        raise await _tls_error(exc, url.host, url.port, known) from None
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
        raise ConnectionLost(f"cannot reach {url.base()}: {describe(exc)}") from None


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
                     known: KnownHost | None) -> TransportError:
    """The error for a certificate that was not accepted, with what the daemon presented."""
    if isinstance(exc, aiohttp.ServerFingerprintMismatch):
        got = format_fingerprint(exc.got)
        if known is not None:
            return CertificateChanged(known, got)
        return ConnectionLost(f"TLS certificate does not match --fingerprint (the daemon "
                              f"presented SHA256 {got})", status=known_hosts.TLS_UNTRUSTED)
    reason = getattr(exc, "certificate_error", exc)
    presented = await known_hosts.presented_fingerprint(host, port)
    return CertificateNotTrusted(str(reason), host=host, port=port, presented=presented)


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



