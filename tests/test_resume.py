"""Resuming interrupted transfers (issue #2, sections 2 and 7), against real daemons.

A transfer is interrupted with SIGKILL (client or daemon) after the receiver's
journal shows progress, then run again. Loopback moves ~200 MB/s while the
receiver journals every ``BlockSink.FLUSH_INTERVAL`` (0.5 s), so a transfer
this size could end between two journal flushes; to interrupt it at a known
point the sending side is first frozen with SIGSTOP (the receiver drains what
is in flight and journals it), then the process to interrupt is killed with
SIGKILL. What the receiver journaled before the kill bounds what a re-run may
send.

The resume modes, as ascp defines them and ``transport.blocks.plan`` applies:
``none`` starts over; ``attrs`` resumes when size and mtime are unchanged;
``sparse`` also re-digests up to 16 journaled blocks; ``full`` re-digests
every journaled block.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PASSWORDS, Daemon, free_port, make_file, sha256
from tests.interrupt import journaled, wait_journal_stable, wait_until
from tests.statefiles import hidden_beside, parts
from transport.blocks.digest import digest_path
from transport.blocks.plan import resume_samples
from transport.blocks.receiver import FileReceiver, journal_path, partial_path
from transport.blocks.source import FileSource, entry_for
from transport.blocks.statedir import StateDir

BS = 256 << 10
BLOCK_XML = "<file_system><block_size>256K</block_size></file_system>"
NO_FSYNC_XML = "<file_system><block_size>256K</block_size><fsync>false</fsync></file_system>"
SIZE = 40 << 20  # 160 blocks of 256 KiB
AT = 4 << 20  # interrupt once this much reached the receiver
STREAMS = 4
IN_FLIGHT = (STREAMS * 2 + 2) * BS
UP = ("--block-size", "256K", "--streams", str(STREAMS))
# The run to interrupt uses one stream: a loopback socket buffers megabytes, and with
# several streams what is in flight when the sender freezes can be the rest of the file.
FIRST = ("--block-size", "256K", "--streams", "1")


# -- helpers (also used by test_concurrency) ---------------------------------------------------------


def start_transfer(daemon: Daemon, src: str, dst: str, *opts: str) -> subprocess.Popen[str]:
    """``fallback transfer --json`` in the background, as a user would run it."""
    env = {**os.environ, "FALLBACK_PASSWORD": PASSWORDS["alice"]}
    return subprocess.Popen(daemon.cli_args("transfer", src, dst, "--json", "-q", *opts),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def partial_size(target: Path) -> int:
    try:
        return partial_path(target).stat().st_size
    except FileNotFoundError:
        return 0




def wait_progress(proc: subprocess.Popen[str], target: Path, nbytes: int) -> None:
    """Wait until the receiver's partial beside ``target`` holds ``nbytes``; fail if it finished."""

    def moved() -> bool:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"transfer ended (rc={proc.returncode}) before it could be "
                                 f"interrupted: {out} {err}")
        return partial_size(target) >= nbytes

    wait_until(moved, f"{nbytes} bytes in {partial_path(target)}")




def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)


def leftovers(folder: Path) -> list[str]:
    """Partial files and journals kept in ``folder``'s state folder (for targets in the tree
    below it), and anything hidden beside its files."""
    return hidden_beside(folder) + parts(folder)


def interrupted_upload(daemon: Daemon, src: Path,
                       at: int = AT) -> tuple[Path, dict[int, bytes]]:
    """Upload ``src``, freeze the client once ``at`` bytes arrived, kill it; return what is journaled."""
    name = src.name
    target = daemon.docroots["alice"] / name
    proc = start_transfer(daemon, str(src), daemon.url(f"/{name}"), *FIRST)
    wait_progress(proc, target, at)
    proc.send_signal(signal.SIGSTOP)
    have = wait_journal_stable(target)
    kill(proc)
    assert not target.exists()
    assert 8 <= len(have) < SIZE // BS, f"{len(have)} blocks journaled: not an interrupted upload"
    return target, have


