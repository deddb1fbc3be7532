"""Small files on loopback, ours beside ``rsync -a`` to an rsync daemon, in one run.

``python -m bench.smallfiles [--files N] [--size BYTES] [--fsync both|on|off] [--reps K]``

Starts, on 127.0.0.1 only: one ``fallback serve`` per fsync setting (``<file_system><fsync>``)
and one ``rsync --daemon`` (no fsync: rsync never syncs). Then, ``--reps`` times each: our
folder upload and download over plain HTTP (``--no-fsync`` on the client when the daemon's
fsync is off, so both ends write alike), and ``rsync -a`` push and pull. Every transfer goes
into an empty destination, so every file really moves. Prints one line per measurement,
files/s, and the best of the repetitions as JSON on the last line (``--json``).

No link emulator: the figure is the per-file cost of each tool on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def make_tree(root: Path, n: int, size: int) -> Path:
    """``n`` random files of ``size`` bytes in ``root/src`` (100 per folder beyond 1,000)."""
    src = root / "src"
    if src.exists():
        return src
    src.mkdir(parents=True)
    per = n if n <= 1000 else 1000
    for i in range(n):
        d = src if n <= 1000 else src / f"d{i // per:03d}"
        if i % per == 0:
            d.mkdir(exist_ok=True)
        (d / f"f{i:06d}.bin").write_bytes(os.urandom(size))
    return src


class Daemon:
    """``fallback serve`` on loopback with one user ``bench``."""

    def __init__(self, base: Path, fsync: bool) -> None:
        self.base = base
        self.fsync = fsync
        self.port = _port()
        self.docroot = base / "docroot"
        self.password = secrets.token_urlsafe(12)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        self.docroot.mkdir(parents=True, exist_ok=True)
        h = subprocess.run([sys.executable, "-m", "fallback", "hash-password"],
                           input=self.password + "\n", capture_output=True, text=True,
                           env=_env(), check=True).stdout.strip().splitlines()[-1]
        conf = self.base / "conf.xml"
        conf.write_text(
            '<CONF version="2"><http_server>'
            f"<http_port>{self.port}</http_port><https_port>{_port()}</https_port>"
            "<enable_http>true</enable_http><enable_https>false</enable_https>"
            "<bind_address>127.0.0.1</bind_address></http_server>"
            f"<server><state_dir>{self.base / 'state'}</state_dir></server>"
            f"<file_system><fsync>{'true' if self.fsync else 'false'}</fsync></file_system>"
            f"<users><user><name>bench</name><password_hash>{h}</password_hash>"
            f"<docroot>{self.docroot}</docroot></user></users></CONF>\n")
        log = open(self.base / "daemon.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([sys.executable, "-m", "fallback", "serve", "--config",
                                      str(conf)], stdout=subprocess.PIPE, stderr=log, env=_env(),
                                     cwd=self.base)
        log.close()
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError((self.base / "daemon.log").read_text()[-2000:])
            if line.strip() == b"ready":
                return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)

    def transfer(self, src: str, dst: str) -> dict[str, Any]:
        argv = [sys.executable, "-m", "fallback", "transfer", src, dst, "--json", "-q",
                "--overwrite", "always", "--resume", "none"]
        if not self.fsync:
            argv.append("--no-fsync")
        with tempfile.TemporaryFile("w+") as out:  # a file, not a pipe: the result is large
            p = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, text=True,
                               env={**_env(), "FALLBACK_PASSWORD": self.password})
            out.seek(0)
            text = out.read()
        if p.returncode != 0:
            raise RuntimeError(f"transfer failed: {p.stderr[-2000:]}")
        try:
            return dict(json.loads(text.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            raise RuntimeError(f"no JSON result: {text[-300:]!r} {p.stderr[-2000:]}") from None

    def url(self, path: str) -> str:
        return f"http://bench@127.0.0.1:{self.port}{path}"


class RsyncDaemon:
    """``rsync --daemon --no-detach`` on loopback with one writable module ``m``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = _port()
        self.root = base / "module"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RsyncDaemon:
        self.root.mkdir(parents=True, exist_ok=True)
        conf = self.base / "rsyncd.conf"
        conf.write_text(f"use chroot = no\npid file = {self.base / 'rsyncd.pid'}\n"
                        f"[m]\npath = {self.root}\nread only = no\nuid = {os.getuid()}\n"
                        f"gid = {os.getgid()}\n")
        self.proc = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--port={self.port}",
                                      "--address=127.0.0.1", f"--config={conf}"],
                                     stderr=open(self.base / "rsyncd.log", "ab"))  # noqa: SIM115
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("rsync daemon did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)

    def url(self, path: str) -> str:
        return f"rsync://127.0.0.1:{self.port}/m/{path}"


def _timed(fn: Any) -> float:
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def _rsync(*args: str) -> None:
    subprocess.run(["rsync", "-a", *args], check=True, capture_output=True)


def run(n: int, size: int, fsync_modes: list[bool], reps: int, work: Path) -> dict[str, float]:
    """files/s by measurement name (best of ``reps``)."""
    src = make_tree(work, n, size)
    best: dict[str, float] = {}

    def note(name: str, seconds: float) -> None:
        fps = n / seconds
        print(f"{name:28s} {seconds:8.2f} s {fps:10.0f} files/s", flush=True)
        best[name] = max(best.get(name, 0.0), fps)

    daemons = {f: Daemon(work / f"ours-fsync-{'on' if f else 'off'}", f).start()
               for f in fsync_modes}
    rs = RsyncDaemon(work / "rsync").start() if shutil.which("rsync") else None
    try:
        for _ in range(reps):
            if rs is not None:
                shutil.rmtree(rs.root / "up", ignore_errors=True)
                note("rsync-a push", _timed(lambda: _rsync(f"{src}/", rs.url("up/"))))
                pulled = work / "rsync-down"
                shutil.rmtree(pulled, ignore_errors=True)
                note("rsync-a pull", _timed(lambda p=pulled: _rsync(rs.url("up/"), f"{p}/")))
                shutil.rmtree(pulled, ignore_errors=True)
            for f, d in daemons.items():
                tag = "fsync-on" if f else "fsync-off"
                shutil.rmtree(d.docroot / "up", ignore_errors=True)
                note(f"ours-http up {tag}",
                     _timed(lambda d=d: d.transfer(str(src), d.url("/up"))))
                down = work / f"ours-down-{tag}"
                shutil.rmtree(down, ignore_errors=True)
                down.mkdir()
                note(f"ours-http down {tag}",
                     _timed(lambda d=d, down=down: d.transfer(d.url("/up"), f"{down}/")))
                shutil.rmtree(down, ignore_errors=True)
    finally:
        for d in daemons.values():
            d.stop()
        if rs is not None:
            rs.stop()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--fsync", choices=("both", "on", "off"), default="both")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="keep the trees here (default: a temp dir)")
    a = ap.parse_args()
    modes = {"both": [False, True], "on": [True], "off": [False]}[a.fsync]
    work = a.work or Path(tempfile.mkdtemp(prefix="fb-small-"))
    try:
        best = run(a.files, a.size, modes, a.reps, work)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: round(v) for k, v in best.items()}))


if __name__ == "__main__":
    main()
