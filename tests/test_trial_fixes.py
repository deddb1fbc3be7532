"""Fixes for an outside tester's findings on the issue-10 work (security, integrity):
every defect kind here has a test that failed before its fix."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import PASSWORDS, Daemon, make_file
from tests.control_client import BS, PERMS, Api, start_daemon
from transport.blocks.digest import digest_path

MAX_DIGEST_BYTES = 64 << 20  # fallback.sessions.MAX_DIGEST_BYTES, as docs/protocol.md states it


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
@pytest.fixture
async def api_for() -> AsyncIterator[Any]:
    clients: list[aiohttp.ClientSession] = []

    def make(d: Daemon) -> Api:
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        clients.append(http)
        return Api(d, http)

    yield make
    for c in clients:
        await c.close()


def _sparse(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


async def test_digests_read_at_most_64_mib_per_call(tmp_path: Path, api_for: Any) -> None:
    d = start_daemon(tmp_path / "d", {"alice": PERMS["rw"]})
    size = 256 << 20  # 4096 blocks of 64 KiB
    _sparse(d.docroots["alice"] / "big", size)
    api = api_for(d)
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
    api = api_for(d)
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
