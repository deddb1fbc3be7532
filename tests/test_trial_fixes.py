"""Fixes for an outside tester's findings on the issue-10 work (security, integrity):
every defect kind here has a test that failed before its fix."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import PASSWORDS, Daemon, free_port, make_file
from tests.control_client import BS, PERMS, T0, Sess, conf_xml, entry, start_daemon
from transport.blocks.digest import digest_path
from transport.blocks.ranges import RangeSet

MAX_DIGEST_BYTES = 64 << 20  # fallback.sources.MAX_DIGEST_BYTES, as docs/protocol.md states it


@pytest.fixture
def umask_027() -> Iterator[None]:
    """Daemons and CLI runs started by the test inherit umask 027."""
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


# -- 1. modes from the wire: no set-id/sticky bits, the receiver's umask applies ------------------
def test_upload_and_download_strip_setid_bits_and_apply_umask(
        daemon_factory, tmp_path: Path, umask_027: None) -> None:
    d = daemon_factory()
    src = tmp_path / "src"
    make_file(src / "tool", 1000)
    make_file(src / "sub" / "f", 10)
    os.chmod(src / "tool", 0o6777)
    os.chmod(src / "sub", 0o1777)
    d.transfer(str(src), d.url("/"))
    up = d.docroots["alice"] / "src"
    assert stat.S_IMODE(os.stat(up / "tool").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(up / "sub").st_mode) == 0o750
    # the other direction: a daemon-side file with set-id bits arrives without them
    os.chmod(up / "tool", 0o6777)
    os.chmod(up / "sub", 0o1777)
    dst = tmp_path / "dst"
    dst.mkdir()
    d.transfer(d.url("/src"), str(dst))
    assert stat.S_IMODE(os.stat(dst / "src" / "tool").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(dst / "src" / "sub").st_mode) == 0o750


def test_plain_put_applies_the_daemon_umask(daemon_factory, tmp_path: Path, umask_027: None) -> None:
    d = daemon_factory()
    f = make_file(tmp_path / "f", 100)
    p = subprocess.run(["curl", "-sk", "-T", str(f), "-u", f"alice:{PASSWORDS['alice']}",
                        d.url("/put.bin").replace("alice@", "")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert stat.S_IMODE(os.stat(d.docroots["alice"] / "put.bin").st_mode) == 0o640


# -- 2. /digests: a byte budget per call, one call at a time per session ---------------------------
def _sparse(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


async def test_digests_read_at_most_64_mib_per_call(tmp_path: Path, api_for: Any) -> None:
    d = start_daemon(tmp_path / "d", {"alice": PERMS["rw"]})
    size = 256 << 20  # 4096 blocks of 64 KiB
    _sparse(d.docroots["alice"] / "big", size)
    api = api_for(d, timeout=60)
    s = await api.open("alice", {"direction": "download", "path": "/big"})
    r = await api.call(s, "POST", "/digests", {"file": 0, "blocks": list(range(4096)), "root": True})
    assert r.status == 200, r.error
    got = r.json
    assert len(got["digests"]) == MAX_DIGEST_BYTES // BS  # the rest is left out
    assert "root" not in got and got["pending"] is True
    # roots: pending until the daemon has read the whole file, a budget per call
    calls, root = 0, None
    while root is None:
        calls += 1
        assert calls <= 10
        r = await api.call(s, "POST", "/digests", {"roots": [0]})
        assert r.status == 200, r.error
        root = r.json["roots"].get("0")
        if root is None:
            assert r.json["pending"] == [0]
    assert calls == 3  # 1024 blocks read by the first call, 3072 left: 3 x 1024
    assert root == digest_path(d.docroots["alice"] / "big", BS)


async def test_one_digests_call_at_a_time_per_session(tmp_path: Path, api_for: Any) -> None:
    d = start_daemon(tmp_path / "d", {"alice": PERMS["rw"]})
    _sparse(d.docroots["alice"] / "big", 1 << 30)
    api = api_for(d, timeout=60)
    s = await api.open("alice", {"direction": "download", "path": "/big"})
    replies = await asyncio.gather(*(api.call(s, "POST", "/digests", {"roots": [0]})
                                     for _ in range(4)))
    statuses = sorted(r.status for r in replies)
    assert 200 in statuses and 429 in statuses, statuses
    assert all("already running" in r.error for r in replies if r.status == 429)


def test_download_of_a_file_over_the_digest_budget_verifies(daemon_factory, tmp_path: Path) -> None:
    """The client asks again for what a budgeted answer left out (roots and kept blocks)."""
    d = daemon_factory()
    src = _sparse(d.docroots["alice"] / "sparse.bin", 200 << 20)
    with open(src, "r+b") as f:
        f.seek(150 << 20)
        f.write(b"tail")
    dst = tmp_path / "dst"
    dst.mkdir()
    rc, res, err = d.transfer(d.url("/sparse.bin"), str(dst))
    assert res["ok"] and res["verified"] == "full", (res, err)
    assert digest_path(dst / "sparse.bin", 4 << 20) == digest_path(src, 4 << 20)


# -- 3, 4. a hostile server: bounded bodies, no redirects followed ---------------------------------
class FakeDaemon:
    """A hostile "daemon" on loopback speaking just enough of the control API (aiohttp
    server in the test's loop): each route's behaviour is set by the test."""

    def __init__(self) -> None:
        self.app = web.Application()
        self.hits: list[str] = []
        self.sent = 0
        self.port = 0
        self.runner: web.AppRunner | None = None

    async def start(self, routes: dict[tuple[str, str], Any]) -> FakeDaemon:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.hits.append(f"{request.method} {request.path}")
            key = (request.method, request.path.rsplit("/", 1)[-1])
            fn = routes.get(key) or routes.get((request.method, "*"))
            if fn is None:
                return web.json_response({"error": "nope"}, status=404)
            return await fn(request)  # type: ignore[no-any-return]

        self.app.router.add_route("*", "/{tail:.*}", handle)
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def url(self, path: str) -> str:
        return f"http://alice@127.0.0.1:{self.port}{path}"

    def info(self) -> Any:
        async def fn(request: web.Request) -> web.Response:
            return web.json_response({"product": "fallback", "api": 1, "enable_http": True,
                                      "http_port": self.port, "enable_https": False,
                                      "https_port": 1, "udp_port": 1, "udp": False,
                                      "scheme": "http"})
        return fn


def _json(body: Any, status: int = 200) -> Any:
    async def fn(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(body, status=status)
    return fn


def _redirect(to: str, status: int = 307) -> Any:
    async def fn(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": to})
    return fn


async def _cli(*args: str) -> tuple[int, str]:
    env = {**os.environ, "FALLBACK_PASSWORD": "pw"}
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fallback", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(p.communicate(), 120)
    return p.returncode or 0, (out + err).decode()


_DOWNLOAD = {"id": "s1", "token": "t1", "name": "f", "skipped": [], "streams_max": 1,
             "entries": [{"path": "", "kind": "file", "size": 10, "mtime_ns": 1, "mode": 0o644,
                          "block_size": 65536}]}


async def test_client_reads_at_most_64_kib_of_an_error_body(tmp_path: Path) -> None:
    fake = FakeDaemon()

    async def huge_error(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=500)
        await resp.prepare(request)
        piece = b"x" * (1 << 20)
        try:
            for _ in range(256):  # 256 MiB, unless the client stops reading
                await resp.write(piece)
                fake.sent += len(piece)
        except (ConnectionError, OSError):
            pass
        return resp

    await fake.start({("GET", "info"): fake.info(), ("POST", "session"): _json(_DOWNLOAD),
                      ("POST", "want"): _json({"queued": 1}), ("GET", "blocks"): huge_error,
                      ("DELETE", "s1"): _json({"closed": True})})
    try:
        rc, out = await _cli("transfer", fake.url("/f"), str(tmp_path), "-q")
    finally:
        await fake.stop()
    assert rc != 0
    assert "GET /.fallback/v1/session/s1/blocks" in fake.hits
    assert fake.sent < 32 << 20, f"the client read {fake.sent >> 20} MiB of an error body"


@pytest.mark.parametrize("where", ["info", "session"])
async def test_client_refuses_redirects(tmp_path: Path, where: str) -> None:
    other = FakeDaemon()
    fake = FakeDaemon()
    await other.start({("GET", "info"): other.info(), ("POST", "session"): _json(_DOWNLOAD),
                       ("POST", "*"): _json({"queued": 1}), ("GET", "blocks"): _json({}, 404)})
    routes = {("GET", "info"): fake.info(), ("POST", "session"): _json({"error": "no"}, 401)}
    routes[("GET" if where == "info" else "POST", where)] = _redirect(
        f"http://127.0.0.1:{other.port}/.fallback/v1/{where}")
    await fake.start(routes)
    try:
        rc, out = await _cli("transfer", fake.url("/f"), str(tmp_path), "-q")
    finally:
        await fake.stop()
        await other.stop()
    assert rc != 0
    assert other.hits == [], "the client followed a redirect to another address"
    assert "307 redirecting to" in out and f":{other.port}/" in out, out


# -- 5. sessions_per_user_max holds under concurrent opens; unused sessions are reaped -------------
def _daemon_with(base: Path, http_server_xml: str, perms: dict[str, tuple[bool, bool]] | None = None
                 ) -> Daemon:
    d = Daemon(base, free_port(), free_port(), {"alice": base / "docroot" / "alice"})
    base.mkdir(parents=True, exist_ok=True)
    xml = conf_xml(d, perms or {"alice": PERMS["rw"]})
    d.config_path.write_text(xml.replace("</http_server>", http_server_xml + "</http_server>", 1))
    return d.start()


async def test_concurrent_opens_cannot_pass_sessions_per_user_max(tmp_path: Path, api_for: Any) -> None:
    d = _daemon_with(tmp_path / "d", "<sessions_per_user_max>4</sessions_per_user_max>")
    tree = d.docroots["alice"] / "tree"
    tree.mkdir()
    for k in range(4000):  # an open walks them: long enough for opens to overlap
        (tree / f"f{k}").write_bytes(b"x")
    api = api_for(d, timeout=60)
    body = json.dumps({"direction": "download", "path": "/tree"}).encode()
    replies = await asyncio.gather(*(api.open_raw("alice", body) for _ in range(24)))
    ok = [r for r in replies if r.status == 200]
    assert 1 <= len(ok) <= 4, sorted(r.status for r in replies)
    # the others: over the limit (429), or the daemon's bound on password checks at once (503)
    assert all(r.status in (429, 503) for r in replies if r.status != 200), \
        {(r.status, r.error) for r in replies}
    # every reservation was released: once those close, as many may open again
    for r in ok:
        s = Sess(r.json["id"], r.json["token"])
        assert (await api.call(s, "DELETE", "", {})).status == 200
    for _ in range(4):
        await api.open("alice", {"direction": "download", "path": "/tree"})
    assert (await api.open_raw("alice", body)).status == 429


async def test_sessions_unused_after_open_are_reaped_without_a_timeout(tmp_path: Path) -> None:
    """``session_activity_timeout`` 0: a session with no call after its open ends after
    ``UNUSED_LIMIT`` (10 minutes), a used one after ``IDLE_LIMIT`` (an hour); in-process,
    on the daemon's own table, with the clocks of the sessions set back."""
    from concurrent.futures import ThreadPoolExecutor

    from fallback.daemon import IDLE_LIMIT, UNUSED_LIMIT
    from fallback.sessions import SessionTable

    table = SessionTable()
    with ThreadPoolExecutor(1) as ex:
        kw: dict[str, Any] = dict(user="alice", peer="x", direction="download", docroot=tmp_path,
                                  root=tmp_path, entries=[], executor=ex)
        unused, used, fresh = table.new(**kw), table.new(**kw), table.new(**kw)
        used.used = True
        unused.last_activity -= UNUSED_LIMIT + 1
        used.last_activity -= UNUSED_LIMIT + 1
        await table.reap(IDLE_LIMIT, unused=UNUSED_LIMIT)
        assert set(table.sessions) == {used.id, fresh.id}
        used.last_activity -= IDLE_LIMIT
        await table.reap(IDLE_LIMIT, unused=UNUSED_LIMIT)
        assert set(table.sessions) == {fresh.id}


# -- 6. a want call is bounded and cheap -----------------------------------------------------------
async def test_want_takes_at_most_65536_ranges_quickly(tmp_path: Path, api_for: Any) -> None:
    d = start_daemon(tmp_path / "d", {"alice": PERMS["rw"]})
    _sparse(d.docroots["alice"] / "big", 1 << 40)  # 2^24 blocks of 64 KiB
    api = api_for(d, timeout=60)
    s = await api.open("alice", {"direction": "download", "path": "/big"})
    over = [[0, 2 * k, 2 * k + 1] for k in range(65537)]
    r = await api.call(s, "POST", "/want", {"blocks": over})
    assert r.status == 400 and "65536" in r.error, (r.status, r.error)
    # the most a call may name, in the worst order (descending, none adjacent): fast
    most = [[0, 2 * k, 2 * k + 1] for k in reversed(range(65536))]
    t0 = time.monotonic()
    r = await api.call(s, "POST", "/want", {"blocks": most})
    assert r.status == 200 and r.json == {"queued": 65536}, (r.status, r.error)
    assert time.monotonic() - t0 < 5


def test_rangeset_merge_equals_adding_one_by_one() -> None:
    rng = random.Random(7)
    for _ in range(200):
        base = [(a, a + rng.randint(0, 5)) for a in rng.sample(range(200), 20)]
        new = [(a, a + rng.randint(0, 9)) for a in rng.sample(range(220), 30)]
        one, bulk = RangeSet(base), RangeSet(base)
        one.update(new)
        bulk.merge(new)
        assert bulk == one


# -- 7. upload opens: batched inspection, at most 2 under way per user -----------------------------
async def test_at_most_two_opens_per_user_under_way(tmp_path: Path, api_for: Any) -> None:
    d = start_daemon(tmp_path / "d", {"alice": PERMS["rw"]})
    api = api_for(d, timeout=60)
    entries = [{"path": "", "kind": "dir", "mtime_ns": T0, "mode": 0o755}]
    entries += [entry(f"f{k}", size=1) for k in range(20000)]  # seconds to inspect
    bodies = [json.dumps({"direction": "upload", "path": f"/up{n}", "into_dir": False,
                          "entries": entries}).encode() for n in range(5)]
    replies = await asyncio.gather(*(api.open_raw("alice", b) for b in bodies))
    statuses = sorted(r.status for r in replies)
    assert 200 in statuses, {(r.status, r.error) for r in replies}
    busy = [r for r in replies if r.status == 429]
    assert busy and all("already opening" in r.error for r in busy), \
        {(r.status, r.error) for r in replies}


# -- 8. PUT with Content-Range is refused, not taken for the whole file --------------------------
@pytest.mark.parametrize("existing", [True, False])
def test_partial_put_is_refused(daemon_factory, tmp_path: Path, existing: bool) -> None:
    d = daemon_factory()
    target = d.docroots["alice"] / "f.bin"
    if existing:
        make_file(target, 5000)
    before = target.read_bytes() if existing else None
    frag = make_file(tmp_path / "frag", 100, seed=3)
    p = subprocess.run(["curl", "-sk", "-o", "-", "-w", "\n%{http_code}", "-T", str(frag),
                        "-H", "Content-Range: bytes 100-199/5000",
                        "-u", f"alice:{PASSWORDS['alice']}", d.url("/f.bin").replace("alice@", "")],
                       capture_output=True, text=True)
    body, status = p.stdout.rsplit("\n", 1)
    assert status == "400", p.stdout
    assert "Content-Range" in json.loads(body)["error"]
    assert (target.read_bytes() if existing else target.exists()) == (before if existing else False)


# -- 9. nested docroots: the outer user cannot reach the inner user's state folder ---------------
async def test_outer_user_cannot_reach_a_nested_users_state_folder(tmp_path: Path, api_for: Any) -> None:
    base = tmp_path / "d"
    base.mkdir()
    outer = base / "docroot" / "alice"
    d = Daemon(base, free_port(), free_port(), {"alice": outer, "bob": outer / "nest"})
    d.config_path.write_text(conf_xml(d, {"alice": PERMS["rw"], "bob": PERMS["rw"]}))
    d.start()
    api = api_for(d, timeout=60)
    # bob leaves a partial upload: his state folder (marked) holds a partial and a journal
    s = await api.open("bob", {"direction": "upload", "path": "/x.bin", "into_dir": False,
                               "entries": [entry()]})
    r = await api.call(s, "POST", "/plan", {"files": [{"file": 0, "action": "fresh"}]})
    assert r.status == 200, r.error
    state = outer / "nest" / ".fallback"
    assert (state / "README").is_file()
    journals = sorted(p.name for p in (state / "parts").iterdir())
    assert journals
    auth = {"Authorization": "Basic " + base64.b64encode(b"alice:alice-secret-pw").decode()}
    plain = f"http://127.0.0.1:{d.http_port}"

    async def req(method: str, path: str, data: bytes | None = None) -> int:
        async with api.http.request(method, plain + path, headers=auth, data=data) as resp:
            await resp.read()
            return resp.status

    assert await req("GET", "/nest/.fallback/parts/") == 403
    assert await req("GET", "/nest/.fallback/README") == 403
    assert await req("HEAD", "/nest/.fallback/README") == 403
    assert await req("GET", f"/nest/.fallback/parts/{journals[0]}") == 403
    assert await req("PUT", f"/nest/.fallback/parts/{journals[0]}", b"junk") == 403
    async with api.http.get(plain + "/nest/", headers=auth) as resp:
        assert ".fallback" not in (await resp.json())["entries"]
    # session paths: a download of it, an upload into it, an upload whose entries cross it
    for body in ({"direction": "download", "path": "/nest/.fallback"},
                 {"direction": "upload", "path": "/nest/.fallback/parts/y", "into_dir": False,
                  "entries": [entry()]},
                 {"direction": "upload", "path": "/nest", "into_dir": False,
                  "entries": [{"path": "", "kind": "dir", "mtime_ns": T0, "mode": 0o755},
                              {"path": ".fallback", "kind": "dir", "mtime_ns": T0, "mode": 0o755},
                              entry(".fallback/README")]}):
        r = await api.open_raw("alice", json.dumps(body).encode())
        assert r.status == 403, (body, r.status, r.error)
    assert sorted(p.name for p in (state / "parts").iterdir()) == journals


# -- 10. smaller ones -------------------------------------------------------------------------------
def test_upload_under_a_file_is_a_409_with_a_clear_message(daemon_factory, tmp_path: Path) -> None:
    d = daemon_factory('<file_system><overwrite>deny</overwrite></file_system>')
    make_file(d.docroots["alice"] / "file", 10)
    src = make_file(tmp_path / "x", 1000)
    rc, res, err = d.transfer(str(src), d.url("/file/x"), check=False)
    assert rc == 1 and res["ok"] is False
    assert res["error"] == "remote /file: a file, not a folder (cannot write /file/x)", res
    assert "500" not in d.log() and "Not a directory" not in d.log()


def test_failed_result_has_no_rate_without_bytes_and_no_verified(daemon_factory, tmp_path: Path) -> None:
    d = daemon_factory()
    make_file(d.docroots["alice"] / "file", 10)
    src = make_file(tmp_path / "x", 5 << 20)
    rc, res, err = d.transfer(str(src), d.url("/file/x"), check=False)
    assert rc == 1 and res["ok"] is False and res["sent_bytes"] == 0
    assert res["rate_mbps"] == 0 and res["bytes"] == 5 << 20
    assert "verified" in res and res["verified"] is None
    # a successful run: the rate is what it carried over its time
    rc, res, err = d.transfer(str(src), d.url("/y"))
    assert res["verified"] == "full" and res["sent_bytes"] == 5 << 20
    assert res["rate_mbps"] == pytest.approx(res["sent_bytes"] * 8 / 1e6 / res["seconds"], rel=0.01)
