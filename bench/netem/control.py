"""Client side of the forwarder's control channel (JSON lines over a UNIX socket)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


class ControlError(RuntimeError):
    """The forwarder refused a request or could not be reached."""


def request(sock_path: Path, msg: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request on a fresh connection and return the reply.

    A connection per request keeps the client trivially safe to use from signal handlers and
    from several threads; control traffic is a few messages per benchmark run.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(sock_path))
            s.sendall(json.dumps(msg).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except OSError as exc:
            raise ControlError(f"control channel {sock_path}: {exc}") from exc
    if not buf:
        raise ControlError("forwarder closed the control channel without a reply")
    reply: dict[str, Any] = json.loads(buf)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "request failed"))
    return reply
