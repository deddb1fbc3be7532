"""The benchmark on a machine without nginx, curl, aria2c or iperf3 (issue 14).

It used to fail every scenario with ``No such file or directory: '/usr/sbin/nginx'``.
Now it says in one line what to install, and still measures our own rows, marking
each reference peer "not measured (nginx missing)". The tools are hidden with a
PATH that lacks them (no root, no namespaces); the loopback scenario runs for real.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench import prereqs
from bench.runner import Runner, RunOptions
from bench.scenarios import select

REPO = Path(__file__).resolve().parents[1]


def _fake_tool(folder: Path, name: str) -> None:
    folder.mkdir(exist_ok=True)
    exe = folder / name
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)


def test_missing_tools_follow_the_path(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prereqs.missing_tools(str(empty)) == ["nginx", "curl", "aria2c", "iperf3", "openssl",
                                                 "rsync"]
    some = tmp_path / "some"
    for tool in ("curl", "openssl"):
        _fake_tool(some, tool)
    missing = prereqs.missing_tools(str(some))
    assert missing == ["nginx", "aria2c", "iperf3", "rsync"]
    line = prereqs.install_line(missing)
    assert "\n" not in line
    assert "apt-get install nginx-light aria2 iperf3 rsync" in line and "--install-peers" in line
    # which peers that hides, and which it does not
    assert prereqs.missing_for("curl-https", missing) == ["nginx"]
    assert prereqs.missing_for("aria2c-x8", missing) == ["aria2c", "nginx"]
    assert prereqs.missing_for("iperf3-bbr", missing) == ["iperf3"]
    assert prereqs.missing_for("ours-https-up", missing) == []
    assert prereqs.missing_for("rsync-a-down", missing) == ["rsync"]
    assert prereqs.missing_for("curl-http", []) == []


def test_bench_check_names_what_to_install(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty), "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "bench", "check"], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=60)
    assert p.returncode == 1, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 and "apt-get install" in lines[0]
    # curl, aria2c and iperf3 are not in an sbin folder, so this PATH hides them everywhere
    for pkg in ("curl", "aria2", "iperf3"):
        assert f" {pkg}" in lines[0].split("apt-get install", 1)[1]


def test_our_rows_run_when_nginx_is_missing(tmp_path: Path) -> None:
    opts = RunOptions.make(tmp_path / "out", tiny=True, peers=("curl-http", "ours-http"),
                           missing=("nginx",), work_base=tmp_path)
    runner = Runner(opts)
    try:
        results = runner.run(select(["loopback"]))
    finally:
        runner.close()
    rows = {r.peer: r for r in results}
    assert set(rows) == {"curl-http", "ours-http"}, [(r.peer, r.status, r.note) for r in results]
    assert rows["curl-http"].status == "skipped"
    assert rows["curl-http"].note == "not measured (nginx missing)"
    ours = rows["ours-http"]
    assert ours.status == "ok", ours.note
    assert ours.bytes == opts.loopback_bytes and ours.goodput_mbps