def assert_resumed(res: dict[str, Any], src: Path, have: dict[int, bytes], name: str,
                   direction: str = "upload") -> None:
    """A re-run after an interruption: ok, and sent only what the journal did not hold."""
    size = src.stat().st_size
    assert res["ok"] is True and res["error"] is None
    assert res["direction"] == direction and res["files"] == 1 and res["bytes"] == size
    assert res["skipped_files"] == {}
    assert res["sent_bytes"] + res["skipped_bytes"] == size
    assert res["skipped_bytes"] >= len(have) * BS > 0
    assert res["sent_bytes"] <= size - len(have) * BS + IN_FLIGHT
    assert res["checksums"] == {name: digest_path(src, BS)}


def snapshot(target: Path, into: Path) -> Callable[[], None]:
    """Copy a partial and its journal; the returned function puts copies back (fresh inodes)."""
    into.mkdir(parents=True, exist_ok=True)
    saved = [(shutil.copy2(p, into / p.name), p) for p in (partial_path(target), journal_path(target))]

    def restore() -> None:
        target.unlink(missing_ok=True)
        StateDir(target.parent).ensure()  # a finished run removes an empty state folder
        for copy, original in saved:
            shutil.copy2(copy, original.with_name(original.name + ".tmp"))
            os.replace(original.with_name(original.name + ".tmp"), original)

    return restore


def rewrite_keeping_size(path: Path, seed: int, mtime_ns: int | None) -> None:
    """New content, same size; mtime forced to ``mtime_ns`` or moved on by one second."""
    old = path.stat().st_mtime_ns
    make_file(path, path.stat().st_size, seed=seed)
    t = mtime_ns if mtime_ns is not None else old + 1_000_000_000
    os.utime(path, ns=(t, t))


def module_daemon(tmp_path_factory: pytest.TempPathFactory, xml: str) -> Iterator[Daemon]:
    """One daemon for a whole module (each test uses its own file names in the docroot)."""
    base = tmp_path_factory.mktemp("daemon")
    d = Daemon(base, free_port(), free_port(), {"alice": base / "docroot" / "alice"}, xml)
    d.start()
    try:
        yield d
    finally:
        if d.proc is not None:
            d.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def fsync_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from module_daemon(tmp_path_factory, BLOCK_XML)


@pytest.fixture
def d256(fsync_daemon: Daemon) -> Daemon:
    """A daemon that serves downloads in 256 KiB blocks (uploads choose with --block-size)."""
    if fsync_daemon.proc is None:  # a test that killed it failed before restarting it
        fsync_daemon.start()
    return fsync_daemon


