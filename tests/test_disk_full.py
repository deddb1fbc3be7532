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


@pytest.mark.parametrize("transport", ["https", "udp"])
def test_upload_to_a_full_disk_fails_at_once_and_the_daemon_goes_on(daemon_factory,
                                                                    small_disk: Path,
                                                                    tmp_path: Path,
                                                                    transport: str) -> None:
    """The error says the disk is the server's, names the remote path and what became of
    the partial. Before: ``error: big.bin: No space left on device``, which read as the
    client's own disk (trial)."""
    d = daemon_factory(start=False, udp=transport == "udp")
    root = d.docroots["alice"]
    root.parent.mkdir(parents=True, exist_ok=True)
    root.symlink_to(small_disk)
    d.start()
    src = make_file(tmp_path / "big.bin", 40 * MB, seed=8)
    t0 = time.monotonic()
    rc, res, err = d.transfer(str(src), d.url("/x/"), "--transport", transport, check=False,
                              timeout=120)
    assert time.monotonic() - t0 < 30, err
    assert rc == 1, err
    want = ("server: x/big.bin: No space left on device (the partial stays on the server for "
            "a resume: free space there, then run again)")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == [f"error: {want}"], err
    assert "Traceback" not in err and str(small_disk) not in err  # the daemon's own folders
    assert res["ok"] is False and res["error"] == want and res["retries"] == 0, res
    assert not (small_disk / "x" / "big.bin").exists()
    # the daemon serves on: bob's docroot is on another file system
    small = make_file(tmp_path / "small.bin", 1000, seed=9)
    rc, res, err = d.transfer(str(small), d.url("/", user="bob"), user="bob", check=False)
    assert rc == 0, err
    assert "Traceback" not in d.log()


@pytest.mark.parametrize("transport", ["https", "udp"])
def test_a_read_only_server_disk_is_named_as_the_servers(daemon_factory, small_disk: Path,
                                                         tmp_path: Path, transport: str) -> None:
    """Before: ``error: ow.txt: Read-only file system`` at the docroot's top (read as local)
    and ``error: server I/O error: Read-only file system`` in a subfolder (no path)."""
    d = daemon_factory(start=False, udp=transport == "udp")
    root = d.docroots["alice"]
    root.parent.mkdir(parents=True, exist_ok=True)
    root.symlink_to(small_disk)
    d.start()
    # the daemon's state folder first (as on a disk that was writable once), then read-only
    d.transfer(str(make_file(tmp_path / "first.txt", 10, seed=1)), d.url("/"))
    p = subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot remount read-only: {p.stderr.strip()}")
    src = make_file(tmp_path / "ow.txt", 1000, seed=2)
    rc, res, err = d.transfer(str(src), d.url("/"), "--transport", transport, check=False,
                              timeout=60)
    assert rc == 1, err
    assert [ln for ln in err.splitlines() if ln.strip()] == \
        ["error: server: ow.txt: Read-only file system"], err
    assert res["error"] == "server: ow.txt: Read-only file system"
    rc, res, err = d.transfer(str(src), d.url("/sub/"), "--transport", transport, check=False,
                              timeout=60)
    assert rc == 1, err
    assert [ln for ln in err.splitlines() if ln.strip()] == \
        ["error: server: sub: Read-only file system"], err
    assert "Traceback" not in d.log()
