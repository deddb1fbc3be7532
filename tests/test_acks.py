"""Leases and acknowledgements on both directions (issue 11 section 4).

The sending side of each direction (the daemon for downloads, the client for
uploads) leases blocks to its paths through ``transport.blocks.scheduler``;
the receiver's acknowledgements retire them and its failures bring them back.
A stream that dies gives its blocks, delivered ones included, to the other
streams at once: no commit round, no second ``want``. Raw control calls check
the messages; transfers through a TCP proxy that cuts one stream check the
engine end to end.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fallback.engine import Options, transfer_async
from tests.conftest import Daemon, free_port, make_file, sha256
from tests.control_client import BS, SIZE, Api, Sess, entry, frames, password, start_daemon
from transport.blocks.digest import block_digest
from transport.http.framing import PIECE_SIZE, PieceHeader, header_rest, parse_piece


@pytest.fixture(scope="module")
def ad(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("acks") / "daemon", {"alice": (True, True)})
    make_file(d.docroots["alice"] / "src.bin", SIZE, seed=5)
    yield d
    d.stop(signal.SIGKILL)


@pytest.fixture
async def api(ad: Daemon) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        yield Api(ad, http)


def pieces(body: bytes) -> list[tuple[int, int]]:
    """(file, block) of each version 2 frame of a download body."""
    out, pos = [], 0
    while pos < len(body):
        head = body[pos:pos + PIECE_SIZE]
        head += body[pos + PIECE_SIZE:pos + PIECE_SIZE + header_rest(head)]
        h = parse_piece(head, BS)
        out.append((h.file, h.block))
        pos += len(head) + h.length
    return out


async def download(api: Api) -> Sess:
    s = await api.open("alice", {"direction": "download", "path": "/src.bin"})
    r = await api.call(s, "POST", "/want", {"blocks": [[0, 0, 3]]})
    assert r.status == 200
    return s


# -- the messages ------------------------------------------------------------------------------------
async def test_upload_acks_list_the_blocks_journaled_and_failed(ad: Daemon, api: Api) -> None:
    s = await api.open("alice", {"direction": "upload", "path": "/up.bin", "into_dir": False,
                                 "name": "", "entries": [entry()], "overwrite": "always",
                                 "encrypt": False, "strong_pass": False})
    r = await api.call(s, "POST", "/acks", {})
    assert r.status == 200 and r.json == {"journaled": [], "failed": []}  # not planned yet
    await api.call(s, "POST", "/plan", {"files": [{"file": 0, "action": "fresh"}]})
    body, _ = frames(bytes(range(256)) * (SIZE // 256) + bytes(SIZE % 256))
    good0 = body[:52 + BS]  # a version 1 frame: block 0, whole
    bad = PieceHeader(0, 1, 0, BS, block_digest(b"not it")).pack() + bytes(BS)
    r = await api.call(s, "PUT", "/blocks", good0 + bad)
    assert r.status == 200
    await asyncio.sleep(0.8)  # the journal flush (0.5 s)
    r = await api.call(s, "POST", "/acks", {})
    assert r.json == {"journaled": [[0, 0, 1]], "failed": [[0, 1, 2]]}
    r = await api.call(s, "POST", "/acks", {})
    assert r.json == {"journaled": [], "failed": []}  # each reported once
    await api.call(s, "DELETE", "", {})


async def test_download_acks_retire_blocks_and_failures_bring_them_back(ad: Daemon,
                                                                        api: Api) -> None:
    s = await download(api)
    got = await api.call(s, "GET", "/blocks?frames=2&acks=1")
    assert pieces(got.body) == [(0, 0), (0, 1), (0, 2)]
    # the client journaled 0 and 2; block 1 failed its digest: it comes back, no want needed
    r = await api.call(s, "POST", "/acks", {"journaled": [[0, 0, 1], [0, 2, 3]],
                                           "failed": [[0, 1, 2]]})
    assert r.status == 200
    got = await api.call(s, "GET", "/blocks?frames=2&acks=1")
    assert pieces(got.body) == [(0, 1)]
    r = await api.call(s, "POST", "/acks", {"journaled": [[0, 1, 2]]})
    got = await api.call(s, "GET", "/blocks?frames=2&acks=1")
    assert got.status == 200 and got.body == b""  # everything acknowledged: nothing to send
    await api.call(s, "DELETE", "", {})


@pytest.mark.parametrize("body,message", [
    ({"journaled": [[0, 0, 4]]}, "out of range for file 0 (3 blocks)"),
    ({"journaled": [[7, 0, 1]]}, "unknown file index 7"),
    ({"failed": [[0, 2, 1]]}, "empty range"),
    ({"journaled": [[0, 0, 2**20]]}, "more than 65536"),
    ({"journaled": "all"}, "must be a list"),
])
async def test_bad_acks_are_refused(ad: Daemon, api: Api, body: dict[str, Any],
                                    message: str) -> None:
    s = await download(api)
    r = await api.call(s, "POST", "/acks", body)
    assert r.status == 400 and message in r.error, (r.status, r.error)
    await api.call(s, "DELETE", "", {})


async def test_a_dead_streams_blocks_go_to_the_next_stream_without_a_want(ad: Daemon,
                                                                          api: Api) -> None:
    """Before: blocks written into a stream that died were lost until the client's next
    round asked for them again. 16 MiB (256 blocks), more than the socket buffers hold:
    with three blocks (130 KB) the daemon had often written them all before the client
    closed, and a stream that ended well waits for its acknowledgements instead (the
    test failed one run in 3-10)."""
    n = 256
    if not (ad.docroots["alice"] / "big.bin").exists():
        make_file(ad.docroots["alice"] / "big.bin", n * BS, seed=6)
    s = await api.open("alice", {"direction": "download", "path": "/big.bin"})
    assert (await api.call(s, "POST", "/want", {"blocks": [[0, 0, n]]})).status == 200
    url = f"{api.base}/session/{s.id}/blocks?frames=2&acks=1"
    async with aiohttp.ClientSession() as other:  # its own connection, closed mid-body
        resp = await other.get(url, headers={"Authorization": f"Bearer {s.token}"})
        await resp.content.readexactly(PIECE_SIZE + 32 + 100)  # part of the first block
        resp.close()
    got: list[tuple[int, int]] = []
    for _ in range(40):  # the daemon notices the dead stream at its next write
        await asyncio.sleep(0.1)
        got += pieces((await api.call(s, "GET", "/blocks?frames=2&acks=1")).body)
        if len(got) >= n:
            break
    assert sorted(got) == [(0, b) for b in range(n)]
    await api.call(s, "DELETE", "", {})


async def test_a_client_that_does_not_acknowledge_gets_each_block_once(ad: Daemon,
                                                                       api: Api) -> None:
    """A version 1 client never acknowledges: what was written counts as received."""
    s = await download(api)
    assert len((await api.call(s, "GET", "/blocks")).body) == 3 * 52 + SIZE
    assert (await api.call(s, "GET", "/blocks")).body == b""
    r = await api.call(s, "POST", "/want", {"blocks": [[0, 1, 2]]})  # lost one: asks again
    assert r.json == {"queued": 1}
    assert len((await api.call(s, "GET", "/blocks")).body) == 52 + BS
    await api.call(s, "DELETE", "", {})


# -- end to end: one stream cut mid-transfer ----------------------------------------------------------
class CuttingProxy:
    """TCP proxy to a daemon that cuts, once, the first connection carrying more than
    ``cut_after`` bytes in one direction (a block stream), as a dead network path would."""

    def __init__(self, target_port: int, cut_after: int) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.port = free_port()
        self.cut = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> CuttingProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)
        done = asyncio.Event()

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            moved = 0
            try:
                while chunk := await r.read(1 << 16):
                    moved += len(chunk)
                    if moved > self.cut_after and not self.cut:
                        self.cut += 1
                        break
                    w.write(chunk)
                    await w.drain()
            except OSError:
                pass
            done.set()

        tasks = [asyncio.ensure_future(pipe(cr, sw)), asyncio.ensure_future(pipe(sr, cw))]
        await done.wait()
        for t in tasks:
            t.cancel()
        for w in (cw, sw):
            w.transport.abort()


@pytest.fixture
def big(tmp_path: Path) -> Path:
    return make_file(tmp_path / "big.bin", 24 << 20, seed=8)


@pytest.mark.parametrize("direction", ["upload", "download"])
async def test_a_stream_cut_mid_transfer_is_retried_and_its_blocks_resent_at_once(
        ad: Daemon, big: Path, tmp_path: Path, direction: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fallback.client")
    opts = Options(transport="http", user="alice", password=password("alice"), streams=3,
                   block_size=256 << 10, fsync=False)
    name = f"cut-{direction}.bin"
    async with CuttingProxy(ad.http_port, 4 << 20) as proxy:
        url = f"http://alice@127.0.0.1:{proxy.port}/{name}"
        if direction == "upload":
            res = await transfer_async(str(big), url, opts)
            out = ad.docroots["alice"] / name
        else:
            (ad.docroots["alice"] / name).write_bytes(big.read_bytes())
            out = tmp_path / "back.bin"
            res = await transfer_async(url, str(out), opts)
    assert proxy.cut == 1  # one stream really was cut
    assert res.ok and sha256(out) == sha256(big)
    log = caplog.text
    assert "lost (" in log and "retry 1 in" in log, log  # the path manager's signal and backoff
    # no commit round and no second want: the cut stream's blocks went back to the others
    assert "still miss" not in log and "asking again" not in log, log


async def test_bytes_delivered_again_by_another_path_count_once(tmp_path: Path) -> None:
    """Before: ``sent_bytes`` counted every delivery; a small upload whose bundle was on
    the HTTPS stream when the transfer moved to UDP said "4 B (8 B sent)" (trial). A
    lease delivered again after its path died counts in ``resent_bytes``."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.conftest import make_file
    from transport.blocks.sender import BlockSender
    from transport.blocks.source import FileSource, entry_for
    p = make_file(tmp_path / "f.bin", 3 * 65536, seed=5)
    sender = BlockSender({0: FileSource(p, entry_for(p, "", 65536))}, ThreadPoolExecutor(1))
    sender.sched.set_path("https", sender.timing)
    sender.sched.set_path("udp", sender.timing)
    sender.add_ranges([(0, 0, 3)])
    progress: list[int] = []
    sender.on_progress = lambda f, n: progress.append(n)
    first = sender.lease("https")
    assert first is not None
    sender.delivered(first)
    assert sender.drop_path("https") == 1  # it died before the receiver had the block
    again = sender.lease("udp")
    assert again is not None and (again.file, again.block) == (first.file, first.block)
    sender.delivered(again)
    assert (sender.sent_bytes, sender.resent_bytes) == (first.length, first.length)
    assert sum(progress) == first.length
    rest = [sender.lease("udp") for _ in range(2)]
    for lease in rest:
        assert lease is not None
        sender.delivered(lease)
    assert sender.sent_bytes == 3 * 65536 and sum(progress) == 3 * 65536
