"""Scenarios that are not "each peer alone": fairness, TCP-friendliness, many small files."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bench import prereqs
from bench.flows import run_concurrent
from bench.peers import ours as ours_mod
from bench.peers.rsyncd import RsyncHandle, rsync_pull, rsync_push
from bench.peers.tools import IPERF_PORT, Ctx, small_files_curl_each, small_files_tar
from bench.results import PeerResult
from bench.scenarios import Scenario
from bench.site import Site

if TYPE_CHECKING:
    from bench.runner import Runner, Servers

SMALL_FILE_BYTES = 8 * 1024
MiB = 1 << 20


def jain(xs: Sequence[float]) -> float:
    """Jain's fairness index: 1.0 when equal, 1/n when one flow takes everything."""
    if not xs or sum(xs) <= 0:
        return 0.0
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


def _client(kind: str, site: Site, srv: Servers, name: str, dest: Path,
            seconds: float) -> list[str]:
    """argv of one long-running download client for a concurrent run."""
    if kind == "iperf3-cubic":
        return ["iperf3", "-c", site.host, "-p", str(IPERF_PORT), "-R", "-C", "cubic",
                "-t", f"{seconds + 5:g}"]
    if kind == "curl-https":
        assert srv.nginx is not None
        return ["curl", "-sS", "--http1.1", "-k", "-o", str(dest / name),
                srv.nginx.url(name, https=True, host=site.host)]
    if kind.startswith("ours-udp"):  # ours-udp (the default policy), ours-udp-POLICY
        assert srv.ours is not None
        policy = kind.removeprefix("ours-udp").removeprefix("-")
        return [*ours_mod.fallback_argv(), "transfer", srv.ours.url(name, True), f"{dest}/",
                "--transport", "udp", "--json", "-q", "--overwrite", "always", "--resume",
                "none", "--no-fsync", "--fingerprint", srv.ours.fingerprint,
                *(["--policy", policy] if policy else [])]
    if kind.startswith("ours-https"):  # ours-https (the default policy), ours-https-POLICY
        assert srv.ours is not None
        policy = kind.removeprefix("ours-https").removeprefix("-")
        return [*ours_mod.fallback_argv(), "transfer", srv.ours.url(name, True), f"{dest}/",
                "--transport", "https", "--json", "-q", "--streams", "4", "--overwrite",
                "always", "--resume", "none", "--no-fsync", "--fingerprint",
                srv.ours.fingerprint, *(["--policy", policy] if policy else [])]
    raise ValueError(kind)


def concurrent_pair(runner: Runner, site: Site, sc: Scenario, srv: Servers,
                    kinds: Sequence[str], label: str) -> list[PeerResult]:
    """Run *kinds* at once; each row's goodput is its steady-state window rate and share."""
    opts = runner.opts
    if any(k.startswith("ours") for k in kinds) and srv.ours is None:
        return [PeerResult(sc.name, f"{k}#{i + 1}", status="skipped", note=srv.ours_skip or "")
                for i, k in enumerate(kinds)]
    lack = sorted({t for k in kinds for t in prereqs.missing_for(k, runner.missing)})
    if lack:
        return [PeerResult(sc.name, f"{k}#{i + 1}", status="skipped",
                           note=f"not measured ({', '.join(lack)} missing)")
                for i, k in enumerate(kinds)]
    total = opts.concurrent_s
    # Big enough that neither client finishes inside the window, even alone on the link.
    size = max(4, round(sc.rate_mbit * 1e6 / 8 * total * 1.5 / MiB)) * MiB
    name, _ = runner.data_file(size)
    dests = [runner.work / "dest" / sc.name / f"{label}-{i}" for i in range(len(kinds))]
    for d in dests:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    argvs = [_client(k, site, srv, name, d, total) for k, d in zip(kinds, dests, strict=True)]
    env = ours_mod.ours_env({"FALLBACK_PASSWORD": srv.ours.password} if srv.ours else {})
    logs = opts.out / "logs" / sc.name
    logs.mkdir(parents=True, exist_ok=True)
    w0 = site.begin()
    res = run_concurrent(site, argvs, total, warmup_s=total / 4, env=env,
                         log_prefix=str(logs / f"{label}-"),
                         dirs=[d if k.startswith("ours-udp") else None
                               for k, d in zip(kinds, dests, strict=True)])
    resent, emu = site.end(w0)
    for d in dests:
        shutil.rmtree(d, ignore_errors=True)
    by_pid = res.window.bytes_by_pid()
    span = max(1e-6, res.window.t1 - res.window.t0)
    got = [by_pid.get(pid, 0) for pid in res.pids]
    total_bytes = sum(got) or 1
    j = jain(got)
    rows = []
    for i, (k, pid, b) in enumerate(zip(kinds, res.pids, got, strict=True)):
        r = PeerResult(sc.name, f"{k}#{i + 1}", "down", "cubic" if "cubic" in k else opts.cc,
                       bytes=b, seconds=span, link_mbit=site.rate_mbit,
                       client_cpu_s=res.cpu_s.get(pid), client_rss_mb=res.maxrss_mb.get(pid),
                       share_pct=100.0 * b / total_bytes, emu=emu,
                       note=f"{label}: concurrent, {span:.0f} s window; Jain {j:.3f}")
        r.load_avg = os.getloadavg()[0]
        if b == 0:
            r.status = "failed"
            r.note += f"; no bytes (exit {res.returncodes.get(pid)})"
        if i == 0:
            r.resent_bytes = resent  # the window's retransmissions, for the pair as a whole
        rows.append(r)
    return rows


