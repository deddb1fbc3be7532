"""One access-log line per plain-HTTP request (``curl``, ``aria2c``, browsers).

Transfers through the control API (``/.fallback/v1/``) already get one line per
session from ``fallback.sessions``; the plain ``GET``/``HEAD``/``PUT`` surface had
none. Each line, on the ``fallback.access`` logger at INFO::

    127.0.0.1 GET /incoming/big.iso user=alice status=200 bytes=1048576 seconds=0.214

``bytes`` is the body moved: sent for ``GET``/``HEAD`` (without the headers; a
chunked body counts its chunk framing too), received for ``PUT``.
``user`` is the name in the ``Authorization: Basic`` header (``-`` when none; on a
401 it is the name that was refused). The path is the raw, percent-encoded one and
the user name is percent-encoded too, so a request cannot forge log lines.
Wired in ``fallback.daemon`` as aiohttp's ``access_log_class``.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from fallback.auth import parse_basic

__all__ = ["CONTROL_PREFIX", "PlainAccessLogger", "access_logger"]

CONTROL_PREFIX = "/.fallback/"


def access_logger() -> logging.Logger:
    return logging.getLogger("fallback.access")


class PlainAccessLogger(AbstractAccessLogger):
    """aiohttp access logger writing the line above for every request outside the control API."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        path = request.rel_url.raw_path
        if path.startswith(CONTROL_PREFIX):
            return
        creds = parse_basic(request.headers.get("Authorization"))
        user = quote(creds[0][:64], safe="@._-+") or "-" if creds else "-"
        if request.method == "PUT":
            moved = request.content.total_bytes
        else:  # aiohttp counts the status line and headers in body_length: take them off
            moved = max(0, response.body_length - _head_length(request, response))
        self.logger.info("%s %s %s user=%s status=%d bytes=%d seconds=%.3f",
                         request.remote or "-", quote(request.method[:16], safe=""), path, user,
                         response.status, moved, time)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def _head_length(request: BaseRequest, response: StreamResponse) -> int:
    """Bytes of the status line and headers as aiohttp serialises them (RFC 9112 section 2.1:
    ``HTTP/1.1 200 OK CRLF``, ``name: value CRLF`` each, then ``CRLF``)."""
    v = request.version
    size = len(f"HTTP/{v.major}.{v.minor} {response.status} {response.reason}\r\n".encode())
    for name, value in response.headers.items():
        size += len(name.encode()) + 2 + len(value.encode()) + 2
    return size + 2
