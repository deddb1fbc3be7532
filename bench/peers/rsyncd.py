"""rsync: an ``rsync --daemon`` on the server side, ``rsync -a`` push and pull on the client.

The reference for many small files: one process per side, one TCP connection, the file
list sent first, then each file's bytes (``-a`` keeps times and modes, as ours does).
rsync never fsyncs, so it is compared with our daemon's ``--no-fsync`` rows. Into an empty
destination each time (``--whole-file`` is rsync's default between local paths only; over
the daemon protocol, an empty destination means nothing to delta against anyway).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.peers.measure import count_files, measured, status_of, tree_bytes
from bench.peers.tools import Ctx
from bench.proc import ServerProbe
from bench.results import PeerResult
from bench.site import Site

RSYNC_PORT = 18873


class RsyncHandle:
    """``rsync --daemon --no-detach`` with one writable module ``m`` over ``root``."""

    def __init__(self, site: Site, run_dir: Path, root: Path, port: int = RSYNC_PORT) -> None:
        self.site = site
        self.run_dir = run_dir
        self.root = root
        self.port = port
        self.proc: subprocess.Popen[Any] | None = None
        self.probe = ServerProbe(None)

    def start(self) -> RsyncHandle:
        """Write the config and start the daemon; wait until it accepts connections."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        conf = self.run_dir / "rsyncd.conf"
        conf.write_text(f"use chroot = no\npid file = {self.run_dir / 'rsyncd.pid'}\n"
                        f"[m]\npath = {self.root}\nread only = no\n"
                        f"uid = {os.getuid()}\ngid = {os.getgid()}\n")
        log = open(self.run_dir / "rsyncd.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = self.site.launch_server(
            ["rsync", "--daemon", "--no-detach", f"--port={self.port}",
             f"--address={self.site.bind}", f"--config={conf}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        end = time.monotonic() + 10
        while time.monotonic() < end:
            p = subprocess.run(self.site.client_argv(["rsync", f"rsync://{self.site.host}:"
                                                      f"{self.port}/"]),
                               capture_output=True, timeout=10)
            if p.returncode == 0:
                self.probe = ServerProbe(self.proc.pid)
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("rsync daemon did not start")

    def url(self, path: str) -> str:
        return f"rsync://{self.site.host}:{self.port}/m/{path.lstrip('/')}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def rsync_push(site: Site, ctx: Ctx, rs: RsyncHandle, src_dir: Path, nfiles: int) -> PeerResult:
    """``rsync -a SRC/ rsync://host/m/push/``: the upload reference for many small files."""
    target = rs.root / "push"
    shutil.rmtree(target, ignore_errors=True)
    return _rsync(site, ctx, rs, "up", [f"{src_dir}/", rs.url("push/")], target, nfiles)


def rsync_pull(site: Site, ctx: Ctx, rs: RsyncHandle, nfiles: int) -> PeerResult:
    """``rsync -a rsync://host/m/push/ DEST/``: the download reference (what was pushed)."""
    dest = ctx.dest / "rsync-pull"
    shutil.rmtree(dest, ignore_errors=True)
    try:
        return _rsync(site, ctx, rs, "down", [rs.url("push/"), f"{dest}/"], dest, nfiles)
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def _rsync(site: Site, ctx: Ctx, rs: RsyncHandle, direction: str, args: list[str],
           landed: Path, nfiles: int) -> PeerResult:
    """One measured ``rsync -a ARGS``; ``landed`` is where the files arrive (counted)."""
    r = PeerResult(ctx.scenario, "rsync-a", direction, ctx.cc, link_mbit=site.rate_mbit)
    m = measured(site, rs.probe, ["rsync", "-a", *args], ctx.cap_s, ctx.logs,
                 "rsync-push" if direction == "up" else "rsync-pull")
    m.fill(r)
    r.files = count_files(landed)
    r.bytes, r.seconds = tree_bytes(landed), m.run.wall_s
    r.status, r.note = status_of(m.run, None, r.bytes)
    if r.status == "ok" and r.files != nfiles:
        r.status, r.note = "failed", f"{r.files} of {nfiles} files arrived"
    return r
