"""``--block-size`` changes a file's whole-file digest; the result says which block size
its checksums used, so that ``fallback checksum --block-size N`` reproduces them (trial:
the digest differed from ``fallback checksum FILE`` with nothing saying why)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import Daemon, make_file

MB = 1 << 20


def _checksum(path: Path, *opts: str) -> str:
    p = subprocess.run([sys.executable, "-m", "fallback", "checksum", *opts, str(path)],
                       capture_output=True, text=True, timeout=60, check=True)
    return p.stdout.split()[0]


def test_json_names_the_block_size_of_its_checksums(daemon: Daemon, tmp_path: Path) -> None:
    src = make_file(tmp_path / "bs.bin", 3 * MB + 5, seed=11)
    _, res, _ = daemon.transfer(str(src), daemon.url("/bs1/"), "--block-size", "1M")
    assert res["block_size"] == MB and res["block_sizes"] == {}
    assert res["checksums"]["bs.bin"] == _checksum(src, "--block-size", "1M")
    assert res["checksums"]["bs.bin"] != _checksum(src)  # hence the key
    _, res, _ = daemon.transfer(str(src), daemon.url("/bs4/"))
    assert res["block_size"] == 4 * MB and res["checksums"]["bs.bin"] == _checksum(src)
    _, res, _ = daemon.transfer(daemon.url("/bs1/bs.bin"), str(tmp_path / "back.bin"))
    assert res["block_size"] > 0
    assert res["checksums"]["bs.bin"] == _checksum(
        tmp_path / "back.bin", "--block-size", str(res["block_size"]))
