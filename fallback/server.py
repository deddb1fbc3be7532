"""The daemon's HTTP(S) application: session control, block streams, plain files.

Routes (the control API lives under one reserved prefix, ``/.fallback/v1``;
everything else is the user's docroot as plain HTTP):

* ``POST   /.fallback/v1/session``               open (Basic auth) -> id, token, states or manifest
* ``POST   /.fallback/v1/session/{id}/plan``     upload: skip/fresh/resume per file -> missing blocks
* ``PUT    /.fallback/v1/session/{id}/blocks``   upload stream (chunked body of frames)
* ``POST   /.fallback/v1/session/{id}/commit``   upload: verify and publish files
* ``POST   /.fallback/v1/session/{id}/digests``  download: source digests (resume check, final check)
* ``POST   /.fallback/v1/session/{id}/want``     download: queue blocks
* ``GET    /.fallback/v1/session/{id}/blocks``   download stream (``?frames=2``: pieces, v2)
* ``POST   /.fallback/v1/session/{id}/keepalive`` the client is alive (a long local phase)
* ``POST   /.fallback/v1/session/{id}/acks``     journaled blocks: the client's (download),
  the daemon's (upload)
* ``POST   /.fallback/v1/session/{id}/udp``      a UDP path: connection id, key, port
  (``fallback.udpserver``)
* ``DELETE /.fallback/v1/session/{id}/udp``      the client left the UDP path (failover)
* ``DELETE /.fallback/v1/session/{id}``          close (logs the session line)
* ``GET|HEAD /path`` (with ``Range``), ``PUT /path``: plain clients (curl, aria2c) with Basic auth.

The name ``.fallback`` at the top of a docroot is the daemon's own: it holds the
partial files and journals (``transport.blocks.statedir``). It is never listed,
served, walked or written through any route (403 "that name is reserved").
"""

from __future__ import annotations

import json

from aiohttp import web

from fallback.daemonctx import (
    FEATURES,
    MAX_CONTROL_BODY,
    PREFIX,
    STATE,
    DaemonState,
    authenticate,
    errors_middleware,
    scheme_of,
    state_of,
)
from fallback.plain_routes import plain_get, plain_put
from fallback.session_routes import (
    acks,
    close_session,
    commit,
    digests,
    download_blocks,
    keepalive,
    open_session,
    plan,
    upload_blocks,
    want,
)
from fallback.udpcontrol import FEATURE as UDP_FEATURE
from fallback.udpcontrol import FEATURE_HOLES as UDP_HOLES
from fallback.udpserver import udp_close, udp_path
from transport.errors import (
    TransportError,
)


async def info(request: web.Request) -> web.Response:
    """Public facts a client needs to pick a transport; no secrets, no auth."""
    st = state_of(request)
    c, udp = st.config, st.udp
    return web.json_response({
        "product": "fallback", "api": 1,
        "enable_http": c.enable_http, "http_port": c.http_port,
        "enable_https": c.enable_https, "https_port": c.https_port,
        "udp_port": udp.port if udp is not None else c.bind_udp_port, "udp": udp is not None,
        "scheme": scheme_of(request),
        "features": list(FEATURES) + ([UDP_FEATURE, UDP_HOLES] if udp is not None else []),
    })


async def _expect_authenticated(request: web.Request) -> None:
    """Answer ``Expect: 100-continue`` only for good credentials, so ``curl -T`` with a
    wrong password is refused before it sends its body, not after."""
    if request.version == (1, 1) and request.headers.get("Expect", "").lower() == "100-continue":
        try:
            await authenticate(request)
        except TransportError as exc:
            raise web.HTTPUnauthorized(
                text=json.dumps({"error": exc.message}), content_type="application/json",
                headers={"WWW-Authenticate": 'Basic realm="fallback"'}) from None
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp's own handler: the body has not started


def make_app(state: DaemonState) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_CONTROL_BODY)
    app[STATE] = state
    app.router.add_get(f"{PREFIX}/info", info)
    app.router.add_post(f"{PREFIX}/session", open_session)
    app.router.add_post(f"{PREFIX}/session/{{sid}}/plan", plan)
    app.router.add_put(f"{PREFIX}/session/{{sid}}/blocks", upload_blocks)
    app.router.add_post(f"{PREFIX}/session/{{sid}}/commit", commit)
    app.router.add_post(f"{PREFIX}/session/{{sid}}/digests", digests)
    app.router.add_post(f"{PREFIX}/session/{{sid}}/want", want)
    app.router.add_get(f"{PREFIX}/session/{{sid}}/blocks", download_blocks, allow_head=False)
    app.router.add_post(f"{PREFIX}/session/{{sid}}/keepalive", keepalive)
    app.router.add_post(f"{PREFIX}/session/{{sid}}/acks", acks)
    app.router.add_post(f"{PREFIX}/session/{{sid}}/udp", udp_path)
    app.router.add_delete(f"{PREFIX}/session/{{sid}}/udp", udp_close)
    app.router.add_delete(f"{PREFIX}/session/{{sid}}", close_session)
    # [\s\S], not '.': a file name may hold a newline (%0A), and '.' stops there.
    app.router.add_get("/{path:[\\s\\S]*}", plain_get)
    app.router.add_put("/{path:[\\s\\S]*}", plain_put, expect_handler=_expect_authenticated)
    return app

