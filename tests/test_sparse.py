"""Sparse files keep their holes (issue 11 section 4), both directions.

A 5 GiB file holding about 10 MB of data goes up to the daemon and back down
over real HTTPS streams: the blocks lying wholly in holes travel as hole frames
(no payload), so ``sent_bytes`` counts only the data blocks and ``hole_bytes``
the rest; each copy uses about as much disk as the source (``st_blocks``), has
the source's size and bytes and the same whole-file digest. A partial holding
hole blocks (inside the file and past its end) resumes without re-reading or
dropping them. A peer that does not read hole frames gets the zeros.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import Daemon
from transport.blocks.digest import block_digest, file_digest
from transport.blocks.receiver import FileReceiver
from transport.blocks.scheduler import Lease
from transport.blocks.session import BlockSink
from transport.blocks.source import FileSource, entry_for
from transport.blocks.sparse import Hole, ensure_zero, is_hole, zero_digest
from transport.errors import ProtocolError
from transport.http.framing import PieceHeader, parse_piece
from transport.http.units import frame

GiB = 1 << 30
MiB = 1 << 20
BS = 4 * MiB
SIZE = 5 * GiB
# (offset, length): one region block-aligned, one inside a block, one at the very end
REGIONS = [(0, 4 * MiB), (GiB + 123, 3_000_000), (SIZE - 3_000_000, 3_000_000)]
DATA_BLOCKS = 3  # blocks 0, 256 and 1279 hold data; 1,277 are holes


def make_sparse(path: Path, size: int = SIZE, regions: list[tuple[int, int]] = REGIONS) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for k, (off, n) in enumerate(regions):
            f.seek(off)
            f.write(os.urandom(n) if k % 2 == 0 else bytes([k + 1]) * n)
    return path


def disk_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def same_sparse_content(a: Path, b: Path, regions: list[tuple[int, int]] = REGIONS) -> None:
    """b has a's size and a's bytes in every data region, and reads as zeros wherever it
    holds data outside them (checked by walking b's data with SEEK_DATA/SEEK_HOLE)."""
    assert os.path.getsize(a) == os.path.getsize(b)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for off, n in regions:
            assert os.pread(fa.fileno(), n, off) == os.pread(fb.fileno(), n, off)
        fd, pos, size = fb.fileno(), 0, os.path.getsize(b)
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            assert end - start <= 2 * BS, "a data run longer than the blocks the source touches"
            chunk = os.pread(fd, end - start, start)
            inside = bytearray(chunk)
            for off, n in regions:  # blank out the source's data: the rest must be zeros
                lo, hi = max(off, start), min(off + n, end)
                if lo < hi:
                    inside[lo - start:hi - start] = bytes(hi - lo)
            assert not any(inside), f"non-zero bytes outside the source's data at {start}"
            pos = end


def source_root(path: Path) -> str:
    src = FileSource(path, entry_for(path, path.name, BS))
    try:
        return file_digest(BS, SIZE, (src.read_wire(b)[1] for b in range(src.layout.count)))
    finally:
        src.close()


@pytest.fixture
def sparse_src(tmp_path: Path) -> Path:
    src = make_sparse(tmp_path / "sparse.img")
    if disk_bytes(src) > 16 * MiB:
        pytest.skip("this file system does not keep holes")
    return src


def test_sparse_upload_and_download_keep_holes(daemon: Daemon, sparse_src: Path,
                                               tmp_path: Path) -> None:
    root = source_root(sparse_src)
    _, up, _ = daemon.transfer(str(sparse_src), daemon.url("/"), "--streams", "2")
    stored = daemon.docroots["alice"] / "sparse.img"
    assert up["ok"] and up["checksums"]["sparse.img"] == root
    assert up["sent_bytes"] <= DATA_BLOCKS * BS, up  # holes were not sent as zeros
    assert up["hole_bytes"] >= SIZE - DATA_BLOCKS * BS, up
    assert up["sent_bytes"] + up["hole_bytes"] == SIZE
    assert disk_bytes(stored) <= DATA_BLOCKS * BS + MiB, disk_bytes(stored)
    same_sparse_content(sparse_src, stored)

    out = tmp_path / "down"
    out.mkdir()
    _, down, _ = daemon.transfer(daemon.url("/sparse.img"), str(out), "--streams", "2")
    got = out / "sparse.img"
    assert down["ok"] and down["checksums"]["sparse.img"] == root
    assert down["sent_bytes"] <= DATA_BLOCKS * BS, down
    assert down["sent_bytes"] + down["hole_bytes"] == SIZE
    assert disk_bytes(got) <= DATA_BLOCKS * BS + MiB, disk_bytes(got)
    same_sparse_content(sparse_src, got)


def test_sparse_download_over_plain_http(daemon: Daemon, tmp_path: Path) -> None:
    """Over HTTP too, with a hole at the end of the file (the partial is shorter than
    the file until the commit extends it)."""
    regions = [(BS + 10, 1000)]
    src = make_sparse(daemon.docroots["alice"] / "tail.img", 64 * MiB, regions)
    _, down, _ = daemon.transfer(daemon.url("/tail.img", scheme="http"), str(tmp_path))
    got = tmp_path / "tail.img"
    assert down["sent_bytes"] == BS and down["hole_bytes"] == 15 * BS, down
    assert disk_bytes(got) <= BS + MiB
    same_sparse_content(src, got, regions)


def test_one_block_hole_files_among_bundled_small_files(daemon: Daemon, tmp_path: Path) -> None:
    """One-block files travel in bundles (transport.blocks.inline); one lying wholly in a
    hole goes as a hole frame beside its bundle instead, both ways: not sent as zeros,
    published with its size and no data on disk, the small files beside it whole."""
    src = tmp_path / "mixed"
    src.mkdir()
    for i in range(40):
        (src / f"small{i:02d}").write_bytes(bytes([i + 1]) * (1000 + i))
    for i in range(3):  # after the small files, in the same bundle as them
        with open(src / f"zhole{i}", "wb") as f:
            f.truncate(100_000 + i)  # one block, all hole
    if disk_bytes(src / "zhole0") > 0:
        pytest.skip("this file system does not keep holes")
    small = sum(1000 + i for i in range(40))
    holes = sum(100_000 + i for i in range(3))
    _, up, _ = daemon.transfer(str(src), daemon.url("/"), "--streams", "2")
    stored = daemon.docroots["alice"] / "mixed"
    assert up["ok"] and up["sent_bytes"] == small and up["hole_bytes"] == holes, up
    out = tmp_path / "down"
    out.mkdir()
    _, down, _ = daemon.transfer(daemon.url("/mixed", scheme="http"), str(out))
    assert down["ok"] and down["sent_bytes"] == small and down["hole_bytes"] == holes, down
    for copy in (stored, out / "mixed"):
        for i in range(40):
            assert (copy / f"small{i:02d}").read_bytes() == bytes([i + 1]) * (1000 + i)
        for i in range(3):
            assert os.path.getsize(copy / f"zhole{i}") == 100_000 + i
            assert disk_bytes(copy / f"zhole{i}") == 0
            assert not any((copy / f"zhole{i}").read_bytes())


def test_resume_keeps_hole_blocks_without_rereading(tmp_path: Path) -> None:
    """Hole blocks journaled by an interrupted run, inside the partial and past its end,
    are kept by the next run's re-verification (not dropped as a partial cut short),
    and the file commits sparse with the source's digest."""
    size = 12 * BS
    regions = [(3 * BS, BS)]  # block 3 holds data; 0-2 and 4-11 are holes
    src_path = make_sparse(tmp_path / "src.img", size, regions)
    entry = entry_for(src_path, "dst.img", BS)
    src = FileSource(src_path, entry)
    wire = [src.read_wire(b) for b in range(12)]
    assert [isinstance(d, Hole) for d, _ in wire] == [b != 3 for b in range(12)]
    root = file_digest(BS, size, (d for _, d in wire))
    target = tmp_path / "out" / "dst.img"
    target.parent.mkdir()

    async def feed(rec: FileReceiver, blocks: list[int]) -> None:
        with ThreadPoolExecutor(2) as pool:
            sink = BlockSink({0: rec}, pool)
            for b in blocks:
                data, digest = wire[b]
                await sink.piece(0, b, 0, data, digest)
            await sink.flush()
            assert sink.hole_bytes == BS * sum(1 for b in blocks if b != 3)

    first = FileReceiver(target, entry)
    asyncio.run(feed(first, [0, 1, 3, 8]))  # holes before, at and past the partial's end
    first.close()
    assert os.path.getsize(first.partial) == 4 * BS  # block 8 is past the end: not written

    again = FileReceiver(target, entry)
    assert again.verify_carried() == []  # nothing dropped
    assert sorted(again.have()) == [0, 1, 3, 8]
    asyncio.run(feed(again, [2, 4, 5, 6, 7, 9, 10, 11]))
    assert again.commit(root) == root
    assert os.path.getsize(target) == size
    assert disk_bytes(target) <= BS + 64 * 1024
    same_sparse_content(src_path, target, regions)
    src.close()


def test_hole_over_stale_bytes_is_zeroed(tmp_path: Path) -> None:
    """A hole block where the partial holds stale bytes (an unverified piece of an
    earlier attempt) reads as zeros afterwards; a real hole stays unallocated."""
    path = tmp_path / "p"
    with open(path, "wb") as f:
        f.truncate(4 * BS)
        f.seek(BS + 100)
        f.write(b"\xff" * 5000)
    fd = os.open(path, os.O_RDWR)
    try:
        assert is_hole(fd, 0, BS) and not is_hole(fd, BS, BS) and is_hole(fd, 5 * BS, BS)
        assert ensure_zero(fd, 0, BS) == 0  # a hole: nothing written
        assert ensure_zero(fd, BS, BS) > 0
        assert os.pread(fd, BS, BS) == bytes(BS)
    finally:
        os.close(fd)


def test_hole_frames_only_for_a_peer_that_reads_them() -> None:
    lease = Lease(id=1, file=1, block=2, offset=0, length=BS, path="p")
    digest = zero_digest(BS)
    head, body, hole = frame(lease, Hole(BS), digest, 2, True)
    assert hole and body == b"" and parse_piece(head, BS).hole
    assert parse_piece(head, BS).digest == digest == block_digest(bytes(BS))
    head, body, hole = frame(lease, Hole(BS), digest, 2, False)  # an older peer: the zeros
    assert not hole and bytes(body) == bytes(BS) and not parse_piece(head, BS).hole
    head, body, hole = frame(lease, Hole(BS), digest, 1, True)  # version 1 has no holes
    assert not hole and len(body) == BS


def test_malformed_hole_frames_are_refused() -> None:
    digest = zero_digest(BS)
    with pytest.raises(ValueError):
        PieceHeader(0, 0, 16, BS, digest, hole=True).pack()
    from transport.http.framing import FLAG_HOLE, MAGIC2, PIECE
    no_digest = PIECE.pack(MAGIC2, FLAG_HOLE, b"\0\0\0", 0, 0, 0, BS)
    with pytest.raises(ProtocolError, match="hole frame"):
        parse_piece(no_digest, BS)
    with pytest.raises(ProtocolError):  # more than the largest block
        parse_piece(PieceHeader(0, 0, 0, 2 * BS, digest, hole=True).pack(), BS)


# -- over UDP: hole pieces (datagram format version 2) --------------------------------

UDP_SIZE = 256 * MiB
# Not block-aligned: one extent inside block 1, one across blocks 25 and 26, one at the end
UDP_REGIONS = [(5 * MiB + 1234, 1_500_000), (102 * MiB + 7, 3_000_000),
               (UDP_SIZE - 1_000_000, 1_000_000)]
UDP_DATA_BLOCKS = 4  # blocks 1, 25, 26 and 63 hold data; 60 are holes


def _udp_bytes(log: str, direction: str) -> int:
    """The bytes the session's UDP path carried, from the daemon's session line."""
    m = re.search(rf"direction={direction} .*paths=\S*udp/127\.0\.0\.1:\d+/(\d+)", log)
    assert m, log
    return int(m.group(1))


def test_sparse_upload_and_download_keep_holes_over_udp(daemon_factory, tmp_path: Path
                                                         ) -> None:  # type: ignore[no-untyped-def]
    """256 MiB apparent, 5.5 MB of data in three extents (not block-aligned), both ways
    over ``--transport udp``: the hole blocks cross as hole pieces (``hole_bytes``), only
    the 4 data blocks as data (``sent_bytes``, and the bytes the daemon logs for the UDP
    path), each copy has the source's digest and takes about the data blocks' disk."""
    d = daemon_factory(udp=True)
    src = make_sparse(tmp_path / "sparse.img", UDP_SIZE, UDP_REGIONS)
    if disk_bytes(src) > 16 * MiB:
        pytest.skip("this file system does not keep holes")
    info = json.loads(urllib.request.urlopen(  # noqa: S310 (loopback, plain HTTP)
        f"http://127.0.0.1:{d.http_port}/.fallback/v1/info").read())
    assert "udp2" in info["features"]
    src_root = FileSource(src, entry_for(src, src.name, BS))
    try:
        root = file_digest(BS, UDP_SIZE, (src_root.read_wire(b)[1]
                                          for b in range(src_root.layout.count)))
    finally:
        src_root.close()
    data = UDP_DATA_BLOCKS * BS
    _, up, _ = d.transfer(str(src), d.url("/"), "--transport", "udp")
    stored = d.docroots["alice"] / "sparse.img"
    assert up["ok"] and up["transports"] == ["https", "udp"], up
    assert up["checksums"]["sparse.img"] == root
    assert up["sent_bytes"] == data and up["hole_bytes"] == UDP_SIZE - data, up
    assert disk_bytes(stored) <= data + MiB, disk_bytes(stored)
    same_sparse_content(src, stored, UDP_REGIONS)

    out = tmp_path / "down"
    out.mkdir()
    _, down, _ = d.transfer(d.url("/sparse.img"), str(out), "--transport", "udp")
    got = out / "sparse.img"
    assert down["ok"] and "udp" in down["transports"], down
    assert down["checksums"]["sparse.img"] == root
    assert down["sent_bytes"] == data and down["hole_bytes"] == UDP_SIZE - data, down
    assert disk_bytes(got) <= data + MiB, disk_bytes(got)
    same_sparse_content(src, got, UDP_REGIONS)
    d.stop()
    log = d.log()
    # what crossed the UDP path each way: the data blocks, not the holes' zeros
    assert _udp_bytes(log, "upload") == data and _udp_bytes(log, "download") == data, log


def test_sparse_file_encrypted_over_udp_sends_every_block(daemon_factory, tmp_path: Path
                                                          ) -> None:  # type: ignore[no-untyped-def]
    """As over HTTP(S): a source being encrypted is read whole (its holes' ciphertext is
    not zeros), so ``--encrypt`` sends every block and ``hole_bytes`` is 0; the envelope
    downloads and decrypts over UDP to the source's bytes."""
    d = daemon_factory(udp=True)
    size = 24 * MiB
    regions = [(6 * MiB + 5, 100_000)]
    src = make_sparse(tmp_path / "enc.img", size, regions)
    env = {"FALLBACK_FILEPASS": "correct horse battery staple"}
    _, up, _ = d.transfer(str(src), d.url("/"), "--transport", "udp", "--encrypt", env=env)
    assert up["hole_bytes"] == 0 and up["sent_bytes"] >= size, up
    out = tmp_path / "dec"
    out.mkdir()
    _, down, _ = d.transfer(d.url("/enc.img.fallback-env"), str(out) + "/", "--transport", "udp",
                            "--decrypt", env=env)
    assert down["hole_bytes"] == 0 and "udp" in down["transports"], down
    assert (out / "enc.img").read_bytes() == src.read_bytes()
