"""Reference peers built from stock tools: iperf3, curl, aria2c, tar | curl -T.

They bracket what "good" looks like on a given link: iperf3 is the kernel's TCP with no
application in the way, curl/nginx is a tuned single-stream HTTP(S) stack, aria2c -x8 shows what
parallel streams buy on lossy paths.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.peers.measure import count_files, measured, status_of, tree_bytes
from bench.peers.nginx import NginxHandle
from bench.proc import ServerProbe
from bench.results import PeerResult
from bench.site import Site

IPERF_PORT = 5201


@dataclass
class Ctx:
    """What a peer run needs besides the site: names, limits, places."""

    scenario: str
    cap_s: float
    logs: Path
    dest: Path
    cc: str = "bbr"


def start_iperf_server(site: Site, logs: Path) -> tuple[subprocess.Popen[Any], ServerProbe]:
    """Long-running ``iperf3 -s`` on the server side (one per scenario)."""
    logs.mkdir(parents=True, exist_ok=True)
    log = open(logs / "iperf3-server.log", "wb")  # noqa: SIM115 - handed to the child
    p = site.launch_server(["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=log, stderr=log,
                           stdin=subprocess.DEVNULL)
    log.close()
    return p, ServerProbe(p.pid)


def iperf3(site: Site, ctx: Ctx, probe: ServerProbe, cc: str, seconds: float,
           peer: str | None = None) -> PeerResult:
    """Single TCP stream, server -> client (-R, same direction as downloads), time-bounded."""
    r = PeerResult(ctx.scenario, peer or f"iperf3-{cc}", "down", cc, link_mbit=site.rate_mbit)
    argv = ["iperf3", "-c", site.host, "-p", str(IPERF_PORT), "-R", "-J", "-C", cc,
            "-t", f"{seconds:g}", "--connect-timeout", "5000"]
    m = None
    for attempt in range(4):
        # iperf3 -s serves one test at a time and needs a moment between tests (and after
        # start); a quick failure is retried, a failure after a real run is reported.
        time.sleep(0.5)
        m = measured(site, probe, argv, seconds + 30, ctx.logs, f"{r.peer}-{attempt}")
        if m.run.returncode == 0 or m.run.wall_s > seconds / 2:
            break
    assert m is not None
    m.fill(r)
    try:
        end = json.loads(m.run.stdout)["end"]
        r.bytes = int(end["sum_received"]["bytes"])
        r.seconds = float(end["sum_received"]["seconds"])
        used = end.get("sender_tcp_congestion") or cc
        r.cc = used
        r.note = f"{end['sum_sent'].get('retransmits', 0)} retransmits"
    except (ValueError, KeyError) as exc:
        r.status, r.note = "failed", f"iperf3: {exc}: {(m.run.stderr or m.run.stdout)[-160:]}"
    return r


def curl_download(site: Site, ctx: Ctx, nginx: NginxHandle, name: str, size: int,
                  https: bool) -> PeerResult:
    """curl fetching one file from nginx (HTTP/1.1, one connection), written to disk."""
    peer = "curl-https" if https else "curl-http"
    r = PeerResult(ctx.scenario, peer, "down", ctx.cc, link_mbit=site.rate_mbit)
    out = ctx.dest / peer / name
    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir(parents=True)
    argv = ["curl", "-sS", "--http1.1", "-k", "-o", str(out),
            nginx.url(name, https=https, host=site.host)]
    m = measured(site, nginx.probe, argv, ctx.cap_s, ctx.logs, peer)
    m.fill(r)
    r.bytes, r.seconds = tree_bytes(out), m.run.wall_s
    r.status, r.note = status_of(m.run, size, r.bytes)
    shutil.rmtree(out.parent, ignore_errors=True)
    return r


def curl_upload(site: Site, ctx: Ctx, nginx: NginxHandle, src: Path, https: bool) -> PeerResult:
    """curl -T of one file to nginx's WebDAV location."""
    peer = "curl-https" if https else "curl-http"
    r = PeerResult(ctx.scenario, peer, "up", ctx.cc, link_mbit=site.rate_mbit)
    target = nginx.root_dir / "upload" / peer
    shutil.rmtree(target, ignore_errors=True)
    argv = ["curl", "-sS", "--http1.1", "-k", "--fail", "-T", str(src),
            nginx.url(f"upload/{peer}/{src.name}", https=https, host=site.host)]
    m = measured(site, nginx.probe, argv, ctx.cap_s, ctx.logs, f"{peer}-up")
    m.fill(r)
    # nginx writes the body to a temp file and renames it when complete: only count whole files
    r.bytes, r.seconds = tree_bytes(target), m.run.wall_s
    r.status, r.note = status_of(m.run, src.stat().st_size, r.bytes)
    shutil.rmtree(target, ignore_errors=True)
    return r


