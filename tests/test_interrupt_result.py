"""``--json`` after Ctrl-C (130) and SIGTERM (143) is the whole result so far (trial).

Before: every key was there, but empty: ``"direction": ""``, ``"files": 0``,
``"sent_bytes": 0``, ``"checksums": {}``, ``"transports": []``, ``"seconds": 0.0``, after
2,560 of 5,000 files had reached the server. Now: the direction, the files and bytes
planned, the bytes sent so far, the seconds, the transports used, and the checksums of
exactly the files verified and published before the signal.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PASSWORDS, Daemon, free_port, make_file
from tests.test_cli_ux import base_env, fb, last_json
from transport.blocks.digest import digest_path
from transport.blocks.layout import DEFAULT_BLOCK_SIZE


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    b = tmp_path_factory.mktemp("intr")
    d = Daemon(b, free_port(), free_port(), {"alice": b / "docroot" / "alice"})
    d.start()
    yield d
    assert d.stop() == 0


def _interrupt(srv: Daemon, tmp_path: Path, src: Path, dest: str, sig: signal.Signals,
               after: float, *extra: str) -> tuple[int, dict, str]:
    env = base_env(tmp_path, PASSWORDS["alice"])
    p = subprocess.Popen(fb("transfer", str(src), srv.url(dest), "--json",
                            "--fingerprint", srv.fingerprint, *extra), env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    time.sleep(after)
    assert p.poll() is None, p.communicate()
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert "Traceback" not in err
    return p.returncode, last_json(out), err


def test_ctrl_c_json_reports_the_files_already_published(srv: Daemon, tmp_path: Path) -> None:
    tree = tmp_path / "many"
    tree.mkdir()
    n = 400
    for k in range(n):
        make_file(tree / f"f{k:04d}.bin", 20_000, seed=k)
    code, res, err = _interrupt(srv, tmp_path, tree, "/many-up/", signal.SIGINT, 3.0,
                                "-l", "8M")
    assert code == 130, err
    assert res["ok"] is False and res["error"] == "interrupted"
    assert res["direction"] == "upload"
    assert res["files"] == n and res["bytes"] == n * 20_000
    assert res["sent_bytes"] > 0 and res["seconds"] > 1.0
    assert res["transports"] == ["https"]
    there = srv.docroots["alice"] / "many-up"
    published = {f"many/{p.name}" for p in (there / "many").iterdir()} \
        if (there / "many").is_dir() else set()
    assert 0 < len(published) < n, len(published)
    # exactly the files the daemon verified and published, each with its true digest
    assert set(res["checksums"]) <= published
    assert len(res["checksums"]) >= len(published) - 10  # a group may land after the close
    for name, digest in res["checksums"].items():
        assert digest == digest_path(tree / name.split("/", 1)[1], DEFAULT_BLOCK_SIZE), name


def test_sigterm_json_reports_the_bytes_sent_of_a_large_file(srv: Daemon, tmp_path: Path) -> None:
    big = make_file(tmp_path / "big.bin", 48 << 20, seed=7)
    code, res, err = _interrupt(srv, tmp_path, big, "/big-up/", signal.SIGTERM, 3.0,
                                "-l", "40M")
    assert code == 143, err
    assert res["ok"] is False and res["error"] == "terminated"
    assert res["direction"] == "upload"
    assert res["files"] == 1 and res["bytes"] == 48 << 20
    assert 0 < res["sent_bytes"] < 48 << 20
    assert res["seconds"] > 2.0
    assert res["transports"] == ["https"]
    assert res["checksums"] == {} and res["verified"] is None


def test_ctrl_c_json_of_a_download(srv: Daemon, tmp_path: Path) -> None:
    make_file(srv.docroots["alice"] / "down.bin", 48 << 20, seed=8)
    env = base_env(tmp_path, PASSWORDS["alice"])
    p = subprocess.Popen(fb("transfer", srv.url("/down.bin"), str(tmp_path / "got.bin"),
                            "--json", "-l", "40M", "--fingerprint", srv.fingerprint),
                         env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL)
    time.sleep(3)
    assert p.poll() is None
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    res = last_json(out)
    assert res["direction"] == "download" and res["error"] == "interrupted"
    assert res["files"] == 1 and res["bytes"] == 48 << 20
    assert 0 < res["sent_bytes"] < 48 << 20 and res["transports"] == ["https"]
