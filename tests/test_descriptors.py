"""Descriptor exhaustion and sources that change mid-transfer (issue 10).

Real daemons with a lowered ``RLIMIT_NOFILE`` (set with ``prlimit`` on the running
daemon), real sockets that stall, real files rewritten or truncated while the daemon
reads them. Linux only: descriptors are counted in ``/proc/PID/fd``.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import http.client
import json
import logging
import os
import resource
import shutil
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from fallback import listener
from fallback.listener import SniffingSite
from fallback.sources import SOURCE_WINDOW
from tests.conftest import PASSWORDS, Daemon, make_file, sha256
from tests.interrupt import wait_until
from tests.test_resume import rewrite_keeping_size, start_transfer, wait_progress
from transport.blocks.source import FileSource, SourceWindow, entry_for
from transport.errors import ErrorKind, ResourceExhausted, SourceChanged
from transport.http.framing import HEADER_SIZE

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="counts descriptors in /proc and uses prlimit")


# -- helpers -------------------------------------------------------------------------------------
def start(factory: Callable[..., Daemon], http_xml: str = "", extra_xml: str = "") -> Daemon:
    """A daemon whose ``<http_server>`` also holds ``http_xml``."""
    d = factory(extra_xml=extra_xml, start=False)
    d.write_config()
    text = d.config_path.read_text()
    d.config_path.write_text(text.replace("</http_server>", f"{http_xml}</http_server>", 1))
    return d.start()


def fds(pid: int) -> list[str]:
    """What each open descriptor of ``pid`` points to."""
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except FileNotFoundError:  # closed meanwhile
            pass
    return out


def open_under(pid: int, folder: Path) -> int:
    return sum(1 for target in fds(pid) if target.startswith(f"{folder}/"))


def set_nofile(pid: int, soft: int, hard: int | None = None) -> None:
    old_hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, old_hard if hard is None else hard))


def control(d: Daemon, method: str, path: str, body: dict[str, Any] | None = None, *,
            user: str = "alice", token: str | None = None) -> tuple[int, dict[str, Any]]:
    """One control call over plain HTTP on its own connection."""
    if token is not None:
        auth = f"Bearer {token}"
    else:
        auth = "Basic " + base64.b64encode(f"{user}:{PASSWORDS[user]}".encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", d.http_port, timeout=30)
    try:
        conn.request(method, f"/.fallback/v1{path}", body=json.dumps(body or {}),
                     headers={"Authorization": auth, "Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def files(root: Path, n: int, size: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"f{i:04d}.bin").write_bytes(bytes([i % 251]) * size)
    return root


def stalled_stream(d: Daemon, sid: str, token: str) -> socket.socket:
    """GET the session's blocks, read the response head and one chunk, then stop reading."""
    s = socket.create_connection(("127.0.0.1", d.http_port), timeout=30)
    s.sendall(f"GET /.fallback/v1/session/{sid}/blocks HTTP/1.1\r\nHost: x\r\n"
              f"Authorization: Bearer {token}\r\n\r\n".encode())
    head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 200 "), head[:200]
    return s


def connect_from(source: str, port: int) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


def closed_by_peer(s: socket.socket, within: float) -> bool:
    """True when the daemon closes ``s`` (EOF or reset) within ``within`` seconds."""
    s.settimeout(within)
    try:
        while s.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def info_status(port: int, source: str = "127.0.0.1") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", "/.fallback/v1/info")
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for s in opened:
        s.close()


# -- 1. a download session holds a window of descriptors, not one per file -----------------------
def test_unclosed_download_sessions_hold_a_window_and_others_still_download(
        daemon_factory: Callable[..., Daemon], tmp_path: Path,
        sockets: list[socket.socket]) -> None:
    """Three sessions of a 300-file folder, left unclosed under a 256-descriptor limit:
    each holds at most SOURCE_WINDOW files open, a fourth of the same user is refused
    (sessions_per_user_max), and another user's folder download still succeeds."""
    d = start(daemon_factory, "<sessions_per_user_max>3</sessions_per_user_max>")
    assert d.proc is not None
    pid = d.proc.pid
    mine = files(d.docroots["alice"] / "many", 300, 4096)
    theirs = files(d.docroots["bob"] / "many", 300, 4096)
    set_nofile(pid, 256, 256)
    for _ in range(3):
        status, opened = control(d, "POST", "/session", {"direction": "download", "path": "/many"})
        assert status == 200, opened
        assert len(opened["entries"]) == 301 and opened["skipped"] == []
        sid, token = opened["id"], opened["token"]
        status, queued = control(d, "POST", f"/session/{sid}/want",
                                 {"blocks": [[i, 0, 1] for i in range(1, 301)]}, token=token)
        assert (status, queued) == (200, {"queued": 300})
        sockets.append(stalled_stream(d, sid, token))
    status, refused = control(d, "POST", "/session", {"direction": "download", "path": "/many"})
    assert status == 429 and "sessions_per_user_max is 3" in refused["error"]
    wait_until(lambda: open_under(pid, mine) <= 3 * SOURCE_WINDOW, "windows to close files", 10)
    assert len(fds(pid)) < 150

    out = tmp_path / "out"
    rc, res, err = d.transfer(d.url("/many", user="bob"), str(out) + "/", "--no-fsync",
                              user="bob")
    assert (rc, res["ok"], res["files"], res["skipped_files"]) == (0, True, 300, {})
    assert sorted(p.name for p in (out / "many").iterdir()) == sorted(
        p.name for p in theirs.iterdir())
    assert sha256(out / "many" / "f0299.bin") == sha256(theirs / "f0299.bin")
    assert open_under(pid, theirs) <= SOURCE_WINDOW
    assert open_under(pid, mine) <= 3 * SOURCE_WINDOW
    assert "Too many open files" not in d.log()


