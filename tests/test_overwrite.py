"""Overwrite policies (issue #2, section 7), in both directions, against a real daemon.

ascp's meanings, as ``transport.blocks.plan.overwrite_action`` applies them:
``never`` keeps an existing target; ``always`` replaces it; ``diff`` skips a
target whose size and whole-file digest equal the source's; ``older``
replaces only a target whose mtime is older than the source's. A skipped file
is listed in the result's ``skipped_files`` ("exists", or "unchanged" for diff).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, free_port, make_file, sha256
from tests.statefiles import no_leftovers
from transport.blocks.digest import digest_path

BS = 64 << 10
SIZE = 3 * BS + 4321  # four blocks, the last one short
T0 = 1_700_000_000_000_000_000  # a fixed mtime (ns); others are offsets from it
HOUR = 3600 * 10**9


@pytest.fixture(scope="module")
def od(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = tmp_path_factory.mktemp("overwrite")
    d = Daemon(base / "daemon", free_port(), free_port(),
               {"alice": base / "daemon" / "docroot" / "alice"},
               "<file_system><block_size>64K</block_size><fsync>false</fsync></file_system>")
    d.base.mkdir()
    d.start()
    yield d
    d.stop(signal.SIGKILL)


@dataclass
class Case:
    """One file to copy in one direction: ``src`` and ``dst`` are the local paths of both ends."""

    daemon: Daemon
    direction: str
    src: Path
    dst: Path
    name: str

    def run(self, *opts: str) -> dict[str, Any]:
        if self.direction == "upload":
            a, b = str(self.src), self.daemon.url(f"/{self.name}")
            opts = ("--block-size", "64K", *opts)
        else:
            a, b = self.daemon.url(f"/{self.name}"), str(self.dst)
        rc, res, err = self.daemon.transfer(a, b, *opts)
        assert rc == 0 and err == "" and res["ok"] is True and res["error"] is None
        assert res["direction"] == self.direction and res["files"] == 1
        assert res["bytes"] == self.src.stat().st_size == res["sent_bytes"] + res["skipped_bytes"]
        return res


@pytest.fixture(params=["upload", "download"])
def case(request: pytest.FixtureRequest, od: Daemon, tmp_path: Path) -> Case:
    name = f"{request.node.name.split('[')[0].removeprefix('test_')}-{request.param}.bin"[-80:]
    remote = od.docroots["alice"] / name
    local = tmp_path / name
    src, dst = (local, remote) if request.param == "upload" else (remote, local)
    make_file(src, SIZE, seed=1)
    os.utime(src, ns=(T0, T0))
    return Case(od, request.param, src, dst, name)


def existing(c: Case, *, seed: int, mtime_ns: int, size: int = SIZE) -> str:
    """Put a target in place; returns its sha256."""
    make_file(c.dst, size, seed=seed)
    os.utime(c.dst, ns=(mtime_ns, mtime_ns))
    return sha256(c.dst)


def assert_sent(c: Case, res: dict[str, Any]) -> None:
    assert (res["sent_bytes"], res["skipped_bytes"]) == (SIZE, 0)
    assert res["skipped_files"] == {}
    assert res["checksums"] == {c.name: digest_path(c.src, BS)}
    assert sha256(c.dst) == sha256(c.src)
    assert c.dst.stat().st_mtime_ns == T0
    assert no_leftovers(c.dst)


def assert_kept(c: Case, res: dict[str, Any], digest: str, mtime_ns: int, reason: str) -> None:
    assert (res["sent_bytes"], res["skipped_bytes"]) == (0, SIZE)
    assert res["skipped_files"] == {c.name: reason}
    assert sha256(c.dst) == digest and c.dst.stat().st_mtime_ns == mtime_ns


# -- never ---------------------------------------------------------------------------------------
def test_never_keeps_an_existing_target(case: Case) -> None:
    old = existing(case, seed=2, mtime_ns=T0 - HOUR)
    res = case.run("--overwrite", "never")
    assert_kept(case, res, old, T0 - HOUR, "exists")
    assert res["checksums"] == {}


# -- always --------------------------------------------------------------------------------------
def test_always_replaces_a_different_target(case: Case) -> None:
    existing(case, seed=2, mtime_ns=T0 + HOUR)
    assert_sent(case, case.run("--overwrite", "always"))


# -- diff (the default) --------------------------------------------------------------------------
def test_diff_skips_an_identical_target(case: Case) -> None:
    make_file(case.dst, SIZE, seed=1)  # same bytes, another mtime: content decides
    os.utime(case.dst, ns=(T0 + HOUR, T0 + HOUR))
    res = case.run()  # diff is the default
    assert_kept(case, res, sha256(case.src), T0 + HOUR, "unchanged")
    assert res["checksums"] == {case.name: digest_path(case.src, BS)}


def test_diff_sends_a_changed_target_of_the_same_size(case: Case) -> None:
    existing(case, seed=3, mtime_ns=T0)  # same size and mtime: only the digests differ
    assert_sent(case, case.run("--overwrite", "diff"))


# -- older ---------------------------------------------------------------------------------------
def test_older_replaces_an_older_target(case: Case) -> None:
    existing(case, seed=2, mtime_ns=T0 - 1)
    assert_sent(case, case.run("--overwrite", "older"))


@pytest.mark.parametrize("offset", [0, HOUR], ids=["same-mtime", "newer"])
def test_older_keeps_a_target_not_older(case: Case, offset: int) -> None:
    old = existing(case, seed=2, mtime_ns=T0 + offset)
    res = case.run("--overwrite", "older")
    assert_kept(case, res, old, T0 + offset, "exists")


# -- per file in a tree --------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["upload", "download"])
def test_diff_decides_per_file_in_a_tree(od: Daemon, tmp_path: Path, direction: str) -> None:
    local, remote = tmp_path / "dl" / "tree", od.docroots["alice"] / f"in-{direction}" / "tree"
    src_root, dst_root = (local, remote) if direction == "upload" else (remote, local)
    same = make_file(src_root / "same.bin", SIZE, seed=4)
    changed = make_file(src_root / "sub" / "changed.bin", SIZE, seed=5)
    make_file(dst_root / "same.bin", SIZE, seed=4)
    make_file(dst_root / "sub" / "changed.bin", SIZE, seed=6)
    if direction == "upload":
        rc, res, err = od.transfer(str(local), od.url(f"/in-{direction}/"), "--block-size", "64K")
    else:
        rc, res, err = od.transfer(od.url(f"/in-{direction}/tree"), str(local.parent) + "/")
    root = "tree"
    assert res["ok"] and res["files"] == 2 and res["bytes"] == 2 * SIZE
    assert (res["sent_bytes"], res["skipped_bytes"]) == (SIZE, SIZE)
    assert res["skipped_files"] == {f"{root}/same.bin": "unchanged"}
    assert res["checksums"] == {f"{root}/same.bin": digest_path(same, BS),
                                f"{root}/sub/changed.bin": digest_path(changed, BS)}
    assert sha256(dst_root / "sub" / "changed.bin") == sha256(changed)
