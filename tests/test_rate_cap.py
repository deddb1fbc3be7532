"""--target-rate over HTTP(S) holds for files under one block, both ways, and a stream on
a low per-stream rate is not taken for stalled (a fresh-user trial found a 3 MB upload at
-l 2M done in 0.5 s, and one taking 60 s with a stream retried as stalled)."""

from __future__ import annotations

import time
from pathlib import Path

from fallback import transfer
from tests.conftest import PASSWORDS, Daemon, make_file, sha256


def _kw(daemon: Daemon, **extra: object) -> dict[str, object]:
    return dict(password=PASSWORDS["alice"], fingerprint=daemon.fingerprint, **extra)


def test_cap_holds_for_a_file_under_one_block(daemon: Daemon, tmp_path: Path) -> None:
    size, rate = 2 << 20, 4e6  # 2 MiB at 4 Mbit/s: 4.2 s, less the 256 KiB bucket
    src = make_file(tmp_path / "small.bin", size)
    floor = (size - (256 << 10)) * 8 / rate * 0.9
    t0 = time.monotonic()
    res = transfer(str(src), daemon.url("/"), **_kw(daemon, target_rate="4M"))
    up = time.monotonic() - t0
    assert res.ok and up >= floor, (up, floor)
    t0 = time.monotonic()
    res = transfer(daemon.url("/small.bin"), str(tmp_path / "back.bin"),
                   **_kw(daemon, target_rate="4M"))
    down = time.monotonic() - t0
    assert res.ok and down >= floor, (down, floor)
    assert sha256(tmp_path / "back.bin") == sha256(src)


def test_low_rate_streams_are_not_stalled(daemon: Daemon, tmp_path: Path) -> None:
    # the trial's case: 3 MB at 2 Mbit/s in 1 MiB blocks over 4 streams sharing the rate
    # (12 s); each stream waited for its whole block's share of the bucket, one was given
    # up as stalled after 60 s and its block sent again (62-68 s in 3 runs of 4 on a
    # loaded machine; not reproduced here before the fix: kept as the guard of that bound)
    size = 3_000_000
    src = make_file(tmp_path / "slow.bin", size)
    t0 = time.monotonic()
    res = transfer(str(src), daemon.url("/"),
                   **_kw(daemon, target_rate="2M", block_size="1M", streams=4))
    took = time.monotonic() - t0
    assert res.ok and res.retries == 0 and took < 40, took
    assert res.sent_bytes == size  # nothing sent twice: no stream was given up as stalled
    assert sha256(daemon.docroots["alice"] / "slow.bin") == sha256(src)