# -- 2. out of descriptors: a failure, never an empty success ------------------------------------
def lowest_free_fds(pid: int, n: int) -> list[int]:
    used = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    free: list[int] = []
    k = 0
    while len(free) < n:
        if k not in used:
            free.append(k)
        k += 1
    return free


def wait_fds_stable(pid: int) -> None:
    last, since = sorted(os.listdir(f"/proc/{pid}/fd")), time.monotonic()
    deadline = since + 20
    while time.monotonic() - since < 0.6:
        assert time.monotonic() < deadline, "daemon descriptors never settled"
        time.sleep(0.05)
        now = sorted(os.listdir(f"/proc/{pid}/fd"))
        if now != last:
            last, since = now, time.monotonic()


def test_out_of_descriptors_fails_the_folder_download(daemon_factory: Callable[..., Daemon],
                                                      tmp_path: Path) -> None:
    """With one descriptor left (the client's connection takes it), listing the folder
    fails with EMFILE: the download fails with 503 and exit 1, it is not "ok, 0 files"."""
    d = daemon_factory()
    assert d.proc is not None
    pid = d.proc.pid
    files(d.docroots["alice"] / "few", 3, 1000)
    rc, res, _ = d.transfer(d.url("/few"), str(tmp_path / "warm") + "/", "--no-fsync")
    assert res["files"] == 3  # every code path warmed up (imports, cached credentials)
    wait_fds_stable(pid)
    first, second = lowest_free_fds(pid, 2)
    set_nofile(pid, second)  # only `first` can still be opened
    try:
        rc, res, err = d.transfer(d.url("/few"), str(tmp_path / "out") + "/", "--no-fsync",
                                  check=False, timeout=60)
    finally:
        set_nofile(pid, 4096)
    assert rc == 1, (res, err)
    assert res["ok"] is False and res["files"] == 0
    assert res["error"] == "server out of file descriptors, try again"
    assert err.strip().splitlines() == ["error: server out of file descriptors, try again"]
    assert not (tmp_path / "out" / "few").exists() or not any((tmp_path / "out" / "few").iterdir())
    wait_until(lambda: "EMFILE" in d.log(), "the daemon to log EMFILE")
    assert len([ln for ln in d.log().splitlines() if "out of file descriptors" in ln]) == 1
    # The shortage was the server's, and it is over: the same download now works.
    rc, res, _ = d.transfer(d.url("/few"), str(tmp_path / "out") + "/", "--no-fsync")
    assert (res["ok"], res["files"]) == (True, 3)


# -- 3. slow headers, idle keep-alive, connection limits -----------------------------------------
def test_slow_header_connections_are_closed_and_others_served(
        daemon_factory: Callable[..., Daemon], sockets: list[socket.socket]) -> None:
    d = start(daemon_factory, "<header_timeout>2</header_timeout>"
                              "<keepalive_timeout>2</keepalive_timeout>")
    t0 = time.monotonic()
    for _ in range(40):  # a partial request line and header, then nothing
        s = connect_from("127.0.0.2", d.http_port)
        s.sendall(b"GET / HTTP/1.1\r\nHost:")
        sockets.append(s)
    for i in range(20):  # TLS port: nothing at all, or half a ClientHello
        s = connect_from("127.0.0.2", d.https_port)
        if i % 2:
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00")
        sockets.append(s)
    keepalive = connect_from("127.0.0.1", d.http_port)
    sockets.append(keepalive)
    keepalive.sendall(b"GET /.fallback/v1/info HTTP/1.1\r\nHost: x\r\n\r\n")
    assert keepalive.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert info_status(d.http_port) == 200  # served while the others stall
    assert time.monotonic() - t0 < 1.5
    for s in [*sockets[:-1], keepalive]:
        assert closed_by_peer(s, max(0.1, t0 + 6 - time.monotonic()))
    assert time.monotonic() - t0 > 1.5  # by the timeout, not at once
    wait_until(lambda: "no complete request headers" in d.log(), "the slow-header log line", 5)
    assert info_status(d.http_port) == 200


