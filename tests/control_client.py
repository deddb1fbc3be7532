"""A raw client of the control API and daemons with per-user rights, for
``test_control_api``: requests are sent as written, so tests can send what the
real client never would.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import Daemon, free_port, sha256
from transport.blocks.digest import block_digest, file_digest
from transport.http.framing import HEADER_SIZE, FrameHeader, parse_header

BS = 64 << 10
SIZE = 2 * BS + 777  # three blocks, the last one short
PREFIX = "/.fallback/v1"
PERMS = {"ro": (True, False), "wo": (False, True), "rw": (True, True)}  # (read, write)
T0 = 1_700_000_000_000_000_000
_HASHES: dict[str, str] = {}


def password(user: str) -> str:
    return f"{user}-secret-pw"


def conf_xml(d: Daemon, perms: dict[str, tuple[bool, bool]], extra: str = "") -> str:
    from fallback.auth import hash_password

    users = ""
    for u, (r, w) in perms.items():
        if u not in _HASHES:
            _HASHES[u] = hash_password(password(u))
        users += (f"<user><name>{u}</name><password_hash>{_HASHES[u]}</password_hash>"
                  f"<docroot>{d.docroots[u]}</docroot><read_allowed>{str(r).lower()}</read_allowed>"
                  f"<write_allowed>{str(w).lower()}</write_allowed></user>")
    return f"""<?xml version='1.0' encoding='UTF-8'?>
<CONF version="2">
  <server><state_dir>{d.base / "state"}</state_dir></server>
  <http_server>
    <http_port>{d.http_port}</http_port><https_port>{d.https_port}</https_port>
    <enable_http>true</enable_http><enable_https>true</enable_https>
    <bind_address>127.0.0.1</bind_address>
  </http_server>
  <file_system><block_size>64K</block_size><fsync>false</fsync>{extra}</file_system>
  <users>{users}</users>
</CONF>
"""


def start_daemon(base: Path, perms: dict[str, tuple[bool, bool]], extra: str = "") -> Daemon:
    d = Daemon(base, free_port(), free_port(), {u: base / "docroot" / u for u in perms})
    base.mkdir(parents=True, exist_ok=True)
    d.config_path.write_text(conf_xml(d, perms, extra))
    return d.start()


def reload(d: Daemon, perms: dict[str, tuple[bool, bool]], extra: str = "") -> None:
    """Rewrite the config and SIGHUP the daemon; returns once it logged the reload."""
    before = d.log().count("reloaded ")
    d.config_path.write_text(conf_xml(d, perms, extra))
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while d.log().count("reloaded ") == before:
        assert time.monotonic() < deadline, "daemon did not reload"
        time.sleep(0.02)


_EMPTY_STATE = {".fallback", ".fallback/parts", ".fallback/README"}
"""The daemon's state folder with no partial or journal in it: created by the first
upload session of a docroot that may be written, and holding nothing of the user's."""


def listing(root: Path) -> dict[str, tuple[str, int, str]]:
    """Everything under ``root``, hidden files included: kind, mtime, content digest.
    The empty state folder is left out; any partial or journal inside it is listed."""
    out: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames:
            p = Path(dirpath, n)
            out[str(p.relative_to(root))] = ("dir", 0, "")
        for n in filenames:
            p = Path(dirpath, n)
            out[str(p.relative_to(root))] = ("file", p.stat().st_mtime_ns, sha256(p))
    for k in _EMPTY_STATE:
        out.pop(k, None)
    return out


def entry(path: str = "", size: int = SIZE, **kw: Any) -> dict[str, Any]:
    return {"path": path, "kind": "file", "size": size, "mtime_ns": T0, "mode": 0o644,
            "block_size": BS, **kw}


def frames(data: bytes, file: int = 0) -> tuple[bytes, str]:
    """Upload body frames for ``data`` as file ``file``, and its whole-file digest."""
    body, digests = b"", []
    for k, off in enumerate(range(0, len(data), BS)):
        block = data[off:off + BS]
        d = block_digest(block)
        digests.append(d)
        body += FrameHeader(file, k, len(block), d).pack() + block
    return body, file_digest(BS, len(data), digests)


def parse_frames(body: bytes) -> list[tuple[int, int]]:
    """(file, block) of each frame of a download body."""
    out, pos = [], 0
    while pos < len(body):
        h = parse_header(body[pos:pos + HEADER_SIZE], BS)
        out.append((h.file, h.block))
        pos += HEADER_SIZE + h.length
    return out


# -- a raw client ------------------------------------------------------------------------------------
@dataclass
class Reply:
    status: int
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str:
        try:
            return str(self.json.get("error", ""))
        except ValueError:
            return self.body[:200].decode(errors="replace")


@dataclass
class Sess:
    id: str
    token: str


class Api:
    """Raw control calls to one daemon over plain HTTP: no client-side checks at all."""

    def __init__(self, d: Daemon, http: aiohttp.ClientSession) -> None:
        self.base = f"http://127.0.0.1:{d.http_port}{PREFIX}"
        self.http = http

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: dict[str, str] | None = None) -> Reply:
        async with self.http.request(method, self.base + path, data=body, headers=headers) as r:
            return Reply(r.status, await r.read())

    async def open_raw(self, user: str, body: bytes) -> Reply:
        auth = base64.b64encode(f"{user}:{password(user)}".encode()).decode()
        return await self.request("POST", "/session", body, {"Authorization": f"Basic {auth}"})

    async def open(self, user: str, body: dict[str, Any]) -> Sess:
        r = await self.open_raw(user, json.dumps(body).encode())
        assert r.status == 200, (r.status, r.error)
        return Sess(r.json["id"], r.json["token"])

    async def call(self, s: Sess, method: str, suffix: str, body: bytes | dict[str, Any] | None = None,
                   token: str | None = None) -> Reply:
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        headers = {"Authorization": f"Bearer {s.token if token is None else token}"}
        return await self.request(method, f"/session/{s.id}{suffix}", raw, headers)
