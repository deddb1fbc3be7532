"""aioquic (or qh3) as the Python UDP peer on an emulated link: a download of the
scenario's file size from a ``bench.peers.quic serve`` in namespace B to a measured
``bench.peers.quic fetch`` in namespace A. Loss-based congestion control (aioquic: Reno),
so on lossy long paths it collapses as TCP Reno does; the row shows where."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from bench.peers import quic
from bench.peers.measure import measured
from bench.peers.ours import REPO_ROOT, ours_env
from bench.peers.tools import Ctx
from bench.proc import ServerProbe
from bench.results import PeerResult
from bench.site import Site

PORT = 4433


def quic_download(site: Site, ctx: Ctx, size: int, lib: str = "aioquic",
                  datagram: int = quic.SMALL) -> PeerResult:
    """One connection, one stream of *size* bytes (whole MiB) B -> A; capped at
    ``ctx.cap_s`` (the client then reports the bytes that arrived)."""
    r = PeerResult(ctx.scenario, f"{lib}-udp", "down", "reno" if lib == "aioquic" else "",
                   link_mbit=site.rate_mbit)
    if not quic.available(lib):
        r.status, r.note = "skipped", f"not measured ({lib} missing: pip install '.[bench]')"
        return r
    ctx.logs.mkdir(parents=True, exist_ok=True)
    mb = max(1, size >> 20)
    log = open(ctx.logs / f"{lib}-server.log", "wb")  # noqa: SIM115 - handed to the child
    srv = site.launch_server(
        [sys.executable, "-m", "bench.peers.quic", "serve", "--lib", lib, "--bind", site.bind,
         "--port", str(PORT), "--mb", str(mb), "--datagram", str(datagram),
         "--timeout", str(ctx.cap_s + 30)],
        stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=ours_env(),
        cwd=str(REPO_ROOT))
    log.close()
    try:
        assert srv.stdout is not None
        line = srv.stdout.readline()  # {"ready": port}: bound and listening
        if not line:
            r.status, r.note = "failed", f"{lib} server did not start (see logs)"
            return r
        deadline = ctx.cap_s
        argv = [sys.executable, "-m", "bench.peers.quic", "fetch", "--lib", lib, "--host",
                site.host, "--port", str(PORT), "--datagram", str(datagram),
                "--deadline", str(deadline)]
        m = measured(site, ServerProbe(srv.pid), argv, deadline + 20, ctx.logs,
                     f"{lib}-down", env=ours_env())
        m.fill(r)
        try:
            out = json.loads(m.run.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            r.status, r.note = "failed", f"{lib} fetch: {(m.run.stderr or '?')[-160:]}"
            return r
        r.bytes, r.seconds = int(out["bytes"]), float(out["seconds"])
        if not out["complete"]:
            r.status = "capped"
            r.note = f"time cap hit; goodput from {r.bytes / 1e6:.1f} MB received"
        elif r.bytes < mb << 20:
            r.status, r.note = "failed", f"short: {r.bytes} of {mb << 20} bytes"
        return r
    finally:
        if srv.poll() is None:
            srv.terminate()
            try:
                srv.wait(timeout=5)
            except subprocess.TimeoutExpired:
                srv.kill()
        time.sleep(0.2)