def make_small_files(runner: Runner, n: int) -> Path:
    """*n* random 8 KiB files in one directory (created once per run)."""
    d = runner.work / f"small-{n}"
    if not d.exists():
        tmp = d.with_suffix(".tmp")
        tmp.mkdir()
        for i in range(n):
            (tmp / f"f{i:05d}.bin").write_bytes(os.urandom(SMALL_FILE_BYTES))
        tmp.rename(d)
    return d


def small_files(runner: Runner, site: Site, sc: Scenario, srv: Servers) -> list[PeerResult]:
    """N x 8 KiB, up and down: ours (folder upload, then download of what it uploaded),
    ``rsync -a`` push and pull against an rsync daemon, tar | curl -T, per-file curl -T."""
    n = runner.opts.small_files
    src = make_small_files(runner, n)
    ctx: Ctx = runner.ctx(sc, cap_s=runner.opts.small_cap_s)
    ng = srv.nginx
    rows: list[PeerResult] = []
    rs: RsyncHandle | None = None
    try:
        for key in ("ours-https-up", "ours-http-up", "rsync-a-up", "tar+curl-http",
                    "curl-T-each", "ours-https-down", "ours-http-down", "rsync-a-down"):
            if not runner.opts.wants(key):
                continue
            direction = "down" if key.endswith("-down") else "up"
            peer = key.removesuffix(f"-{direction}")
            skipped = runner.not_measured(sc.name, key, direction)
            if skipped is not None:
                rows.append(skipped)
                continue
            if key.startswith("ours"):
                if srv.ours is None:
                    rows.append(PeerResult(sc.name, peer, direction, status="skipped",
                                           note=srv.ours_skip or ""))
                    continue
                https = "https" in key
                if direction == "up":
                    r = ours_mod.ours_transfer(site, ctx, srv.ours, upload=True, https=https,
                                               src=src, expected=n * SMALL_FILE_BYTES,
                                               peer=peer, files=n)
                else:  # what the upload row put there
                    r = ours_mod.ours_transfer(site, ctx, srv.ours, upload=False, https=https,
                                               src=f"up/{peer}/{src.name}",
                                               expected=n * SMALL_FILE_BYTES, peer=peer,
                                               files=n)
            elif key.startswith("rsync"):
                if rs is None:
                    rs = RsyncHandle(site, runner.work / "rsyncd", runner.work / "rsync-root")
                    rs.start()
                r = rsync_push(site, ctx, rs, src, n) if direction == "up" else \
                    rsync_pull(site, ctx, rs, n)
            elif ng is None:
                rows.append(PeerResult(sc.name, key, "up", status="skipped",
                                       note="not measured (nginx did not start)"))
                continue
            elif key == "tar+curl-http":
                r = small_files_tar(site, ctx, ng, src, n)
            else:
                r = small_files_curl_each(site, ctx, ng, src, n)
            fps = r.files_per_s
            r.note = (f"{fps:.0f} files/s; " if fps else "") + r.note
            rows.append(r)
    finally:
        if rs is not None:
            rs.stop()
    return rows


def run_special(runner: Runner, site: Site, sc: Scenario, srv: Servers) -> list[PeerResult]:
    """Dispatch the non-WAN kinds."""
    if sc.kind == "fairness":
        rows = []
        if runner.opts.wants("curl-https"):
            rows += concurrent_pair(runner, site, sc, srv, ("curl-https", "curl-https"), "ref")
        if runner.opts.wants("ours-https"):
            rows += concurrent_pair(runner, site, sc, srv, ("ours-https", "ours-https"), "ours")
        if runner.opts.wants("ours-udp"):
            rows += concurrent_pair(runner, site, sc, srv, ("ours-udp", "ours-udp"), "ours-udp")
        return rows
    if sc.kind == "tcp-friendly":
        rows = []
        solo: float | None = None
        if runner.opts.wants("iperf3-cubic"):  # cubic alone: what "keeps N %" is a share of
            rows += concurrent_pair(runner, site, sc, srv, ("iperf3-cubic",), "solo")
            solo = rows[-1].goodput_mbps
        if runner.opts.wants("curl-https"):
            rows += concurrent_pair(runner, site, sc, srv, ("curl-https", "iperf3-cubic"), "ref")
        # ours with the default policy (fair), then each policy that yields named explicitly
        for ours, label in (("ours-https", "ours"), ("ours-https-fair", "ours-fair"),
                            ("ours-https-low", "ours-low"), ("ours-udp-low", "ours-udp-low"),
                            ("ours-udp-fair", "ours-udp-fair")):
            if runner.opts.wants(ours):
                pair = concurrent_pair(runner, site, sc, srv, (ours, "iperf3-cubic"), label)
                cubic = pair[-1].goodput_mbps
                if solo and cubic is not None:
                    pair[-1].note += f"; cubic keeps {100 * cubic / solo:.0f} % of its solo rate"
                rows += pair
        return rows
    if sc.kind == "small-files":
        return small_files(runner, site, sc, srv)
    raise ValueError(f"unknown scenario kind {sc.kind}")
