"""Many small files (issue 11, section 5): bundles, group commit, bounded descriptors, resume.

Real daemons and real CLI subprocesses on loopback, real files. One-block files travel in
bundle frames and are published in groups (``transport.blocks.inline``); these tests hold
the properties that design promises: the tree arrives whole both ways, under a descriptor
limit far below the file count, encrypted too, mixed with multi-block files; a killed
transfer resumes without sending committed files again; a bundle item whose digest does
not match is never published.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PASSWORDS, Daemon, make_file, sha256
from transport.blocks.digest import block_digest
from transport.blocks.inline import InlineTarget, commit_group
from transport.blocks.manifest import FileEntry
from transport.blocks.modes import file_mode
from transport.blocks.scheduler import Lease
from transport.blocks.sink import MAX_BLOCK_FAILURES, BlockSink
from transport.blocks.sparse import Hole, zero_digest
from transport.blocks.statedir import StateDir
from transport.errors import IntegrityError, ProtocolError
from transport.http.framing import (
    BUNDLE,
    ITEM_SIZE,
    MAGIC_BUNDLE,
    MAX_BUNDLE_ITEMS,
    BundleItem,
    pack_bundle,
    parse_bundle,
    parse_bundle_header,
    parse_piece,
)
from transport.http.units import unit_frame

PASSPHRASE = "correct horse battery staple 42!"
UPLOAD_CLIENT_BOUND = 540 * 1024
DAEMON_BOUND = 420 * 1024
DOWNLOAD_CLIENT_BOUND = 480 * 1024
"""KiB: the peaks of each end for 100,000 x 1 KiB, with room: guards against growth.
The upload client's bound is 1.7x its solo figure: inside the whole CI suite on a loaded
machine it peaked at 452 MiB (3.13, 2026-12-02) against 315-326 alone (the download
client's CI peaks ran 1.7-1.8x its solo figure too); 540 still fails the 574 MiB of before.

Measured on 3.11, one test at a time on a shared 2-core machine (load 2-7), before and
after the per-file memory work of issue 11 (same machine, same day): upload client 574
-> 315-326 MiB, daemon on the upload 313 -> 287-303 MiB; download client 248 -> 236-243 MiB,
daemon on the download 390 -> 279 MiB. The goal is 300 MB (286 MiB) at each end: the
download client and the daemon on a download meet it; the upload client (330-342 MB) and
the daemon on an upload (301-318 MB) are still above it, by up to 15%.

What went (tracemalloc at 30,000 files, upload client): the commit answer for every file
parsed whole (~2 KB a file above the steady state, the old peak: ``/commit`` now goes
in calls of ``COMMIT_BATCH`` files); request bodies built as dicts, str and bytes at
once (``fallback.jsonbody``: a slice at a time; also the daemon's open answers); three
``RangeSet``s per file in the scheduler (``FileSets``: an int for a prefix, nothing for
an empty set); a ``RangeSet`` per file in the plan answer (shared when equal); a
``Path`` per file (computed from the entry when asked); up to four copies of each
display name (interned); a digest dict per file (one dict keyed by (file, block)).

What is left, per file: the manifest entry, the ``FileSource`` (lock, stat identity,
layout), the result's names and checksums (the output), progress counters, scheduler
dict entries; and the JSON answers the protocol sends in one piece, parsed whole (the
open answer's target states: 34 MB of dicts and 16 MB of states at 100,000 files; the
plan answer: 27 MB of dicts, measured alone), the likely peak of the upload client now
(the whole transfer was not profiled again after the last changes).
Going under 300 MB at every end needs those answers streamed or paged.

The bounds keep room for a loaded CI machine: inside the whole suite on CI the download
client once peaked at 433 MiB (3.13) and 449 MiB (3.11) against 248-274 MiB alone, a
cause not found yet (glibc arenas of the I/O threads are a suspect), so its bound stays
at 480 MiB; the other two are about 1.35 x what was measured alone."""


# -- helpers -------------------------------------------------------------------------------------
def make_tree(root: Path, n: int, size: int, per_folder: int = 1000) -> Path:
    """``n`` files of ``size`` distinct bytes each, ``per_folder`` per sub-folder."""
    root.mkdir(parents=True)
    for i in range(n):
        d = root / f"d{i // per_folder:03d}"
        if i % per_folder == 0:
            d.mkdir()
        (d / f"f{i:06d}").write_bytes(i.to_bytes(8, "big") * (size // 8) + b"x" * (size % 8))
    return root


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (state folders excluded)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".fallback"]
        for f in filenames:
            p = Path(dirpath, f)
            out[str(p.relative_to(root))] = sha256(p)
    return out


def count_files(root: Path) -> int:
    n = 0
    for _, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".fallback"]
        n += len(filenames)
    return n


def limited(nofile: int) -> Any:
    """``preexec_fn`` capping the child's open files (soft and hard: the CLI lifts its soft
    limit to the hard one)."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    return apply


def run_cli(d: Daemon, src: str, dst: str, *opts: str, nofile: int | None = None,
            env: dict[str, str] | None = None, timeout: float = 600
            ) -> tuple[int, dict[str, Any], str, int]:
    """``fallback transfer --json``: (exit code, result, stderr, peak RSS in KiB)."""
    e = {**os.environ, "FALLBACK_PASSWORD": PASSWORDS["alice"], **(env or {})}
    with open(os.devnull, "rb") as devnull, \
            __import__("tempfile").TemporaryFile("w+") as out, \
            __import__("tempfile").TemporaryFile("w+") as err:
        p = subprocess.Popen(d.cli_args("transfer", src, dst, "--json", "-q", *opts),
                             stdin=devnull, stdout=out, stderr=err, text=True, env=e,
                             preexec_fn=limited(nofile) if nofile else None)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                p.kill()
                raise AssertionError("transfer timed out")
            time.sleep(0.05)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        lines = out.read().strip().splitlines()
        result = json.loads(lines[-1]) if lines else {}
        return p.returncode, result, err.read(), usage.ru_maxrss


def cap_daemon(d: Daemon, nofile: int) -> None:
    assert d.proc is not None
    resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE, (nofile, nofile))


