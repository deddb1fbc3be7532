"""Round trips through a real daemon, both directions, HTTP and HTTPS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import make_file, sha256
from transport.blocks.digest import digest_path
from transport.blocks.layout import DEFAULT_BLOCK_SIZE

B = DEFAULT_BLOCK_SIZE
SIZES = [0, 1, B - 1, B, B + 1, 3 * B + 12345]


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_file_sizes_round_trip(daemon, tmp_path: Path, scheme: str) -> None:
    src = tmp_path / "src"
    files = [make_file(src / f"f{n}.bin", n, seed=n) for n in SIZES]
    for f in files:
        os.utime(f, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
        rc, res, _ = daemon.transfer(str(f), daemon.url("/up/", scheme=scheme),
                                     "--transport", scheme)
        assert res["ok"] and res["transports"] == [scheme]
        assert res["bytes"] == f.stat().st_size == res["sent_bytes"] + res["skipped_bytes"]
        stored = daemon.docroots["alice"] / "up" / f.name
        assert sha256(stored) == sha256(f)
        assert stored.stat().st_mtime_ns == f.stat().st_mtime_ns
        assert res["checksums"][f.name] == digest_path(f, B)
        back = tmp_path / "back" / scheme
        back.parent.mkdir(exist_ok=True)  # a download creates only the last level (issue 14)
        rc, res, _ = daemon.transfer(daemon.url(f"/up/{f.name}", scheme=scheme), str(back) + "/",
                                     "--transport", scheme)
        assert res["ok"] and res["transports"] == [scheme]
        assert sha256(back / f.name) == sha256(f)
        assert (back / f.name).stat().st_mtime_ns == f.stat().st_mtime_ns
    # nothing half-written is left beside the targets
    leftovers = [p.name for p in (daemon.docroots["alice"] / "up").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_tree_round_trip_keeps_empty_folders_modes_and_names(daemon, tmp_path: Path) -> None:
    tree = tmp_path / "My Tree"
    make_file(tree / "a" / "b" / "naïve café.txt", 1000, seed=1)
    make_file(tree / "a" / "日本語 name.bin", B + 7, seed=2)
    (tree / "empty" / "deeper").mkdir(parents=True)
    make_file(tree / "zero", 0)
    os.chmod(tree / "zero", 0o600)
    rc, res, _ = daemon.transfer(str(tree), daemon.url("/dst/"))
    assert res["files"] == 3 and res["ok"]
    stored = daemon.docroots["alice"] / "dst" / "My Tree"
    assert (stored / "empty" / "deeper").is_dir()
    assert (stored / "zero").stat().st_mode & 0o777 == 0o600
    out = tmp_path / "out"
    rc, res, _ = daemon.transfer(daemon.url("/dst/My Tree"), str(out))
    for rel in ("a/b/naïve café.txt", "a/日本語 name.bin", "zero"):
        assert sha256(out / rel) == sha256(tree / rel)
        assert (out / rel).stat().st_mtime_ns == (tree / rel).stat().st_mtime_ns
    assert (out / "empty" / "deeper").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_large_file_round_trip(daemon, tmp_path: Path, scheme: str) -> None:
    f = make_file(tmp_path / "large.bin", 300 << 20, seed=9)
    rc, res, _ = daemon.transfer(str(f), daemon.url("/", scheme=scheme), "--transport", scheme,
                                 "--streams", "4")
    assert res["sent_bytes"] == 300 << 20
    rc, res, _ = daemon.transfer(daemon.url("/large.bin", scheme=scheme), str(tmp_path / "dl.bin"),
                                 "--transport", scheme)
    assert sha256(tmp_path / "dl.bin") == sha256(f)
