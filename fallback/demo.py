"""``fallback demo``: the whole product in one command, on loopback.

Starts a daemon in the background with embedded defaults (in a temporary
folder), sends the same generated file up and back down over UDP, over HTTPS
and over plain HTTP, verifies every copy, prints transport, size, time and rate
side by side, and stops the daemon. Uses ports 8080/8443/33001 when free, else
free ports.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fallback.auth import hash_password
from fallback.engine import transfer
from fallback.result import TransferResult


def _port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


def _udp_port(preferred: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


def _make_file(path: Path, size: int) -> str:
    """Random-looking but cheap content (so the demo measures transfer, not urandom)."""
    h = hashlib.sha256()
    seed = os.urandom(1 << 20)
    with open(path, "wb") as f:
        left, n = size, 0
        while left > 0:
            piece = hashlib.blake2b(n.to_bytes(8, "big")).digest() + seed[64:]
            piece = piece[: min(left, len(piece))]
            f.write(piece)
            h.update(piece)
            left -= len(piece)
            n += 1
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def run_demo(size: int, streams: int = 4) -> int:
    with tempfile.TemporaryDirectory(prefix="fallback-demo-") as tmp:
        base = Path(tmp)
        docroot = base / "docroot"
        docroot.mkdir()
        password = secrets.token_urlsafe(12)
        http_port, https_port, udp_port = _port(8080), _port(8443), _udp_port(33001)
        conf = base / "aspera.conf"
        conf.write_text(f"""<?xml version='1.0' encoding='UTF-8'?>
<CONF version="2">
  <server><state_dir>{base / "state"}</state_dir></server>
  <http_server>
    <bind_address>127.0.0.1</bind_address>
    <http_port>{http_port}</http_port><enable_http>true</enable_http>
    <https_port>{https_port}</https_port><enable_https>true</enable_https>
  </http_server>
  <transfer><protocol_options><bind_udp_port>{udp_port}</bind_udp_port></protocol_options>
  </transfer>
  <users><user><name>demo</name><password_hash>{hash_password(password)}</password_hash>
    <docroot>{docroot}</docroot></user></users>
</CONF>
""")
        print(f"starting daemon on 127.0.0.1 (http {http_port}, https {https_port}, "
              f"udp {udp_port}) ...", flush=True)
        proc = subprocess.Popen([sys.executable, "-m", "fallback", "serve", "--config", str(conf)],
                                stdout=subprocess.PIPE, stderr=open(base / "daemon.log", "w"),
                                text=True)
        try:
            fp = _wait_ready(proc, base)
            src = base / "demo.bin"
            print(f"generating {size / 1e6:.1f} MB test file ...", flush=True)
            digest = _make_file(src, size)
            print(f"{'direction':<10} {'transport':<9} {'size':>10} {'time':>8} {'rate':>14}  verified")
            ok = True
            # UDP (its key over the HTTPS control channel), then HTTPS and HTTP streams.
            for transport, scheme, port in (("udp", "https", https_port),
                                            ("https", "https", https_port),
                                            ("http", "http", http_port)):
                url = f"{scheme}://demo:{password}@127.0.0.1:{port}"
                fp_opt = {"fingerprint": fp} if scheme == "https" else {}
                up = transfer(str(src), f"{url}/{transport}/", transport=transport,
                              streams=streams, overwrite="always", **fp_opt)  # type: ignore[arg-type]
                stored = docroot / transport / src.name
                ok &= _row("upload", up, _sha256(stored) == digest)
                back = base / f"back-{transport}.bin"
                down = transfer(f"{url}/{transport}/{src.name}", str(back), transport=transport,
                                streams=streams, **fp_opt)  # type: ignore[arg-type]
                ok &= _row("download", down, _sha256(back) == digest)
                back.unlink()
            return 0 if ok else 1
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = -9
            print(f"daemon stopped (exit {rc})")


def _wait_ready(proc: subprocess.Popen[str], base: Path) -> str:
    assert proc.stdout is not None
    fp = ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"daemon failed to start:\n{(base / 'daemon.log').read_text()}")
        if "fingerprint SHA256" in line:
            fp = line.rsplit(" ", 1)[1].strip()
            print(f"daemon certificate SHA-256 {fp}")
        if line.strip() == "ready":
            return fp
    raise SystemExit("daemon did not become ready in 30 s")


def _row(direction: str, res: TransferResult, verified: bool) -> bool:
    size = f"{res.bytes / 1e6:.1f} MB"
    rate = f"{res.bytes / 1e6 / res.seconds:.0f} MB/s" if res.seconds else "-"
    print(f"{direction:<10} {res.transports[-1]:<9} {size:>10} "
          f"{res.seconds:>7.2f}s {rate:>14}  {'yes' if verified else 'NO'}", flush=True)
    return verified
