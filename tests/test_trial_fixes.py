"""Fixes for an outside tester's findings on the issue-10 work (security, integrity):
every defect kind here has a test that failed before its fix."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PASSWORDS, make_file


@pytest.fixture
def umask_027() -> Iterator[None]:
    """Daemons and CLI runs started by the test inherit umask 027."""
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


# -- 1. modes from the wire: no set-id/sticky bits, the receiver's umask applies ------------------
def test_upload_and_download_strip_setid_bits_and_apply_umask(
        daemon_factory, tmp_path: Path, umask_027: None) -> None:
    d = daemon_factory()
    src = tmp_path / "src"
    make_file(src / "tool", 1000)
    make_file(src / "sub" / "f", 10)
    os.chmod(src / "tool", 0o6777)
    os.chmod(src / "sub", 0o1777)
    d.transfer(str(src), d.url("/"))
    up = d.docroots["alice"] / "src"
    assert stat.S_IMODE(os.stat(up / "tool").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(up / "sub").st_mode) == 0o750
    # the other direction: a daemon-side file with set-id bits arrives without them
    os.chmod(up / "tool", 0o6777)
    os.chmod(up / "sub", 0o1777)
    dst = tmp_path / "dst"
    dst.mkdir()
    d.transfer(d.url("/src"), str(dst))
    assert stat.S_IMODE(os.stat(dst / "src" / "tool").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(dst / "src" / "sub").st_mode) == 0o750


def test_plain_put_applies_the_daemon_umask(daemon_factory, tmp_path: Path, umask_027: None) -> None:
    d = daemon_factory()
    f = make_file(tmp_path / "f", 100)
    p = subprocess.run(["curl", "-sk", "-T", str(f), "-u", f"alice:{PASSWORDS['alice']}",
                        d.url("/put.bin").replace("alice@", "")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert stat.S_IMODE(os.stat(d.docroots["alice"] / "put.bin").st_mode) == 0o640
