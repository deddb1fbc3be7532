"""Run scenarios: build the site (loopback or emulated link), start servers, run each peer.

Every peer run is bounded (iperf3 by ``-t``, file transfers by a wall-clock cap), every server
is stopped in ``finally`` blocks, and the link tears itself down on exit, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import prereqs
from bench.netem import netns
from bench.netem.link import make_link
from bench.peers import ours as ours_mod
from bench.peers.nginx import NginxHandle, start_nginx
from bench.peers.tools import (
    Ctx,
    aria2_download,
    curl_download,
    curl_upload,
    iperf3,
    start_iperf_server,
)
from bench.proc import ServerProbe
from bench.results import PeerResult
from bench.scenarios import Scenario
from bench.site import Site

MiB = 1 << 20
NGINX_NS_PORTS = (18081, 18444)  # inside namespace B; ours keeps the contract's 18080/18443


@dataclass
class RunOptions:
    """Sizes and limits; ``--quick`` and FB_BENCH_TINY shrink them, nothing else changes."""

    out: Path
    peers: tuple[str, ...] = ("*",)
    cc: str = "bbr"
    seed: int = 1
    backend: str = "tun"
    tcp_buffers: str = "typical"
    data_seconds: float = 20.0  # file size = link rate x this (amortises ramp-up)
    cap_s: float = 60.0  # wall-clock cap per file transfer
    iperf_s: float = 20.0
    loopback_bytes: int = 2048 * MiB
    concurrent_s: float = 30.0
    small_files: int = 10_000
    small_cap_s: float = 120.0
    work_base: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))
    keep_work: bool = False
    missing: tuple[str, ...] | None = None  # reference tools not installed; None: look
    # Issue 12: the UDP rows move 400 MB and up, so ramp-up is amortised as a user's would be
    # (the other peers keep link rate x data_seconds). 0 under --quick / tiny.
    udp_min_bytes: int = 400_000_000

    @classmethod
    def make(cls, out: Path, quick: bool = False, tiny: bool = False, **kw: Any) -> RunOptions:
        """Options for a full run, ``--quick`` (< 3 min) or tiny (smoke test, < 90 s)."""
        o = cls(out=out, **kw)
        if quick or tiny:
            o.loopback_bytes, o.data_seconds, o.iperf_s, o.cap_s = 256 * MiB, 4.0, 8.0, 25.0
            o.concurrent_s, o.small_files, o.small_cap_s = 15.0, 2000, 40.0
            o.udp_min_bytes = 0
        if tiny:
            o.loopback_bytes, o.data_seconds, o.iperf_s, o.cap_s = 32 * MiB, 1.5, 3.0, 15.0
            o.concurrent_s, o.small_files, o.small_cap_s = 8.0, 300, 20.0
        return o

    def wants(self, peer_key: str) -> bool:
        """Peer filter (shell globs on keys such as ``curl-https`` or ``ours-https-up``)."""
        return any(fnmatch.fnmatchcase(peer_key, p) for p in self.peers)


def free_port() -> int:
    """An unused loopback TCP port (loopback is shared with other tests and services)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log(msg: str) -> None:
    """Progress on stderr; the report is the product, this is for the impatient."""
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Servers:
    """Servers of one scenario (any may be None when not needed or not ready)."""

    nginx: NginxHandle | None = None
    iperf_probe: ServerProbe | None = None
    ours: ours_mod.OursServer | None = None
    ours_skip: str | None = None