def daemon_peak_rss_kib(d: Daemon) -> int:
    assert d.proc is not None
    text = Path(f"/proc/{d.proc.pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1))  # type: ignore[union-attr]


# -- the bundle frame ----------------------------------------------------------------------------
def test_bundle_frame_round_trip_and_refusals() -> None:
    items = [BundleItem(7, b"a" * 10, b"\1" * 32), BundleItem(9, b"", b"\2" * 32),
             BundleItem(12, b"bc", b"\3" * 32)]
    frame = b"".join(pack_bundle(items))
    head, body = frame[:BUNDLE.size], frame[BUNDLE.size:]
    count, length = parse_bundle_header(head, 100)
    assert (count, length) == (3, len(body)) and head[:4] == MAGIC_BUNDLE
    got = parse_bundle(body, count, 100)
    assert [(i.file, bytes(i.data), i.digest) for i in got] == \
        [(i.file, i.data, i.digest) for i in items]
    with pytest.raises(ProtocolError, match="reserved"):
        parse_bundle_header(head[:5] + b"\1" + head[6:], 100)
    with pytest.raises(ProtocolError, match="files"):
        parse_bundle_header(BUNDLE.pack(MAGIC_BUNDLE, b"\0" * 4, MAX_BUNDLE_ITEMS + 1, 0,
                                        b"\0" * 12), 100)
    with pytest.raises(ProtocolError, match="exceeds"):  # more than count items could hold
        parse_bundle_header(BUNDLE.pack(MAGIC_BUNDLE, b"\0" * 4, 1, ITEM_SIZE + 101,
                                        b"\0" * 12), 100)
    with pytest.raises(ProtocolError, match="do not fill"):
        parse_bundle(body + b"z", count, 100)
    with pytest.raises(ProtocolError, match="bad size"):
        parse_bundle(body, count, 5)  # an item larger than the largest block


def _entry(name: str, data: bytes) -> FileEntry:
    return FileEntry(name, "file", size=len(data), mtime_ns=1_600_000_000 * 10**9, mode=0o640,
                     block_size=1 << 16)


def test_a_late_duplicate_bundle_on_a_new_stream_is_dropped_not_refused(tmp_path: Path) -> None:
    """Before: a stream whose first frame came after the sink's only file was published
    bounded frames by the files left (none: 0 bytes) and refused the duplicate bundle,
    "bundle of 1274 bytes exceeds the limit": a 1.2 kB upload failed one run in 16."""
    root = tmp_path / "root"
    root.mkdir()
    data = os.urandom(1234)
    frame = b"".join(pack_bundle([BundleItem(0, data, block_digest(data))]))
    head, body = frame[:BUNDLE.size], frame[BUNDLE.size:]

    async def run() -> None:
        with ThreadPoolExecutor(2) as pool:
            sink = BlockSink({}, pool, inline={0: InlineTarget(root / "f", _entry("f", data))},
                             state=StateDir(root), fsync=False)
            assert await sink.bundle([(0, data, block_digest(data))]) == len(data)  # stream 1
            # stream 2 starts now, as receive_blocks does: the bound, then the frame
            n, length = parse_bundle_header(head, sink.max_block())
            items = parse_bundle(body, n, sink.max_block())
            assert await sink.bundle([(i.file, i.data, i.digest) for i in items]) == 0
            assert sink.duplicates == 1 and (root / "f").read_bytes() == data

    asyncio.run(run())


def test_pieces_of_a_file_published_by_bundle_are_late_duplicates(tmp_path: Path) -> None:
    """Before: a one-block file published in a bundle (an HTTP stream) before any piece
    had built the sink's assembler was unknown to it, and its pieces arriving later over
    UDP were "unknown file index 0": the daemon closed the UDP path (an upload under
    --no-fallback failed one run in 15-25; under auto it fell back to HTTPS, trial)."""
    root = tmp_path / "root"
    root.mkdir()
    data = os.urandom(1234)

    async def run() -> None:
        with ThreadPoolExecutor(2) as pool:
            sink = BlockSink({}, pool, inline={0: InlineTarget(root / "f", _entry("f", data))},
                             state=StateDir(root), fsync=False)
            assert await sink.bundle([(0, data, block_digest(data))]) == len(data)
            assert await sink.piece(0, 0, 0, data[:600], block_digest(data)) == 0
            assert await sink.piece(0, 0, 600, data[600:]) == 0
            assert sink.duplicates == 2 and (root / "f").read_bytes() == data
            with pytest.raises(ProtocolError, match="unknown file index 7"):
                await sink.piece(7, 0, 0, data[:10])  # a file the session never had

    asyncio.run(run())


def test_pieces_of_a_file_whose_bundle_is_being_committed_are_dropped(tmp_path: Path,
                                                                       monkeypatch) -> None:
    """Before: while a bundle's group was committing its one-block file (out of the sink's
    inline files, not yet published), a piece of that file over UDP or HTTPS was "unknown
    file index 0": the UDP path closed, the HTTPS stream was refused, and a 1 MB upload
    failed (test_auto_chooses_udp, once in a run of the UDP tests). If the group then
    fails, the file is back and its pieces are taken."""
    from transport.blocks import sink as sink_mod
    root = tmp_path / "root"
    root.mkdir()
    data = os.urandom(1234)
    digest = block_digest(data)
    real = sink_mod.commit_group
    during: list[int] = []

    async def run() -> None:
        with ThreadPoolExecutor(2) as pool:
            sink = BlockSink({}, pool, inline={0: InlineTarget(root / "f", _entry("f", data))},
                             state=StateDir(root), fsync=False)
            loop = asyncio.get_running_loop()

            def committing(*args: Any, **kw: Any) -> Any:  # a piece arrives meanwhile
                fut = asyncio.run_coroutine_threadsafe(sink.piece(0, 0, 0, data[:600], digest),
                                                       loop)
                during.append(fut.result(10))
                return real(*args, **kw)

            monkeypatch.setattr(sink_mod, "commit_group", committing)
            assert await sink.bundle([(0, data, digest)]) == len(data)
            assert during == [0] and sink.duplicates == 1
            assert (root / "f").read_bytes() == data

            # A group that fails (a bad digest) puts the file back, after the assembler
            # was built without it (by another file's piece meanwhile): its pieces are taken.
            other = os.urandom(99)
            sink2 = BlockSink({}, pool, inline={0: InlineTarget(root / "g", _entry("g", data)),
                                                1: InlineTarget(root / "h", _entry("h", other))},
                              state=StateDir(root), fsync=False)

            def failing(*args: Any, **kw: Any) -> Any:
                fut = asyncio.run_coroutine_threadsafe(
                    sink2.piece(1, 0, 0, other, block_digest(other)), loop)
                during.append(fut.result(10))
                return real(*args, **kw)

            monkeypatch.setattr(sink_mod, "commit_group", failing)
            assert await sink2.bundle([(0, data, bytes(32))]) == 0  # its digest fails
            assert await sink2.piece(0, 0, 0, data[:10], digest) == 0
            assert await sink2.piece(0, 0, 10, data[10:]) == len(data)  # taken and verified

    asyncio.run(run())


def test_a_group_published_while_its_stream_is_cut_is_still_counted(tmp_path: Path) -> None:
    """Before: a download stream cancelled (the switch to UDP) while its bundle's group
    was being written left the files published but never counted: "1.2 kB already
    there, nothing sent" for a fresh download, one run in four."""
    import threading

    root = tmp_path / "root"
    root.mkdir()
    data = os.urandom(1234)
    started, release = threading.Event(), threading.Event()

    async def run() -> None:
        with ThreadPoolExecutor(2) as pool:
            sink = BlockSink({}, pool, inline={0: InlineTarget(root / "f", _entry("f", data))},
                             state=StateDir(root), fsync=False)
            counted: list[tuple[int, int]] = []
            sink.on_progress = lambda f, n: counted.append((f, n))
            take = sink._take_bundle

            def slow(items: Any) -> Any:  # the group is being written when the cut comes
                started.set()
                release.wait(10)
                return take(items)

            sink._take_bundle = slow  # type: ignore[method-assign]
            stream = asyncio.ensure_future(sink.bundle([(0, data, block_digest(data))]))
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
            stream.cancel()
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await stream
            for _ in range(100):
                if counted:
                    break
                await asyncio.sleep(0.05)
            assert (root / "f").read_bytes() == data
            assert counted == [(0, len(data))] and sink.received_bytes == len(data)

    asyncio.run(run())


def test_a_hole_in_a_bundle_goes_as_a_hole_frame_or_as_zeros() -> None:
    """A one-block file lying in a hole is never a bundle item for a peer that reads hole
    frames (it follows the bundle as FBK2 flag 0x02); for one that does not, its zeros
    are a bundle item like any other."""
    leases = [Lease(1, "p", 0, 0, 0, 5), Lease(2, "p", 1, 0, 0, 7)]
    got = [(b"hello", block_digest(b"hello")), (Hole(7), zero_digest(7))]
    f = unit_frame(leases, True, got, 2, True)
    assert f.holes == [False, True] and f.payload == 5
    body = b"".join(f.buffers)
    n, length = parse_bundle_header(body[:28], 1 << 16)
    items = parse_bundle(body[28:28 + length], n, 1 << 16)
    assert [(it.file, bytes(it.data)) for it in items] == [(0, b"hello")]
    h = parse_piece(body[28 + length:], 1 << 16)
    assert (h.file, h.hole, h.length, h.digest) == (1, True, 7, zero_digest(7))
    f = unit_frame(leases, True, got, 2, False)  # an older peer: the zeros
    assert f.holes == [False, False] and f.payload == 12
    body = b"".join(f.buffers)
    n, length = parse_bundle_header(body[:28], 1 << 16)
    assert [bytes(it.data) for it in parse_bundle(body[28:], n, 1 << 16)] == [b"hello", bytes(7)]
    assert len(body) == 28 + length


def test_bundle_item_with_a_corrupted_digest_is_never_published(tmp_path: Path) -> None:
    """A bad item leaves its file missing and asked again; the rest of the group lands."""
    root = tmp_path / "root"
    root.mkdir()
    good, bad = b"good bytes" * 100, b"bad bytes" * 100
    inline = {0: InlineTarget(root / "good", _entry("good", good)),
              1: InlineTarget(root / "bad", _entry("bad", bad))}

    async def run() -> None:
        with ThreadPoolExecutor(2) as pool:
            sink = BlockSink({}, pool, inline=dict(inline), state=StateDir(root), fsync=False)
            sink.track_acks()
            wrong = block_digest(b"something else")
            n = await sink.bundle([(0, good, block_digest(good)), (1, bad, wrong)])
            assert n == len(good)
            assert (root / "good").read_bytes() == good
            assert (root / "good").stat().st_mtime_ns == 1_600_000_000 * 10**9
            assert not (root / "bad").exists()
            assert sink.failed == 1 and sink.missing() == [(1, 0, 1)]
            journaled, rejected = sink.take_acks()
            assert journaled == [(0, 0)] and rejected == [(1, 0)]
            # A late duplicate of a published file is counted and dropped.
            await sink.bundle([(0, good, block_digest(good))])
            assert sink.duplicates == 1
            # The same corruption every time: the session fails instead of looping.
            with pytest.raises(IntegrityError, match="failed its digest"):
                for _ in range(MAX_BLOCK_FAILURES):
                    await sink.bundle([(1, bad, wrong)])
            assert not (root / "bad").exists()
            assert not list((root / ".fallback" / "parts").iterdir())
            with pytest.raises(ProtocolError, match="unknown file"):
                await sink.bundle([(5, good, block_digest(good))])
            await sink.bundle([(1, bad, block_digest(bad))])
            assert (root / "bad").read_bytes() == bad and sink.complete()

    asyncio.run(run())


def test_a_group_creates_partials_with_their_mode_and_truncates_a_stale_one(
        tmp_path: Path) -> None:
    """Each file gets its sender's mode less set-id bits and the umask (now given to
    ``open``, no ``fchmod``); a partial a killed group left behind, larger and with another
    mode, is truncated and given the mode, not published with its old tail."""
    root = tmp_path / "root"
    root.mkdir()
    state = StateDir(root)
    state.ensure()
    data = b"new bytes" * 10
    stale = state.partial(root / "b")
    stale.write_bytes(b"old" * 1000)
    stale.chmod(0o600)
    entries = {0: FileEntry("a", "file", size=len(data), mtime_ns=1_600_000_000 * 10**9,
                            mode=0o4755, block_size=1 << 16),
               1: FileEntry("b", "file", size=len(data), mtime_ns=1_600_000_000 * 10**9,
                            mode=0o664, block_size=1 << 16)}
    result = commit_group([(i, InlineTarget(root / e.path, e), data, block_digest(data))
                           for i, e in entries.items()], state, fsync=False, replace=True)
    assert sorted(d.file for d in result.done) == [0, 1] and not result.errors
    for e in entries.values():
        st = (root / e.path).stat()
        assert (root / e.path).read_bytes() == data
        assert stat.S_IMODE(st.st_mode) == file_mode(e.mode)
        assert st.st_mtime_ns == e.mtime_ns
    assert stat.S_IMODE((root / "a").stat().st_mode) & 0o7000 == 0
    assert not list(state.parts.iterdir())


def test_a_sinks_groups_are_committed_one_at_a_time(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``serial_groups`` (the daemon's upload sinks), bundles arriving together (four
    streams) are committed one group after another, never two groups of one session at
    once; every file lands."""
    import transport.blocks.sink as sink_module
    root = tmp_path / "root"
    root.mkdir()
    files = {i: f"bytes of file {i}".encode() * 50 for i in range(40)}
    inline = {i: InlineTarget(root / f"f{i}", _entry(f"f{i}", d)) for i, d in files.items()}
    running, most = 0, 0
    real = sink_module.commit_group

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        time.sleep(0.02)  # long enough for the other bundles to be waiting
        try:
            return real(*args, **kwargs)
        finally:
            running -= 1

    monkeypatch.setattr(sink_module, "commit_group", counting)

    async def run() -> None:
        with ThreadPoolExecutor(4) as pool:
            sink = BlockSink({}, pool, inline=dict(inline), state=StateDir(root), fsync=False,
                             serial_groups=True)
            got = await asyncio.gather(*(sink.bundle(
                [(i, files[i], block_digest(files[i])) for i in range(k, k + 10)])
                for k in range(0, 40, 10)))
            assert sum(got) == sum(len(d) for d in files.values())
            assert sink.complete()

    asyncio.run(run())
    assert most == 1
    assert all((root / f"f{i}").read_bytes() == d for i, d in files.items())


# -- end to end ------------------------------------------------------------------------------------
def test_21000_files_both_ways_under_1024_descriptors(daemon: Daemon, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "many", 21_000, 200, per_folder=3000)
    cap_daemon(daemon, 1024)
    rc, res, err, _ = run_cli(daemon, str(src), daemon.url("/", scheme="http"),
                              "--no-fsync", nofile=1024)
    assert rc == 0, err
    assert res["files"] == 21_000 and res["verified"]
    up = daemon.docroots["alice"] / "many"
    assert tree_digest(up) == tree_digest(src)
    dst = tmp_path / "down"
    dst.mkdir()
    rc, res, err, _ = run_cli(daemon, daemon.url("/many", scheme="http"), f"{dst}/",
                              "--no-fsync", nofile=1024)
    assert rc == 0, err
    assert res["files"] == 21_000 and len(res["checksums"]) == 21_000
    assert tree_digest(dst / "many") == tree_digest(src)
    assert not (dst / ".fallback").exists()
    assert "Too many open files" not in daemon.log()


def _kill_when(proc: subprocess.Popen[str], pred: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"transfer ended (rc={proc.returncode}) before the kill")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the transfer made no progress to interrupt")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _settled(count: Any, quiet: float = 1.0, timeout: float = 30) -> int:
    """``count()`` once it has not changed for ``quiet`` seconds (the daemon finished the
    bundles it had received when the client died)."""
    last, since = count(), time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.1)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
    return int(last)


def published(root: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (inode, ctime) of every file under ``root``: a file published
    again (renamed over, rewritten, even touched) gets a new inode or a new ctime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".fallback"]
        for f in filenames:
            st = os.lstat(os.path.join(dirpath, f))
            out[os.path.relpath(os.path.join(dirpath, f), root)] = (st.st_ino, st.st_ctime_ns)
    return out


def _killed_upload_resumes(daemon: Daemon, tmp_path: Path, n: int, size: int) -> None:
    src = make_tree(tmp_path / "tree", n, size)
    up = daemon.docroots["alice"] / "tree"
    e = {**os.environ, "FALLBACK_PASSWORD": PASSWORDS["alice"]}
    proc = subprocess.Popen(daemon.cli_args("transfer", str(src), daemon.url("/", scheme="http"),
                                            "--json", "-q", "--no-fsync"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, env=e)
    _kill_when(proc, lambda: up.exists() and count_files(up) >= n // 4)
    committed = _settled(lambda: count_files(up))
    assert n // 4 <= committed < n, "the kill came too late to test a resume"
    before = published(up)
    rc, res, err, _ = run_cli(daemon, str(src), daemon.url("/", scheme="http"), "--no-fsync")
    assert rc == 0, err
    assert tree_digest(up) == tree_digest(src)
    # Committed files were not sent again: only the rest went over the wire, and every
    # file published before the kill is the same inode, untouched, after the re-run.
    assert res["sent_bytes"] <= (n - committed) * size, (res["sent_bytes"], committed)
    assert res["sent_bytes"] + res["skipped_bytes"] == res["bytes"] == n * size
    after = published(up)
    assert {k: after[k] for k in before} == before


def test_killed_20000_file_upload_resumes_without_resending_committed(
        daemon: Daemon, tmp_path: Path) -> None:
    _killed_upload_resumes(daemon, tmp_path, 20_000, 512)


@pytest.mark.slow
def test_killed_100000_file_upload_resumes_without_resending_committed(
        daemon: Daemon, tmp_path: Path) -> None:
    _killed_upload_resumes(daemon, tmp_path, 100_000, 256)


def test_killed_download_resumes_without_refetching_published(daemon: Daemon,
                                                              tmp_path: Path) -> None:
    n, size = 20_000, 512
    src = make_tree(daemon.docroots["alice"] / "tree", n, size)
    dst = tmp_path / "down"
    dst.mkdir()
    e = {**os.environ, "FALLBACK_PASSWORD": PASSWORDS["alice"]}
    proc = subprocess.Popen(daemon.cli_args("transfer", daemon.url("/tree", scheme="http"),
                                            f"{dst}/", "--json", "-q", "--no-fsync"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, env=e)
    got = dst / "tree"
    _kill_when(proc, lambda: got.exists() and count_files(got) >= n // 4)
    before = published(got)  # the client is dead: nothing more is published
    assert n // 4 <= len(before) < n
    rc, res, err, _ = run_cli(daemon, daemon.url("/tree", scheme="http"), f"{dst}/", "--no-fsync")
    assert rc == 0, err
    assert tree_digest(got) == tree_digest(src)
    assert res["sent_bytes"] <= (n - len(before)) * size, (res["sent_bytes"], len(before))
    assert res["sent_bytes"] + res["skipped_bytes"] == res["bytes"] == n * size
    after = published(got)
    assert {k: after[k] for k in before} == before


def test_encrypted_small_files_round_trip(daemon: Daemon, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "secret", 600, 3000, per_folder=200)
    e = {"FALLBACK_FILEPASS": PASSPHRASE}
    rc, res, err, _ = run_cli(daemon, str(src), daemon.url("/", scheme="http"), "--encrypt",
                              env=e)
    assert rc == 0, err
    stored = daemon.docroots["alice"] / "secret"
    names = sorted(p.name for p in stored.rglob("*") if p.is_file())
    assert len(names) == 600 and all(n.endswith(".fallback-env") for n in names)
    one = next(p for p in stored.rglob("*") if p.is_file())
    assert b"\0\0\0\0\0\0\0\0" not in one.read_bytes()[64:]  # ciphertext, not our pattern
    dst = tmp_path / "plain"
    dst.mkdir()
    rc, res, err, _ = run_cli(daemon, daemon.url("/secret", scheme="http"), f"{dst}/",
                              "--decrypt", env=e)
    assert rc == 0, err
    assert tree_digest(dst / "secret") == tree_digest(src)
    assert set(res["content"].values()) == {"decrypted"}
    # The decrypted files' checksums are those of the plaintext (`fallback checksum`).
    f0 = "secret/d000/f000000"
    p = subprocess.run([sys.executable, "-m", "fallback", "checksum", str(src / "d000/f000000")],
                       capture_output=True, text=True, check=True)
    assert res["checksums"][f0] == p.stdout.split()[0]


def test_mixed_big_and_small_files_round_trip(daemon: Daemon, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "mixed", 500, 700, per_folder=100)
    for k, size in enumerate((300_000, 70_000, 65_536, 0)):
        make_file(src / f"d00{k}" / f"big{k}", size, seed=k)
    opts = ("--block-size", "64K", "--no-fsync")
    for scheme in ("http", "https"):
        rc, res, err, _ = run_cli(daemon, str(src), daemon.url(f"/{scheme}/", scheme=scheme),
                                  *opts)
        assert rc == 0, err
        assert tree_digest(daemon.docroots["alice"] / scheme / "mixed") == tree_digest(src)
        dst = tmp_path / f"down-{scheme}"
        dst.mkdir()
        rc, res, err, _ = run_cli(daemon, daemon.url(f"/{scheme}/mixed", scheme=scheme),
                                  f"{dst}/", "--no-fsync")
        assert rc == 0, err
        assert tree_digest(dst / "mixed") == tree_digest(src)
        assert res["files"] == 504 and res["verified"]
        # The modes and times of small files arrive as the sender's.
        a, b = src / "d001" / "f000150", dst / "mixed" / "d001" / "f000150"
        assert a.stat().st_mtime_ns == b.stat().st_mtime_ns


@pytest.mark.slow
def test_100000_small_files_upload_memory(daemon: Daemon, tmp_path: Path) -> None:
    """100,000 x 1 KiB up: complete and verified, peak RSS of the client and the daemon."""
    src = make_tree(tmp_path / "huge", 100_000, 1024, per_folder=5000)
    rc, res, err, client_up = run_cli(daemon, str(src), daemon.url("/", scheme="http"),
                                      "--no-fsync")
    assert rc == 0, err
    assert res["files"] == 100_000 and res["verified"]
    assert count_files(daemon.docroots["alice"] / "huge") == 100_000
    peak = daemon_peak_rss_kib(daemon)
    print(f"peak RSS MiB: upload client {client_up // 1024}, daemon {peak // 1024}")
    # The goal is 300 MB each; both are still a little above it (see UPLOAD_CLIENT_BOUND):
    # bounded here so that they do not grow.
    assert peak < DAEMON_BOUND, peak
    assert client_up < UPLOAD_CLIENT_BOUND, client_up


@pytest.mark.slow
def test_100000_small_files_download_memory_bounded(daemon: Daemon, tmp_path: Path) -> None:
    """100,000 x 1 KiB down: complete, the client and the daemon bounded
    (``DOWNLOAD_CLIENT_BOUND``, ``DAEMON_BOUND``; the 300 MB goal: see there)."""
    make_tree(daemon.docroots["alice"] / "huge", 100_000, 1024, per_folder=5000)
    dst = tmp_path / "down"
    dst.mkdir()
    rc, res, err, client_down = run_cli(daemon, daemon.url("/huge", scheme="http"), f"{dst}/",
                                        "--no-fsync")
    assert rc == 0, err
    assert res["files"] == 100_000 and len(res["checksums"]) == 100_000
    assert count_files(dst / "huge") == 100_000
    peak = daemon_peak_rss_kib(daemon)
    print(f"peak RSS MiB: download client {client_down // 1024}, daemon {peak // 1024}")
    assert client_down < DOWNLOAD_CLIENT_BOUND, client_down
    assert peak < DAEMON_BOUND, peak