@pytest.fixture
def big(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The source, named after the test (daemons are shared by the tests of a module)."""
    name = request.node.name.removeprefix("test_").replace("[", "-").rstrip("]")[:60]
    return make_file(tmp_path / "src" / f"{name}.bin", SIZE, seed=7)


# -- section 2: kill -9 mid-transfer, then run again -------------------------------------------------
def test_client_killed_mid_upload_resumes(d256: Daemon, big: Path) -> None:
    target, have = interrupted_upload(d256, big)
    rc, res, err = d256.transfer(str(big), d256.url(f"/{big.name}"), *UP)
    assert rc == 0 and err == ""
    assert_resumed(res, big, have, big.name)
    assert res["transports"] == ["https"]
    assert sha256(target) == sha256(big)
    assert target.stat().st_mtime_ns == big.stat().st_mtime_ns
    assert leftovers(target.parent) == []


def test_client_killed_mid_download_resumes(d256: Daemon, big: Path, tmp_path: Path) -> None:
    shutil.copy2(big, d256.docroots["alice"] / big.name)
    target = tmp_path / "dl" / big.name
    target.parent.mkdir()
    proc = start_transfer(d256, d256.url(f"/{big.name}"), str(target), "--streams", "1")
    wait_progress(proc, target, AT)
    d256.proc.send_signal(signal.SIGSTOP)  # freeze the sender; the client journals what it got
    try:
        have = wait_journal_stable(target)
        kill(proc)
    finally:
        d256.proc.send_signal(signal.SIGCONT)
    assert 8 <= len(have) < SIZE // BS and not target.exists()
    assert leftovers(target.parent) == sorted(p.name for p in (partial_path(target), journal_path(target)))
    rc, res, err = d256.transfer(d256.url(f"/{big.name}"), str(target), "--streams", str(STREAMS))
    assert rc == 0 and err == ""
    assert_resumed(res, big, have, big.name, direction="download")
    assert sha256(target) == sha256(big)
    assert target.stat().st_mtime_ns == big.stat().st_mtime_ns
    assert leftovers(target.parent) == []


def test_daemon_killed_mid_upload_then_restarted_resumes(d256: Daemon, big: Path) -> None:
    target = d256.docroots["alice"] / big.name
    fingerprint = d256.fingerprint
    proc = start_transfer(d256, str(big), d256.url(f"/{big.name}"), *FIRST)
    wait_progress(proc, target, AT)
    proc.send_signal(signal.SIGSTOP)
    have = wait_journal_stable(target)
    assert d256.stop(signal.SIGKILL) == -signal.SIGKILL
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["ok"] is False and res["error"] == lines[0].removeprefix("error: ")
    assert "lost" in res["error"] or "cannot reach" in res["error"], res["error"]
    assert res["sent_bytes"] >= len(have) * BS and res["skipped_bytes"] == 0  # what it did move
    # the partial and its journal survived the daemon's death
    assert journaled(target) == have and partial_size(target) > 0

    d256.start()  # same config, ports and certificate
    assert d256.fingerprint == fingerprint
    rc, res, err = d256.transfer(str(big), d256.url(f"/{big.name}"), *UP)
    assert rc == 0 and err == ""
    assert_resumed(res, big, have, big.name)
    assert sha256(target) == sha256(big)
    assert leftovers(target.parent) == []


def test_daemon_killed_mid_download_then_restarted_resumes(d256: Daemon, big: Path,
                                                            tmp_path: Path) -> None:
    shutil.copy2(big, d256.docroots["alice"] / big.name)
    target = tmp_path / big.name
    proc = start_transfer(d256, d256.url(f"/{big.name}"), str(target), "--streams", "1")
    wait_progress(proc, target, AT)
    d256.proc.send_signal(signal.SIGSTOP)
    have = wait_journal_stable(target)
    d256.stop(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" not in err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["ok"] is False and res["sent_bytes"] >= len(have) * BS
    assert journaled(target) == have
    d256.start()
    rc, res, err = d256.transfer(d256.url(f"/{big.name}"), str(target), "--streams", str(STREAMS))
    assert_resumed(res, big, have, big.name, direction="download")
    assert sha256(target) == sha256(big)
    assert leftovers(tmp_path) == []


# -- section 7: resume modes, and a source that changed between runs ---------------------------------
@dataclass
class Partial:
    """An upload interrupted once (module-wide); each test gets it back as it was left."""

    daemon: Daemon
    pristine: Path
    target: Path
    have: dict[int, bytes]
    restore: Callable[[], None]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Partial]:
    for d in module_daemon(tmp_path_factory, NO_FSYNC_XML):
        pristine = make_file(tmp_path_factory.mktemp("pristine") / "big.bin", SIZE, seed=7)
        # Well past 16 blocks, so the sparse sample (16 blocks) is a strict subset.
        target, have = interrupted_upload(d, pristine, at=10 << 20)
        yield Partial(d, pristine, target, have, snapshot(target, tmp_path_factory.mktemp("snap")))


@pytest.fixture
def partial(interrupted: Partial, tmp_path: Path) -> tuple[Daemon, Path, Path, dict[int, bytes]]:
    """(daemon, source, target, journaled blocks): the partial restored, a copy of its source."""
    interrupted.restore()
    src = tmp_path / "big.bin"
    shutil.copy2(interrupted.pristine, src)  # same size and mtime: the partial's identity
    return interrupted.daemon, src, interrupted.target, interrupted.have


def upload(d: Daemon, src: Path, mode: str) -> dict[str, Any]:
    rc, res, err = d.transfer(str(src), d.url("/big.bin"), *UP, "--resume", mode)
    assert rc == 0 and err == "" and res["ok"] is True and res["error"] is None
    assert res["bytes"] == SIZE == res["sent_bytes"] + res["skipped_bytes"]
    return res


def test_resume_modes_on_an_unchanged_source(interrupted: Partial, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    shutil.copy2(interrupted.pristine, src)
    target, held = interrupted.target, len(interrupted.have) * BS
    for mode in ("none", "attrs", "sparse", "full"):
        interrupted.restore()
        res = upload(interrupted.daemon, src, mode)
        expected = (SIZE, 0) if mode == "none" else (SIZE - held, held)
        assert (res["sent_bytes"], res["skipped_bytes"]) == expected, mode
        assert res["checksums"] == {"big.bin": digest_path(src, BS)}
        assert sha256(target) == sha256(src), mode
        assert leftovers(target.parent) == [], mode


def test_changed_source_with_new_mtime_starts_over(interrupted: Partial, tmp_path: Path) -> None:
    """Same size, new content and mtime: attrs and sparse start over (the partial's identity
    differs); full compares every kept block and, all of them changed, sends everything."""
    src = tmp_path / "big.bin"
    shutil.copy2(interrupted.pristine, src)
    rewrite_keeping_size(src, seed=8, mtime_ns=None)
    for mode in ("attrs", "sparse", "full"):
        interrupted.restore()
        res = upload(interrupted.daemon, src, mode)
        assert (res["sent_bytes"], res["skipped_bytes"]) == (SIZE, 0), mode
        assert res["checksums"] == {"big.bin": digest_path(src, BS)}
        assert sha256(interrupted.target) == sha256(src), mode
        assert leftovers(interrupted.target.parent) == []


@pytest.mark.parametrize("mode", ["sparse", "full"])
def test_changed_source_with_forced_mtime_starts_over(partial, mode: str) -> None:  # type: ignore[no-untyped-def]
    """Same size and mtime (forced back), every block different: the digests catch it."""
    d, src, target, have = partial
    rewrite_keeping_size(src, seed=9, mtime_ns=src.stat().st_mtime_ns)
    res = upload(d, src, mode)
    assert (res["sent_bytes"], res["skipped_bytes"]) == (SIZE, 0)
    assert sha256(target) == sha256(src)
    assert leftovers(target.parent) == []


def test_changed_source_with_forced_mtime_attrs_trusts_the_attributes(partial) -> None:  # type: ignore[no-untyped-def]
    """Documented behaviour of ``--resume attrs``: size and mtime are all it checks.

    A source rewritten in place with its mtime forced back is indistinguishable
    by attributes, so attrs keeps the journaled blocks (old content) and sends
    the rest (new content). The daemon's whole-file check still passes: it
    covers the blocks as journaled, and the reported checksum describes the
    stored file, not the new source. Use sparse or full when sources can be
    rewritten with a preserved mtime.
    """
    d, src, target, have = partial
    old = src.read_bytes()
    rewrite_keeping_size(src, seed=10, mtime_ns=src.stat().st_mtime_ns)
    new = src.read_bytes()
    res = upload(d, src, "attrs")
    assert res["skipped_bytes"] == len(have) * BS
    expected = bytearray(new)
    for b in have:
        expected[b * BS:(b + 1) * BS] = old[b * BS:(b + 1) * BS]
    stored = target.read_bytes()
    assert stored == bytes(expected) and stored not in (old, new)
    assert res["checksums"] == {"big.bin": digest_path(target, BS)}
    assert digest_path(target, BS) != digest_path(src, BS)


def test_full_checks_every_journaled_block_sparse_only_samples(partial, interrupted: Partial) -> None:  # type: ignore[no-untyped-def]
    """One journaled block changed (size, mtime kept): full sends that block again and
    keeps the others (before: the whole file again, as a trial saw); sparse may miss it."""
    d, src, target, have = partial
    samples = resume_samples(have, "sparse")
    assert len(samples) == 16 < len(have)
    unsampled = next(b for b in sorted(have) if b not in samples)
    mtime = src.stat().st_mtime_ns
    with open(src, "r+b") as f:
        f.seek(unsampled * BS + 100)
        f.write(b"changed in place")
    os.utime(src, ns=(mtime, mtime))

    res = upload(d, src, "full")
    kept = (len(have) - 1) * BS
    assert (res["sent_bytes"], res["skipped_bytes"]) == (SIZE - kept, kept)
    assert sha256(target) == sha256(src)
    assert res["verified"] == "full" and res["checksums"] == {"big.bin": digest_path(src, BS)}

    interrupted.restore()
    res = upload(d, src, "sparse")
    assert res["skipped_bytes"] == len(have) * BS  # the sample did not cover that block
    assert sha256(target) != sha256(src)


def interrupted_download(d: Daemon, big: Path, name: str, into: Path
                         ) -> tuple[Path, Path, dict[int, bytes]]:
    """``big`` served as ``name``, downloaded into ``into`` and killed once the partial
    holds ``AT`` bytes (the daemon frozen meanwhile); (served, target, journaled)."""
    served = d.docroots["alice"] / name
    shutil.copy2(big, served)
    target = into / name
    proc = start_transfer(d, d.url(f"/{name}"), str(target), "--streams", "1")
    wait_progress(proc, target, AT)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGSTOP)
    try:
        have = wait_journal_stable(target)
        kill(proc)
    finally:
        d.proc.send_signal(signal.SIGCONT)
    assert len(have) >= 8
    return served, target, have


def change_blocks(path: Path, blocks: list[int], mtime_ns: int | None) -> None:
    """Write into each of ``blocks``; mtime forced to ``mtime_ns`` or moved on by 1 s."""
    old = path.stat().st_mtime_ns
    with open(path, "r+b") as f:
        for b in blocks:
            f.seek(b * BS + 1000)
            f.write(os.urandom(64))
    t = mtime_ns if mtime_ns is not None else old + 1_000_000_000
    os.utime(path, ns=(t, t))


def test_full_resume_of_an_edited_source_sends_only_the_changed_blocks(partial) -> None:  # type: ignore[no-untyped-def]
    """The source was edited after the interruption (new mtime, two kept blocks changed,
    one not received yet): ``full`` keeps the partial's other blocks and sends the
    changed ones with the rest (before: the whole file again); attrs and sparse, which do
    not compare every block, start over."""
    d, src, target, have = partial
    held = sorted(have)
    missing_block = next(b for b in range(SIZE // BS) if b not in have)
    change_blocks(src, [held[0], held[-1], missing_block], None)
    res = upload(d, src, "full")
    kept = (len(have) - 2) * BS
    assert (res["sent_bytes"], res["skipped_bytes"]) == (SIZE - kept, kept)
    assert sha256(target) == sha256(src)
    assert res["verified"] == "full" and res["checksums"] == {"big.bin": digest_path(src, BS)}
    assert target.stat().st_mtime_ns == src.stat().st_mtime_ns
    assert leftovers(target.parent) == []


def test_download_of_a_source_edited_between_runs_fetches_only_changed_blocks(
        interrupted: Partial, big: Path, tmp_path: Path) -> None:
    """The daemon's file gets a new mtime and two changed blocks after an interrupted
    download: ``--resume full`` (the default) keeps the other kept blocks (before: the
    whole file again; the partial's identity differed)."""
    dfast = interrupted.daemon
    served, target, have = interrupted_download(dfast, big, "edited.bin", tmp_path)
    held = sorted(have)
    change_blocks(served, [held[1], held[-2]], None)
    rc, res, err = dfast.transfer(dfast.url("/edited.bin"), str(target), "--no-fsync")
    kept = (len(have) - 2) * BS
    assert (res["ok"], res["sent_bytes"], res["skipped_bytes"]) == (True, SIZE - kept, kept), err
    assert res["checksums"] == {"edited.bin": digest_path(served, BS)}
    assert sha256(target) == sha256(served)
    assert leftovers(tmp_path) == []


def test_only_a_partial_stored_as_it_is_may_be_rebased() -> None:
    """Rebasing keeps blocks stored as they are only: an envelope's blocks re-encrypted
    under the same header would reuse AES-GCM nonces with other plaintext."""
    from transport.blocks.manifest import rebasable_identity
    plain = [SIZE, 1, BS, "identity", ""]
    assert rebasable_identity(plain, [SIZE, 2, BS, "identity", ""])
    assert not rebasable_identity(plain, [SIZE + 1, 2, BS, "identity", ""])  # size
    assert not rebasable_identity(plain, [SIZE, 2, 2 * BS, "identity", ""])  # layout
    assert not rebasable_identity([SIZE, 1, BS, "envelope-v1", "ab"],
                                  [SIZE, 2, BS, "envelope-v1", "ab"])


def test_download_source_changed_between_runs_is_not_mixed(interrupted: Partial, big: Path,
                                                           tmp_path: Path) -> None:
    """The daemon's file is rewritten (same size and mtime) after an interrupted download."""
    dfast = interrupted.daemon
    served, target, have = interrupted_download(dfast, big, big.name, tmp_path)
    rewrite_keeping_size(served, seed=11, mtime_ns=served.stat().st_mtime_ns)
    rc, res, err = dfast.transfer(dfast.url(f"/{big.name}"), str(target), "--resume", "sparse",
                                  "--no-fsync")
    assert (res["ok"], res["sent_bytes"], res["skipped_bytes"]) == (True, SIZE, 0)
    assert res["checksums"] == {big.name: digest_path(served, BS)}
    assert sha256(target) == sha256(served)
    assert leftovers(tmp_path) == []


def test_journal_without_its_partial_is_not_trusted(tmp_path: Path) -> None:
    """Journal records whose partial file is gone describe nothing: the receiver starts over.

    Trusting them would fill those blocks with zeros, and the whole-file check
    (built from the same journaled digests) would pass.
    """
    src = make_file(tmp_path / "f.bin", 8 * BS, seed=3)
    entry = entry_for(src, "", BS)
    target = tmp_path / "out" / "f.bin"
    target.parent.mkdir()
    source = FileSource(src, entry)
    rec = FileReceiver(target, entry)
    for b in range(5):
        rec.write_block(b, *source.read_block(b))
    rec.close()
    assert sorted(journaled(target)) == [0, 1, 2, 3, 4]
    partial_path(target).unlink()
    rec = FileReceiver(target, entry, resume=True)
    assert rec.have() == {} and rec.missing().to_list() == [(0, 8)]
    assert journaled(target) == {}
    for b in range(8):
        rec.write_block(b, *source.read_block(b))
    rec.commit(digest_path(src, BS))
    source.close()
    assert sha256(target) == sha256(src)
    assert leftovers(target.parent) == []


def test_resume_decisions_by_mode() -> None:
    """``full`` drops what changed and keeps the rest; ``sparse`` and ``attrs`` start over
    on any difference they see; a partial of another size is never rebased."""
    from transport.blocks.manifest import FileEntry
    from transport.blocks.plan import TargetState, resume_check, resume_decision
    e = FileEntry("f", "file", size=4 * BS, mtime_ns=2, block_size=BS)
    same = TargetState(exists=False, journal=e.identity(), have={0: b"a", 1: b"b"})
    edited = TargetState(exists=False, journal=[4 * BS, 1, BS, "identity", ""],
                         have={0: b"a", 1: b"b"})
    fresh = {0: b"a", 1: b"X"}
    for state, rebase in ((same, False), (edited, True)):
        check = resume_check("full", e, state)
        assert check is not None and (check.samples, check.rebase) == ([0, 1], rebase)
        d = resume_decision("full", check, state, fresh)
        assert (d.resume, d.stale, d.rebase) == (True, [1], rebase)
        assert resume_decision("full", check, state, {0: b"Y", 1: b"X"}).resume is False
    check = resume_check("sparse", e, same)
    assert check is not None and resume_decision("sparse", check, same, fresh).resume is False
    assert resume_check("sparse", e, edited) is None and resume_check("attrs", e, edited) is None
    other = TargetState(exists=False, journal=[4 * BS + 1, 1, BS, "identity", ""], have={0: b"a"})
    assert resume_check("full", e, other) is None and resume_check("none", e, same) is None
