"""A full disk on either end ends the transfer at once, with one line naming the file.

Before: a download to a full disk over HTTP(S) took ``ENOSPC`` from its sink for its
stream's connection breaking (``download stream lost: OSError: [Errno 28]``) and retried
stream after stream while its memory grew at the link's rate, until the OOM killer came
(an outside trial: 23 GB before the kill, a traceback under ``ulimit -v``).
Needs root (a small tmpfs is mounted for each test).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_file

MB = 1 << 20
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (needs root)")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs, unmounted at the end."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("transport", ["https", "http", "auto"])
def test_download_to_a_full_disk_fails_at_once_naming_the_file(daemon_factory, small_disk: Path,
                                                               transport: str) -> None:
    d = daemon_factory(udp=transport == "auto")
    make_file(d.docroots["alice"] / "big.bin", 40 * MB, seed=7)
    t0 = time.monotonic()
    scheme = "http" if transport == "http" else "https"
    rc, res, err = d.transfer(d.url("/big.bin", scheme=scheme), f"{small_disk}/", "--transport", transport,
                              check=False, timeout=120)
    assert time.monotonic() - t0 < 30, err  # no retries (it used to retry until OOM)
    assert rc == 1, err
    want = f"{small_disk}/big.bin: No space left on device"
    assert [ln for ln in err.splitlines() if ln.strip()] == [f"error: {want}"], err
    assert res["ok"] is False and res["error"] == want and res["retries"] == 0, res
    assert not (small_disk / "big.bin").exists()  # nothing under the real name


def test_upload_to_a_full_disk_fails_at_once_and_the_daemon_goes_on(daemon_factory,
                                                                    small_disk: Path,
                                                                    tmp_path: Path) -> None:
    d = daemon_factory(start=False)
    root = d.docroots["alice"]
    root.parent.mkdir(parents=True, exist_ok=True)
    root.symlink_to(small_disk)
    d.start()
    src = make_file(tmp_path / "big.bin", 40 * MB, seed=8)
    t0 = time.monotonic()
    rc, res, err = d.transfer(str(src), d.url("/"), "--transport", "https", check=False,
                              timeout=120)
    assert time.monotonic() - t0 < 30, err
    assert rc == 1, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "big.bin: No space left on device" in lines[0], err
    assert "Traceback" not in err and str(small_disk) not in err  # the daemon's own folders
    assert res["ok"] is False and res["retries"] == 0, res
    assert not (small_disk / "big.bin").exists()
    # the daemon serves on: bob's docroot is on another file system
    small = make_file(tmp_path / "small.bin", 1000, seed=9)
    rc, res, err = d.transfer(str(small), d.url("/", user="bob"), user="bob", check=False)
    assert rc == 0, err
    assert "Traceback" not in d.log()
