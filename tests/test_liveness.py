"""A daemon session is alive while its client is heard on any path (issue 11 section 2).

A session whose client was killed is taken over after ``IDLE_TAKEOVER`` seconds
of silence (``test_concurrency``); a client that is only quiet on HTTP (a long
local phase, a UDP-only phase) must not be. Raw control calls against a real
daemon: one session holds a target and only sends keepalives; a second session
for the same target must get "another transfer is writing this file" for as
long as they come, and take it over once they stop.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fallback.sessions import IDLE_TAKEOVER, KEEPALIVE_INTERVAL, Session
from tests.conftest import Daemon
from tests.control_client import Api, Sess, entry, start_daemon

BUSY = "another transfer is writing this file"


@pytest.fixture(scope="module")
def ld(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("liveness") / "daemon", {"alice": (True, True)})
    yield d
    d.stop(signal.SIGKILL)


@pytest.fixture
async def api(ld: Daemon) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        yield Api(ld, http)


async def planned_upload(api: Api, name: str) -> tuple[Sess, Any]:
    s = await api.open("alice", {"direction": "upload", "path": f"/{name}", "into_dir": False,
                                 "name": "", "entries": [entry()], "overwrite": "always",
                                 "encrypt": False, "strong_pass": False})
    r = await api.call(s, "POST", "/plan", {"files": [{"file": 0, "action": "fresh"}]})
    return s, r


async def test_keepalives_keep_a_quiet_session_from_being_taken_over(ld: Daemon, api: Api) -> None:
    a, r = await planned_upload(api, "kept.bin")
    assert r.status == 200  # A holds the target's lock
    stop = asyncio.Event()
    answers: list[Any] = []

    async def keep_alive() -> None:  # all A does: no stream, no other call
        while not stop.is_set():
            got = await api.call(a, "POST", "/keepalive", {})
            answers.append((got.status, got.json))
            await asyncio.sleep(KEEPALIVE_INTERVAL)

    task = asyncio.ensure_future(keep_alive())
    try:
        await asyncio.sleep(IDLE_TAKEOVER + 1)  # quiet on every other call for longer than that
        t0 = time.monotonic()
        b, r = await planned_upload(api, "kept.bin")
        assert r.status == 409 and BUSY in r.error, (r.status, r.error)
        assert time.monotonic() - t0 >= IDLE_TAKEOVER  # it waited for A to turn idle: it did not
    finally:
        stop.set()
        await task
    assert answers and answers[0] == (200, {"idle_takeover": IDLE_TAKEOVER,
                                            "interval": KEEPALIVE_INTERVAL})
    # A falls silent (a client killed with -9): the next session takes the target over.
    c, r = await planned_upload(api, "kept.bin")
    assert r.status == 200, r.error
    log = ld.log()
    assert re.search(r"path=/kept\.bin .*result=error: taken over by a newer session", log)
    assert "Traceback" not in log
    for s in (b, c):
        await api.call(s, "DELETE", "", {})


async def test_keepalive_checks_the_token_and_needs_no_direction(ld: Daemon, api: Api) -> None:
    s = await api.open("alice", {"direction": "download", "path": "/"})
    got = await api.call(s, "POST", "/keepalive", {})
    assert got.status == 200 and got.json["idle_takeover"] == IDLE_TAKEOVER
    assert (await api.call(s, "POST", "/keepalive", {}, token="not-the-token")).status == 401
    assert (await api.call(s, "POST", "/keepalive", b"[1]")).status == 400
    await api.call(s, "DELETE", "", {})


def test_any_path_keeps_a_session_alive_and_the_log_line_lists_them(tmp_path: Path) -> None:
    with ThreadPoolExecutor(1) as pool:
        s = Session(id="0123456789abcdef", token="t", user="alice", peer="127.0.0.1",
                    direction="upload", docroot=tmp_path, root=tmp_path / "f", entries=[],
                    executor=pool)
    s.heard("https", "127.0.0.1", 0)
    s.last_activity -= IDLE_TAKEOVER + 1  # nothing heard for longer than the takeover delay
    assert s.idle
    s.heard("udp", "127.0.0.1:50123", 1400)  # a datagram, no HTTP request: alive
    assert not s.idle
    s.heard("udp", "127.0.0.1:50123", 1400)
    line = s.summary()
    assert "paths=https/127.0.0.1/0,udp/127.0.0.1:50123/2800 " in line
    assert "transport=https,udp " in line
    for k in range(40):  # a bounded number of paths, however many addresses appear
        s.heard("udp", f"10.0.0.{k}:1", 1)
    assert len(s.paths) <= 16
