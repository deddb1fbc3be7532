"""Why 4 MiB blocks: loopback throughput and client memory against the block size.

    python -m bench.blocksize [--size 1G] [--reps 3] [--dir /dev/shm/fb-blocksize]

Starts one daemon (fsync off, as the stock tools don't fsync either), then for
each block size uploads and downloads the same file over HTTP, interleaving
sizes across repetitions so machine noise spreads evenly, and prints the
median MB/s and the client's peak RSS. Run it on tmpfs to measure the protocol
rather than the disk. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {"1M": 1 << 20, "4M": 4 << 20, "16M": 16 << 20}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(argv: list[str], env: dict[str, str]) -> tuple[dict[str, object], float]:
    """Run the CLI, returning its JSON result and its own peak RSS in MB (from wait4)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()  # -q keeps stderr small: no deadlock
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = out.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"transfer failed: {err.decode()}")
    return json.loads(lines[-1]), usage.ru_maxrss / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default="/dev/shm/fb-blocksize")
    a = ap.parse_args()
    size = int(a.size[:-1]) << {"K": 10, "M": 20, "G": 30}[a.size[-1].upper()]
    base = Path(a.dir)
    shutil.rmtree(base, ignore_errors=True)
    (base / "root").mkdir(parents=True)
    (base / "local").mkdir()
    src = base / "local" / "src.bin"
    with open(src, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(chunk)
    from fallback.auth import hash_password

    port = _free_port()
    (base / "conf.xml").write_text(
        f'<CONF version="2"><server><state_dir>{base}/state</state_dir></server>'
        f"<http_server><http_port>{port}</http_port><enable_http>true</enable_http>"
        f"<enable_https>false</enable_https><bind_address>127.0.0.1</bind_address>"
        f"</http_server><file_system><fsync>false</fsync></file_system>"
        f"<users><user><name>b</name><password_hash>{hash_password('pw')}</password_hash>"
        f"<docroot>{base}/root</docroot></user></users></CONF>")
    daemon = subprocess.Popen([sys.executable, "-m", "fallback", "serve", "--config",
                               str(base / "conf.xml")], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    assert daemon.stdout is not None
    while daemon.stdout.readline().strip() != "ready":
        time.sleep(0.01)
    env = {**os.environ, "FALLBACK_PASSWORD": "pw"}
    cli = [sys.executable, "-m", "fallback", "transfer"]
    up: dict[str, list[float]] = {k: [] for k in SIZES}
    down: dict[str, list[float]] = {k: [] for k in SIZES}
    rss: dict[str, float] = dict.fromkeys(SIZES, 0.0)
    try:
        for _ in range(a.reps):
            for name in SIZES:
                url = f"http://b@127.0.0.1:{port}/{name}.bin"
                res, r1 = _run(cli + [str(src), url, "--block-size", name, "--json", "-q",
                                      "--overwrite", "always", "--resume", "none",
                                      "--no-fsync", "--transport", "http"], env)
                up[name].append(int(res["bytes"]) / float(res["seconds"]) / 1e6)  # type: ignore[arg-type]
                dst = base / "local" / f"dl-{name}.bin"
                res, r2 = _run(cli + [url, str(dst), "--json", "-q", "--overwrite", "always",
                                      "--resume", "none", "--no-fsync", "--transport", "http"],
                               env)
                down[name].append(int(res["bytes"]) / float(res["seconds"]) / 1e6)  # type: ignore[arg-type]
                rss[name] = max(rss[name], r1, r2)
                dst.unlink()
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        shutil.rmtree(base, ignore_errors=True)
    print(f"{size / 2**30:.2f} GiB over HTTP on loopback, median of {a.reps} (MB/s)")
    print(f"{'block':>6} {'upload':>8} {'download':>9} {'client peak RSS':>16}")
    for name in SIZES:
        print(f"{name:>6} {statistics.median(up[name]):8.0f} {statistics.median(down[name]):9.0f} "
              f"{rss[name]:13.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