def test_connections_are_bounded_per_address_and_in_total(
        daemon_factory: Callable[..., Daemon], sockets: list[socket.socket]) -> None:
    d = start(daemon_factory, "<connections_max>12</connections_max>"
                              "<connections_per_address_max>8</connections_per_address_max>")
    flood = [connect_from("127.0.0.2", d.http_port) for _ in range(10)]
    sockets.extend(flood)
    refused = [s for s in flood if closed_by_peer(s, 0.3)]
    assert len(refused) == 2  # eight are admitted, the rest closed at once
    assert info_status(d.http_port) == 200  # another address is still served
    more = [connect_from("127.0.0.3", d.https_port) for _ in range(6)]
    sockets.extend(more)
    assert len([s for s in more if closed_by_peer(s, 0.3)]) == 2  # 12 open in total
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        info_status(d.http_port)
    for s in flood:
        s.close()
    wait_until(lambda: _served(d.http_port), "a slot to free up", 10)
    log = d.log()
    assert "127.0.0.2 has 8 connections open (connections_per_address_max)" in log
    assert "12 connections open (connections_max)" in log


def _served(port: int) -> bool:
    try:
        return info_status(port) == 200
    except (ConnectionError, http.client.HTTPException):
        return False


def test_accept_out_of_descriptors_is_logged_once(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """EMFILE on accept(): the listener backs off and says so, once per period."""
    monkeypatch.setattr(listener, "_ACCEPT_RETRY_DELAY", 0.02)
    monkeypatch.setattr(listener, "limited", listener.RateLimitedLog(listener.log))
    caplog.set_level(logging.WARNING, logger="fallback.listener")

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def scenario() -> bytes:
        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app)
        await runner.setup()
        site = SniffingSite(runner, "127.0.0.1", 0, None)
        await site.start()
        client = socket.socket()
        client.setblocking(False)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        probe = os.open(os.devnull, os.O_RDONLY)
        os.close(probe)
        resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))  # no descriptor left
        try:
            assert client.connect_ex(("127.0.0.1", site.port)) in (0, errno.EINPROGRESS)
            await asyncio.sleep(0.6)  # about 30 failed accepts
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = await asyncio.wait_for(loop.sock_recv(client, 65536), 5)
        client.close()
        await runner.cleanup()
        return reply

    reply = asyncio.run(scenario())
    assert reply.startswith(b"HTTP/1.1 200 ")
    lines = [r.getMessage() for r in caplog.records if "accept failed" in r.getMessage()]
    assert len(lines) == 1 and "(EMFILE)" in lines[0], lines


# -- 4. streams_max ------------------------------------------------------------------------------
@pytest.mark.parametrize("query", ["", "?acks=1"])  # acks=1: a client that never acknowledges
async def test_streams_max_is_enforced(daemon_factory: Callable[..., Daemon], query: str) -> None:
    d = start(daemon_factory, "<streams_max>2</streams_max>",
              "<file_system><block_size>1M</block_size></file_system>")
    make_file(d.docroots["alice"] / "big.bin", 48 << 20, seed=3)
    base = f"http://127.0.0.1:{d.http_port}/.fallback/v1"
    basic = "Basic " + base64.b64encode(f"alice:{PASSWORDS['alice']}".encode()).decode()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/session", json={"direction": "download", "path": "/big.bin"},
                             headers={"Authorization": basic}) as r:
            opened = await r.json()
        sid, bearer = opened["id"], {"Authorization": f"Bearer {opened['token']}"}
        assert opened["streams_max"] == 2
        async with http.post(f"{base}/session/{sid}/want", json={"blocks": [[0, 0, 48]]},
                             headers=bearer) as r:
            assert r.status == 200
        # one after the other: under ``fair`` the second waits its turn, yet answers its
        # head at once (else this await held the first's reader and both stood still)
        streams = [await asyncio.wait_for(http.get(f"{base}/session/{sid}/blocks{query}",
                                                   headers=bearer), 10)
                   for _ in range(2)]
        assert [s.status for s in streams] == [200, 200]
        async with http.get(f"{base}/session/{sid}/blocks", headers=bearer) as third:
            assert third.status == 429
            assert "streams_max is 2" in (await third.json())["error"]
        got: list[int] = []
        # the two admitted streams were not disturbed; read together, as a client does (a
        # stream ends only once no other stream of the session holds unsent leases: one
        # read after the other would wait on the second's full socket)
        bodies = await asyncio.wait_for(asyncio.gather(*(s.read() for s in streams)), 30)
        for s, body in zip(streams, bodies, strict=True):
            while body:
                _, f, b, n = struct.unpack_from("!4sIQI", body)
                got.append(b)
                body = body[HEADER_SIZE + n:]
            s.release()
        assert sorted(got) == list(range(48))
        async with http.delete(f"{base}/session/{sid}", json={}, headers=bearer) as r:
            assert r.status == 200


