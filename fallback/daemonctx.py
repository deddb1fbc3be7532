"""What every daemon route shares: the daemon's state, the error middleware, login,
the typed reading of control bodies and the session lookup with its access checks.

Route handlers live in ``fallback.session_routes`` (the control API) and
``fallback.plain_routes`` (plain GET/PUT); ``fallback.server`` assembles the app.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from aiohttp import web

from fallback import control
from fallback import sessions as S
from fallback.auth import parse_basic
from fallback.config import Config, UserConfig
from fallback.errors import HttpRefusal
from fallback.logincheck import PasswordChecker
from fallback.ratelog import RateLimitedLog
from fallback.throttle import LoginRefused, LoginThrottle, check_login
from transport.blocks.statedir import StateDir, crosses_state_dir
from transport.errors import (
    RESOURCE_ERRNOS,
    ErrorKind,
    PathError,
    ProtocolError,
    ResourceExhausted,
    TransportError,
    from_os_error,
)

log = logging.getLogger("fallback.daemon")
resource_log = RateLimitedLog(log)
PREFIX = "/.fallback/v1"
MAX_CONTROL_BODY = 64 << 20
FEATURES = ("keepalive", "frames2", "acks", "holes", "bundles")
"""What this daemon offers beyond API 1, listed in ``/info`` (docs/protocol.md): a
client uses a newer call only with a daemon that lists it."""
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class DaemonState:
    config: Config
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(4, "fb-io"))
    table: S.SessionTable = field(default_factory=S.SessionTable)
    checker: PasswordChecker = field(default_factory=PasswordChecker)  # own pool, not executor
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    udp: Any = None  # the UDP path's service (fallback.udpserver.UdpService), when bound


STATE = web.AppKey("state", DaemonState)


HTTP_STATUS: Mapping[ErrorKind, int] = MappingProxyType({
    ErrorKind.BAD_REQUEST: 400,
    ErrorKind.UNAUTHORIZED: 401,  # answered with WWW-Authenticate (RFC 9110 section 15.5.2)
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONFLICT: 409,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.INTEGRITY: 422,  # Unprocessable Content (RFC 9110 section 15.5.21)
    ErrorKind.EXHAUSTED: 503,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.UNTRUSTED: 495,  # nginx's "SSL Certificate Error"; the daemon makes no TLS calls
    ErrorKind.REMOTE: 502,  # a peer's error relayed (Bad Gateway); the daemon relays none today
    ErrorKind.INTERNAL: 500,
})
"""The one place a data-plane error kind becomes an HTTP status (RFC 9110 section 15)."""


def http_status(exc: TransportError) -> int:
    """The HTTP status the daemon answers ``exc`` with: ``HTTP_STATUS`` of its kind, or the
    daemon's own status for a refusal the data plane has no kind for (``HttpRefusal``:
    429, 412)."""
    if isinstance(exc, HttpRefusal):
        return exc.status
    return HTTP_STATUS[exc.kind]


def error_response(status: int, message: str) -> web.Response:
    headers = {"WWW-Authenticate": 'Basic realm="fallback"'} if status == 401 else None
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Translate errors into JSON with their status (``http_status``), and one log line each."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except ResourceExhausted as exc:
        return exhausted(request, exc)
    except TransportError as exc:
        log.warning("%s %s %s: %s", request.remote, request.method, request.path, exc.message)
        return error_response(http_status(exc), exc.message)
    except ConnectionResetError:
        # The client went away mid-request (a cut-off PUT, a killed client): say so once.
        log.warning("%s %s %s: client disconnected", request.remote, request.method, request.path)
        raise
    except asyncio.CancelledError:
        raise
    except OSError as exc:
        if exc.errno in RESOURCE_ERRNOS:
            return exhausted(request, from_os_error(exc, request.path))
        log.warning("%s %s %s: %s", request.remote, request.method, request.path, exc)
        from fallback.paths import server_os_message

        return error_response(500, server_os_message(exc, request.get("fb_docroot")))
    except Exception as exc:  # noqa: BLE001 - the daemon must outlive any one request
        log.error("%s %s %s: internal error %s: %s", request.remote, request.method, request.path,
                  type(exc).__name__, exc)
        return error_response(500, f"internal error: {type(exc).__name__}")


def exhausted(request: web.Request, exc: TransportError) -> web.Response:
    """503 for a request the system had no resources for; one log line per kind per minute
    (a descriptor shortage fails every request at once: a line each would flood the log)."""
    kind = getattr(exc, "resource", "resource")
    resource_log.warning(kind, "%s %s %s: server %s (%s)", request.remote, request.method,
                         request.path, exc.message, kind)
    return error_response(http_status(exc), f"server {exc.message}")


def state_of(request: web.Request) -> DaemonState:
    return request.app[STATE]


def scheme_of(request: web.Request) -> str:
    return "https" if request.transport and request.transport.get_extra_info("sslcontext") else "http"


async def authenticate(request: web.Request) -> UserConfig:
    """Check HTTP Basic credentials: 401 if wrong, 429 while throttled or when the address
    has checks pending, 503 if checks back up (fallback.throttle.check_login).

    Throttled attempts are refused before any password hash runs (fallback.throttle);
    an unknown user costs the same hash as a known one (PasswordChecker's dummy).
    """
    st = state_of(request)
    creds = parse_basic(request.headers.get("Authorization", ""))
    if creds is None:
        raise PathError("authentication required", kind=ErrorKind.UNAUTHORIZED)
    name, password = creds
    user = st.config.user(name)
    try:
        ok = await check_login(st.checker, st.throttle, request.remote, name, password,
                               user.password_hash if user else None)
    except LoginRefused as exc:
        cls = web.HTTPTooManyRequests if exc.status == 429 else web.HTTPServiceUnavailable
        raise refusal(cls, str(exc), exc.retry_after) from None
    if not ok or user is None:
        raise PathError("wrong user name or password", kind=ErrorKind.UNAUTHORIZED)
    return user


def refusal(cls: type[web.HTTPException], message: str, retry_after: int) -> web.HTTPException:
    # An HTTPException passes errors_middleware unlogged: throttle.py logs once per period.
    return cls(text=json.dumps({"error": message}), content_type="application/json",
               headers={"Retry-After": str(retry_after)})


M = TypeVar("M")


async def read_message(request: web.Request, parse: Callable[[dict[str, Any]], M]) -> M:
    """The body as a typed message: ``parse`` (a ``control`` ``from_json``) applied to its
    JSON object (``{}`` when empty). Raises ``ProtocolError`` (400, 413 when too large).

    A large body (a manifest of many files) is parsed in a worker thread: decoding it
    holds the GIL, but checking its entries is Python code that lets the event loop run
    between slices, so other clients are served meanwhile.
    """
    if request.content_length is not None and request.content_length > MAX_CONTROL_BODY:
        raise ProtocolError("control request too large", kind=ErrorKind.TOO_LARGE)
    try:
        # request.read() reads to the end of the body (and enforces client_max_size);
        # content.read(n) would return only what happened to be buffered already.
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ProtocolError("control request too large", kind=ErrorKind.TOO_LARGE) from None
    if len(raw) > _INLINE_BODY:
        return await run_io(request, lambda: parse(control.loads(raw)))  # type: ignore[no-any-return]
    return parse(control.loads(raw))


STATE_BATCH = 512
"""Entries whose target state one executor job inspects when an upload opens: one job
per entry made a 300,000-entry open cost over a minute of pool hand-offs."""

_INLINE_BODY = 64 << 10
"""Bodies up to this size are parsed on the event loop (about a millisecond at most)."""


def session_of(request: web.Request, direction: str | None, call: str) -> S.Session:
    """The session named in the URL, if the Bearer token is its own (401 otherwise),
    the call applies to its direction (409 otherwise) and its user may still make it
    under the current configuration (403 otherwise). ``direction=None`` (close)
    checks the token only: ending a session is always allowed."""
    auth = request.headers.get("Authorization", "")
    token = auth[7:] if auth.startswith("Bearer ") else None
    st = state_of(request)
    s = st.table.get(request.match_info["sid"], token)
    if direction is not None:
        S.check_access(s, st.config.user(s.user), direction, call)
    s.heard(scheme_of(request), peer_of(request))
    s.used = True
    request["fb_docroot"] = s.docroot  # names its files in server-side errors
    return s


def peer_of(request: web.Request) -> str:
    """The client's address as an HTTP path of a session sees it."""
    return str(request.remote or "-")


def heard_by(request: web.Request, session: S.Session) -> Callable[[int], None]:
    """Counts each block a stream carries on the session's HTTP path (and keeps it alive)."""
    kind, peer = scheme_of(request), peer_of(request)
    return lambda n: session.heard(kind, peer, n)


def run_io(request: web.Request, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
    return asyncio.get_running_loop().run_in_executor(state_of(request).executor, fn, *args)


def docroot_state(request: web.Request, docroot: Path) -> StateDir:
    return StateDir(docroot, state_of(request).config.partial_file_suffix, adopt=True)


def refuse_reserved(request: web.Request, docroot: Path, path: Path) -> None:
    """403 for the docroot's state folder and anything in it (by name or through a symlink),
    and for any path through a marked state folder below the docroot (a nested user's)."""
    if docroot_state(request, docroot).holds(path) or crosses_state_dir(docroot, path):
        raise PathError("that name is reserved", kind=ErrorKind.FORBIDDEN)