def aria2_download(site: Site, ctx: Ctx, nginx: NginxHandle, name: str, size: int,
                   connections: int = 8) -> PeerResult:
    """aria2c -x8: eight ranged HTTP connections to nginx for one file."""
    peer = f"aria2c-x{connections}"
    r = PeerResult(ctx.scenario, peer, "down", ctx.cc, link_mbit=site.rate_mbit)
    out_dir = ctx.dest / peer
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    argv = ["aria2c", f"-x{connections}", f"-s{connections}", "-k1M", "--min-split-size=1M",
            "--allow-overwrite=true", "--auto-file-renaming=false", "--file-allocation=none",
            "--summary-interval=0", "--console-log-level=warn", "--check-certificate=false",
            "-d", str(out_dir), "-o", name, nginx.url(name, host=site.host)]
    m = measured(site, nginx.probe, argv, ctx.cap_s, ctx.logs, peer)
    m.fill(r)
    r.bytes, r.seconds = tree_bytes(out_dir / name), m.run.wall_s
    r.status, r.note = status_of(m.run, size, r.bytes)
    shutil.rmtree(out_dir, ignore_errors=True)
    return r


def small_files_tar(site: Site, ctx: Ctx, nginx: NginxHandle, src_dir: Path,
                    nfiles: int) -> PeerResult:
    """``tar c | curl -T -`` into nginx: the streaming baseline for many small files."""
    peer = "tar+curl-http"
    r = PeerResult(ctx.scenario, peer, "up", ctx.cc, link_mbit=site.rate_mbit)
    target = nginx.root_dir / "upload" / "tar"
    shutil.rmtree(target, ignore_errors=True)
    url = nginx.url("upload/tar/small.tar", host=site.host)
    script = f"tar -C {src_dir} -cf - . | curl -sS --fail --http1.1 -T - {url}"
    m = measured(site, nginx.probe, ["sh", "-c", script], ctx.cap_s, ctx.logs, "tar-curl")
    m.fill(r)
    r.bytes, r.seconds = tree_bytes(target), m.run.wall_s
    r.status, r.note = status_of(m.run, None, r.bytes)
    r.files = nfiles if r.status == "ok" else 0
    shutil.rmtree(target, ignore_errors=True)
    return r


def small_files_curl_each(site: Site, ctx: Ctx, nginx: NginxHandle, src_dir: Path,
                          nfiles: int) -> PeerResult:
    """One curl process PUTting every file in turn over one keep-alive connection."""
    peer = "curl-T-each"
    r = PeerResult(ctx.scenario, peer, "up", ctx.cc, link_mbit=site.rate_mbit)
    target = nginx.root_dir / "upload" / "each"
    shutil.rmtree(target, ignore_errors=True)
    names = sorted(p.name for p in src_dir.iterdir())
    cfg = ctx.logs / "curl-each.cfg"
    ctx.logs.mkdir(parents=True, exist_ok=True)
    with open(cfg, "w") as f:
        for n in names:
            f.write(f'upload-file = "{src_dir / n}"\n')
            f.write(f'url = "{nginx.url("upload/each/" + n, host=site.host)}"\n')
    argv = ["curl", "-sS", "--fail", "--http1.1", "-K", str(cfg)]
    m = measured(site, nginx.probe, argv, ctx.cap_s, ctx.logs, "curl-each")
    m.fill(r)
    r.files = count_files(target)
    r.bytes, r.seconds = tree_bytes(target), m.run.wall_s
    r.status, r.note = status_of(m.run, None, r.bytes)
    shutil.rmtree(target, ignore_errors=True)
    return r