# -- 5. a source that changes during a download --------------------------------------------------
SIZE = 40 << 20


@pytest.mark.parametrize("change", ["rewritten", "rewritten-same-mtime", "truncated"])
def test_source_changed_during_download_fails_cleanly(daemon_factory: Callable[..., Daemon],
                                                      tmp_path: Path, change: str) -> None:
    d = daemon_factory(extra_xml="<file_system><block_size>256K</block_size>"
                                 "<fsync>false</fsync></file_system>")
    assert d.proc is not None
    served = make_file(d.docroots["alice"] / "big.bin", SIZE, seed=1)
    target = tmp_path / "big.bin"
    proc = start_transfer(d, d.url("/big.bin"), str(target), "--streams", "1", "--no-fsync")
    wait_progress(proc, target, 4 << 20)
    d.proc.send_signal(signal.SIGSTOP)
    try:
        if change == "truncated":
            os.truncate(served, SIZE // 2)
        else:
            same = served.stat().st_mtime_ns if change == "rewritten-same-mtime" else None
            rewrite_keeping_size(served, seed=2, mtime_ns=same)
    finally:
        d.proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (out, err)
    res = json.loads(out.strip().splitlines()[-1])
    message = "big.bin: changed on the server during the transfer"
    assert res["ok"] is False and res["error"] == message
    assert err.strip().splitlines() == [f"error: {message}"]  # one line, no traceback
    assert not target.exists()
    wait_until(lambda: "result=error" in d.log(), "the session line")
    session_lines = [ln for ln in d.log().splitlines() if "direction=download" in ln]
    assert len(session_lines) == 1 and f"result=error: {message}" in session_lines[0]


# -- 6. the source itself: windowed descriptors, identity checks ---------------------------------
def test_file_sources_share_a_bounded_window(tmp_path: Path) -> None:
    folder = files(tmp_path / "src", 50, 3 * 4096)
    window = SourceWindow(4)
    sources = [FileSource(p, entry_for(p, p.name, 4096), window=window)
               for p in sorted(folder.iterdir())]
    assert open_under(os.getpid(), folder) == 0  # nothing opened before the first read
    for b in range(3):
        for s in sources:
            data, _ = s.read_block(b)
            assert data == s.path.read_bytes()[b * 4096:(b + 1) * 4096]
            assert open_under(os.getpid(), folder) <= 4
    assert sum(s.is_open for s in sources) == 4
    for s in sources:
        s.close()
    assert open_under(os.getpid(), folder) == 0


def test_file_source_sees_a_file_replaced_between_two_opens(tmp_path: Path) -> None:
    """Evicted, then reopened by name: another file with the same size and mtime put there
    by a rename is a change (its inode differs), not a continuation."""
    a, other = make_file(tmp_path / "a", 8 * 4096, seed=1), make_file(tmp_path / "b", 4096)
    src = FileSource(a, entry_for(a, "a", 4096), window=SourceWindow(1))
    src.read_block(0)
    replacement = make_file(tmp_path / "a.new", 8 * 4096, seed=2)
    shutil.copystat(a, replacement)
    os.replace(replacement, a)
    FileSource(other, entry_for(other, "b", 4096), window=src._window).read_block(0)  # evicts a
    assert not src.is_open
    with pytest.raises(SourceChanged, match="a: changed during the transfer"):
        src.read_block(1)


def test_file_source_out_of_descriptors_is_a_resource_error(tmp_path: Path) -> None:
    a = make_file(tmp_path / "a", 4096)
    src = FileSource(a, entry_for(a, "a", 4096))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.open(os.devnull, os.O_RDONLY)
    os.close(probe)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
    try:
        with pytest.raises(ResourceExhausted) as caught:
            src.read_block(0)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert (caught.value.kind, caught.value.resource) == (ErrorKind.EXHAUSTED, "EMFILE")
    assert src.read_block(0)[0] == a.read_bytes()
    src.close()