class Runner:
    """Owns the scratch directory (data files, docroots, logs) for a whole run."""

    def __init__(self, opts: RunOptions) -> None:
        self.opts = opts
        opts.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="fbbench-", dir=opts.work_base))
        self.docroot = self.work / "srv"
        self.docroot.mkdir()
        (self.docroot / "up").mkdir()
        self.results: list[PeerResult] = []
        self.emulator: dict[str, dict[str, Any]] = {}
        self.missing = tuple(prereqs.missing_tools() if opts.missing is None else opts.missing)

    def not_measured(self, scenario: str, key: str, direction: str = "down") -> PeerResult | None:
        """A "not measured (nginx missing)" row when *key*'s tools are missing, else None."""
        lack = prereqs.missing_for(key, self.missing)
        if not lack:
            return None
        return PeerResult(scenario, key.removesuffix("-up"), direction, status="skipped",
                          note=f"not measured ({', '.join(lack)} missing)")

    def close(self) -> None:
        """Remove the scratch directory unless asked to keep it."""
        if not self.opts.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)

    # -- data ------------------------------------------------------------------------------
    def data_file(self, size: int) -> tuple[str, int]:
        """Incompressible file of *size* bytes in the docroot (created once per size)."""
        name = f"data-{size // MiB}M.bin" if size % MiB == 0 else f"data-{size}.bin"
        path = self.docroot / name
        if not path.exists() or path.stat().st_size != size:
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                left = size
                while left > 0:
                    n = min(left, 8 * MiB)
                    f.write(os.urandom(n))
                    left -= n
            tmp.rename(path)
        return name, size

    def size_for(self, rate_mbit: float) -> int:
        """File size that takes about ``data_seconds`` at the link rate (whole MiB, >= 4 MiB,
        at most 1 GiB: on a 1 Gbit/s link the peers reach a fraction of the rate, and a
        2.5 GB file would only hit the time cap)."""
        raw = rate_mbit * 1e6 / 8 * self.opts.data_seconds
        return min(1024, max(4, round(raw / MiB))) * MiB

    def udp_size_for(self, rate_mbit: float) -> int:
        """The UDP rows' file: ``size_for`` but at least ``udp_min_bytes`` (whole MiB)."""
        least = -(-self.opts.udp_min_bytes // MiB) * MiB
        return max(self.size_for(rate_mbit), least)

    def udp_cap_s(self, size: int, rate_mbit: float) -> float:
        """Time cap of a UDP row: 2.5 x the file's time at the link rate plus 15 s of
        start-up, never below the scenario cap (400 MB at 100 Mbit/s: 95 s)."""
        return max(self.opts.cap_s, 2.5 * size * 8 / (rate_mbit * 1e6) + 15.0)

    # -- scenarios -------------------------------------------------------------------------
    def run(self, scenarios: list[Scenario]) -> list[PeerResult]:
        """Run every scenario; one failing scenario becomes a failed row, the rest go on."""
        for sc in scenarios:
            t0 = time.monotonic()
            log(f"== {sc.name}")
            try:
                self.run_one(sc)
            except Exception as exc:  # noqa: BLE001 - one broken scenario must not lose the run
                self.results.append(PeerResult(sc.name, "(scenario)", "-", status="failed",
                                               note=f"{type(exc).__name__}: {exc}"[:300]))
                log(f"   scenario failed: {exc}")
            log(f"== {sc.name} done in {time.monotonic() - t0:.0f} s")
        return self.results

    def run_one(self, sc: Scenario) -> None:
        """Dispatch on the scenario kind."""
        if sc.kind == "pending":
            self.results.append(PeerResult(sc.name, "ours", "-", status="skipped", note=sc.needs))
            return
        if sc.kind == "udp-loopback":
            from bench.udp_loopback import scenario_rows

            mb = 16 if self.opts.loopback_bytes <= 32 * MiB else (
                128 if self.opts.loopback_bytes <= 256 * MiB else 477)
            self.results += scenario_rows(sc.name, mb, self.opts.wants, log=log)
            return
        if sc.kind == "loopback":
            site = Site("loopback", "127.0.0.1", self.work)
            with self.servers(site, sc, loopback=True) as srv:
                self.loopback_peers(site, sc, srv)
            return
        with make_link(self.opts.backend, rate_mbit=sc.rate_mbit, rtt_ms=sc.rtt_ms,
                       loss_pct=sc.loss_pct, seed=self.opts.seed,
                       tcp_buffers=self.opts.tcp_buffers) as link:
            for ns in (link.ns_a, link.ns_b):
                netns.run(netns.ns_exec(ns, ["sysctl", "-q", "-w",
                                             f"net.ipv4.tcp_congestion_control={self.opts.cc}"]))
            site = Site(sc.name, link.b_ip, self.work, link=link, rate_mbit=sc.rate_mbit)
            with self.servers(site, sc, loopback=False) as srv:
                if sc.kind == "wan":
                    self.wan_peers(site, sc, srv)
                else:
                    from bench.special import run_special

                    self.results += run_special(self, site, sc, srv)
        # Whole-scenario emulator counters (returned at teardown): the report shows them so
        # every run documents that the emulator kept up (lateness, no write errors).
        self.emulator[sc.name] = link.final_counters

    @contextmanager
    def servers(self, site: Site, sc: Scenario, loopback: bool) -> Iterator[Servers]:
        """nginx, iperf3 -s and the fallback daemon for one scenario; always stopped."""
        run_dir = self.work / "run" / sc.name
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        srv = Servers()
        iperf_proc = None
        try:
            http, https = (free_port(), free_port()) if loopback else NGINX_NS_PORTS
            if not {"nginx", "openssl"} & set(self.missing):
                srv.nginx = start_nginx(self.docroot, http, https, run_dir / "nginx",
                                        bind=site.bind, launch=site.launch_server)
            if not loopback and "iperf3" not in self.missing:
                iperf_proc, srv.iperf_probe = start_iperf_server(site, run_dir)
            srv.ours_skip = ours_mod.readiness()
            if srv.ours_skip is None:
                ports = (free_port(), free_port()) if loopback else (
                    ours_mod.HTTP_PORT, ours_mod.HTTPS_PORT)
                srv.ours = ours_mod.OursServer(site, run_dir / "ours", self.docroot, *ports)
                try:
                    srv.ours.start()
                except RuntimeError as exc:
                    srv.ours_skip, srv.ours = f"daemon failed to start: {exc}"[:200], None
            yield srv
        finally:
            if srv.ours:
                srv.ours.stop()
                logs = self.opts.out / "logs" / sc.name
                logs.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(srv.ours.log_path, logs / "daemon.out")  # UDP paths' figures
            if srv.nginx:
                srv.nginx.stop()
            if iperf_proc and iperf_proc.poll() is None:
                iperf_proc.terminate()
                iperf_proc.wait(timeout=5)

    def ctx(self, sc: Scenario, cap_s: float | None = None) -> Ctx:
        """Per-scenario peer context (logs and download destinations in the scratch dir)."""
        logs = self.opts.out / "logs" / sc.name
        dest = self.work / "dest" / sc.name
        dest.mkdir(parents=True, exist_ok=True)
        cc = self.opts.cc if sc.emulated else "host"
        return Ctx(sc.name, cap_s or self.opts.cap_s, logs, dest, cc)

    def play(self, sc: Scenario, plan: list[tuple[str, Callable[[], PeerResult]]],
             srv: Servers) -> None:
        """Run the plan's peers in order (filtered), skipping ours when it is not ready."""
        for key, fn in plan:
            if not self.opts.wants(key):
                continue
            skipped = self.not_measured(sc.name, key, "up" if key.endswith("-up") else "down")
            if skipped is not None:
                self.results.append(skipped)
                log(f"   {key:<16} {skipped.note}")
                continue
            if key.startswith("ours") and srv.ours is None:
                direction = "up" if key.endswith("-up") else "down"
                peer = key.removesuffix("-up")
                self.results.append(PeerResult(sc.name, peer, direction, status="skipped",
                                               note=srv.ours_skip or "not ready"))
                continue
            t0 = time.monotonic()
            try:
                r = fn()
            except Exception as exc:  # noqa: BLE001 - a broken peer becomes a failed row
                r = PeerResult(sc.name, key, status="failed", note=f"{exc}"[:200])
            r.load_avg = os.getloadavg()[0]  # a shared 2-core host: every row says how busy
            self.results.append(r)
            g = r.goodput_mbps
            log(f"   {key:<16} {r.status:<7} "
                + (f"{g:8.1f} Mbit/s" if g is not None else "       - Mbit/s")
                + f"  ({time.monotonic() - t0:.0f} s) {r.note[:80]}")

    def loopback_peers(self, site: Site, sc: Scenario, srv: Servers) -> None:
        """nginx->curl HTTP/HTTPS, curl uploads, ours up/down over HTTP, HTTPS and UDP
        (``ours-udp``: ``--transport udp`` at the default datagram size, which path MTU
        discovery raises to 65,000 bytes on loopback)."""
        name, size = self.data_file(self.opts.loopback_bytes)
        src = self.docroot / name
        ctx = self.ctx(sc, cap_s=max(120.0, self.opts.cap_s))
        ng = srv.nginx  # None when nginx is missing: play() then skips its peers
        plan: list[tuple[str, Callable[[], PeerResult]]] = [
            ("curl-http", lambda: curl_download(site, ctx, ng, name, size, https=False)),
            ("curl-https", lambda: curl_download(site, ctx, ng, name, size, https=True)),
            ("curl-http-up", lambda: curl_upload(site, ctx, ng, src, https=False)),
            ("curl-https-up", lambda: curl_upload(site, ctx, ng, src, https=True)),
        ]
        plan += self.ours_plan(site, ctx, srv, name, size)

        def udp(upload: bool) -> PeerResult:
            assert srv.ours is not None
            return ours_mod.ours_transfer(site, ctx, srv.ours, upload=upload, https=True,
                                          src=src if upload else name, expected=size, udp=True)

        plan += [("ours-udp", lambda: udp(False)), ("ours-udp-up", lambda: udp(True))]
        self.play(sc, plan, srv)

    def ours_plan(self, site: Site, ctx: Ctx, srv: Servers, name: str, size: int,
                  uploads: tuple[bool, ...] = (True, True)) -> list[
                      tuple[str, Callable[[], PeerResult]]]:
        """Our downloads (HTTP, HTTPS) and uploads (per *uploads*: HTTP, HTTPS)."""
        src = self.docroot / name

        def run(upload: bool, https: bool) -> PeerResult:
            assert srv.ours is not None
            return ours_mod.ours_transfer(site, ctx, srv.ours, upload=upload, https=https,
                                          src=src if upload else name, expected=size)

        plan: list[tuple[str, Callable[[], PeerResult]]] = [
            ("ours-http", lambda: run(False, False)),
            ("ours-https", lambda: run(False, True)),
        ]
        if uploads[0]:
            plan.append(("ours-http-up", lambda: run(True, False)))
        if uploads[1]:
            plan.append(("ours-https-up", lambda: run(True, True)))
        return plan

    def wan_peers(self, site: Site, sc: Scenario, srv: Servers) -> None:
        """Every peer in turn over the same emulated link."""
        from bench.peers.quicwan import quic_download

        name, size = self.data_file(self.size_for(sc.rate_mbit))
        ctx = self.ctx(sc)
        ng, ip = srv.nginx, srv.iperf_probe  # None when missing: play() skips their peers
        t = self.opts.iperf_s
        plan: list[tuple[str, Callable[[], PeerResult]]] = [
            ("iperf3-cubic", lambda: iperf3(site, ctx, ip, "cubic", t)),
            ("iperf3-bbr", lambda: iperf3(site, ctx, ip, "bbr", t)),
            ("curl-http", lambda: curl_download(site, ctx, ng, name, size, https=False)),
            ("curl-https", lambda: curl_download(site, ctx, ng, name, size, https=True)),
            ("aria2c-x8", lambda: aria2_download(site, ctx, ng, name, size)),
            ("aioquic-udp", lambda: quic_download(site, ctx, size)),
        ]
        plan += self.ours_plan(site, ctx, srv, name, size, uploads=(False, True))
        plan += self.udp_plan(site, sc, ctx, srv)
        self.play(sc, plan, srv)
        if sc.published_mbps and self.opts.wants(sc.published_peer):
            self.results.append(PeerResult(
                sc.name, sc.published_peer, "down", status="published", link_mbit=sc.rate_mbit,
                published_mbps=sc.published_mbps, note=sc.published_note))

    def udp_plan(self, site: Site, sc: Scenario, ctx: Ctx, srv: Servers) -> list[
            tuple[str, Callable[[], PeerResult]]]:
        """``ours-udp`` download and ``ours-udp-up`` upload of a >= 400 MB file (issue 12)."""
        if not (self.opts.wants("ours-udp") or self.opts.wants("ours-udp-up")):
            return []
        name, size = self.data_file(self.udp_size_for(sc.rate_mbit))
        cap = self.udp_cap_s(size, sc.rate_mbit)

        def run(upload: bool) -> PeerResult:
            assert srv.ours is not None
            return ours_mod.ours_transfer(
                site, ctx, srv.ours, upload=upload, https=True,
                src=self.docroot / name if upload else name, expected=size, udp=True,
                cap_s=cap)

        return [("ours-udp", lambda: run(False)), ("ours-udp-up", lambda: run(True))]
