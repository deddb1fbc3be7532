"""Our own path: the ``fallback`` daemon on the server side, ``fallback transfer`` on the client.

The CLI is being built alongside the benchmarks, so :func:`readiness` checks that the commands
and flags the runner relies on exist; rows are skipped with that reason instead of failing.
Transfers use ``--overwrite always --resume none`` so every repetition really moves the bytes,
and ``--no-fsync`` so ours and the stock tools (which never fsync) write to disk the same way.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.netem.link import REPO_ROOT
from bench.peers.measure import count_files, measured, status_of, tree_bytes
from bench.peers.tools import Ctx
from bench.proc import ServerProbe
from bench.results import PeerResult
from bench.site import Site

HTTP_PORT = 18080
HTTPS_PORT = 18443
UDP_PORT = 33001  # aspera.conf's bind_udp_port default; the daemon names it to the client
USER = "bench"
READY_TIMEOUT_S = 60.0
REQUIRED_FLAGS = ("--json", "--streams", "--transport", "--overwrite", "--resume", "--fingerprint")


def fallback_argv() -> list[str]:
    """How to invoke our CLI: ``python -m fallback`` from this checkout (no install needed)."""
    return [sys.executable, "-m", "fallback"]


def ours_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment with the checkout importable (namespaces share the filesystem)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


_READY: dict[str, str | None] = {}


def readiness() -> str | None:
    """None when the CLI can be benchmarked, else the reason to skip our rows (cached)."""
    if "r" in _READY:
        return _READY["r"]
    reason: str | None = None
    try:
        for sub, needles in (("transfer", REQUIRED_FLAGS), ("serve", ("--config",)),
                             ("hash-password", ())):
            p = subprocess.run([*fallback_argv(), sub, "--help"], capture_output=True, text=True,
                               timeout=60, env=ours_env(), cwd=str(REPO_ROOT))
            missing = [n for n in needles if n not in p.stdout]
            if p.returncode != 0 or missing:
                reason = f"`fallback {sub}` not ready: " + (
                    f"missing {', '.join(missing)}" if missing else p.stderr.strip()[-120:])
                break
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = f"`fallback` not runnable: {exc}"
    _READY["r"] = reason
    return reason


class OursServer:
    """``fallback serve`` with a generated config, state and docroot in the run directory."""

    def __init__(self, site: Site, run_dir: Path, docroot: Path, http_port: int = HTTP_PORT,
                 https_port: int = HTTPS_PORT) -> None:
        self.site = site
        self.http_port = http_port
        self.https_port = https_port
        self.run_dir = run_dir
        self.docroot = docroot
        self.state = run_dir / "state"
        self.password = secrets.token_urlsafe(16)
        self.fingerprint = ""
        self.proc: subprocess.Popen[Any] | None = None
        self.probe = ServerProbe(None)
        self.log_path = run_dir / "daemon.out"

    def config_xml(self, pw_hash: str) -> str:
        """The daemon config (XML contract shared with the daemon's authors)."""
        return (
            '<CONF version="2"><http_server>'
            f"<http_port>{self.http_port}</http_port><https_port>{self.https_port}</https_port>"
            "<enable_http>true</enable_http><enable_https>true</enable_https>"
            f"<bind_address>{self.site.bind}</bind_address></http_server>"
            f"<server><state_dir>{self.state}</state_dir></server>"
            f"<users><user><name>{USER}</name><password_hash>{pw_hash}</password_hash>"
            f"<docroot>{self.docroot}</docroot></user></users></CONF>\n"
        )

    def start(self) -> None:
        """Hash the password, write the config, start the daemon, wait for "ready"."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.docroot.mkdir(parents=True, exist_ok=True)
        p = subprocess.run([*fallback_argv(), "hash-password"], input=self.password + "\n",
                           capture_output=True, text=True, timeout=60, env=ours_env())
        if p.returncode != 0:
            raise RuntimeError(f"hash-password failed: {p.stderr.strip()[-200:]}")
        conf = self.run_dir / "fallback.conf.xml"
        conf.write_text(self.config_xml(p.stdout.strip().splitlines()[-1]))
        out_path = self.run_dir / "daemon.out"
        out = open(out_path, "wb")  # noqa: SIM115 - handed to the child
        self.proc = self.site.launch_server(
            [*fallback_argv(), "serve", "--config", str(conf),
             *(["-v"] if os.environ.get("FB_BENCH_VERBOSE") else [])], stdout=out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=ours_env(),
            cwd=str(self.run_dir),
        )
        out.close()
        end = time.monotonic() + READY_TIMEOUT_S
        text = ""
        while time.monotonic() < end:
            text = out_path.read_text(errors="replace")
            m = re.search(r"fingerprint\S*\s+(?:SHA-?256\s+)?([0-9A-Fa-f:]{64,})", text)
            if m:
                self.fingerprint = m.group(1)
            if re.search(r"^ready\b", text, re.M) and self.fingerprint:
                self.probe = ServerProbe(self.proc.pid)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"fallback daemon not ready: {text.strip()[-300:]}")

    def log_size(self) -> int:
        """Bytes in the daemon's log so far (mark before a run, read the new lines after)."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def udp_paths_since(self, mark: int, wait_s: float = 3.0) -> list[dict[str, float]]:
        """The daemon's per-UDP-path close lines (``fallback/udpserver.py``) logged after
        *mark*: ``{"sent": datagrams, "lost_pct", "resent": bytes, "rtt_ms", "rate_mbit"}``.
        Waits up to *wait_s* for the line (it is written when the session closes)."""
        end = time.monotonic() + wait_s
        while True:
            try:
                with open(self.log_path, "rb") as f:
                    f.seek(mark)
                    text = f.read().decode(errors="replace")
            except OSError:
                text = ""
            found = [{"sent": float(m[0]), "lost_pct": float(m[1]), "resent": float(m[2]),
                      "rtt_ms": float(m[3]), "rate_mbit": float(m[4])}
                     for m in _UDP_CLOSE.findall(text)]
            if found or time.monotonic() >= end:
                return found
            time.sleep(0.2)

    def url(self, path: str, https: bool) -> str:
        """Daemon URL with the user in it (the password comes from FALLBACK_PASSWORD)."""
        scheme, port = ("https", self.https_port) if https else ("http", self.http_port)
        return f"{scheme}://{USER}@{self.site.host}:{port}/{path.lstrip('/')}"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL; bounded."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


_UDP_CLOSE = re.compile(
    r"UDP path \S+: (\d+) datagrams sent, \d+ received, ([\d.]+) % lost, (\d+) bytes sent "
    r"again, rtt ([\d.]+) ms, rate ([\d.]+) Mbit/s")


def _last_json(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                out: dict[str, Any] = json.loads(line)
                return out
            except ValueError:
                return None
    return None


def ours_transfer(
    site: Site, ctx: Ctx, srv: OursServer, *, upload: bool, https: bool, src: Path | str,
    expected: int | None, streams: int = 4, peer: str | None = None, files: int | None = None,
    udp: bool = False, policy: str | None = None, cap_s: float | None = None,
) -> PeerResult:
    """One ``fallback transfer`` (download of docroot path *src*, or upload of local *src*).

    *udp*: ``--transport udp`` (the session opens over the *https* scheme's port, the data
    moves over the daemon's UDP port); the row gets the path's figures: bytes sent again,
    loss % and RTT, from the sender's end (the client's ``--json`` for an upload, the
    daemon's log line for a download). *policy*: ``--policy``. *cap_s*: wall-clock cap
    instead of the scenario's.
    """
    scheme = "https" if https else "http"
    peer = peer or ("ours-udp" if udp else f"ours-{scheme}")
    r = PeerResult(ctx.scenario, peer, "up" if upload else "down", ctx.cc,
                   link_mbit=site.rate_mbit)
    if upload:
        target = srv.docroot / "up" / peer
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        args = [str(src), srv.url(f"up/{peer}/", https)]
        landed = target
    else:
        target = ctx.dest / peer
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        args = [srv.url(str(src), https), f"{target}/"]
        landed = target
    argv = [*fallback_argv(), "transfer", *args, "--transport", "udp" if udp else scheme,
            "--json", "-vv" if os.environ.get("FB_BENCH_VERBOSE") else "-q", "--streams", str(streams), "--overwrite", "always", "--resume",
            "none", "--no-fsync"]
    if https:
        argv += ["--fingerprint", srv.fingerprint]
    if policy:
        argv += ["--policy", policy]
    if udp:  # the sender's rate controller, not the namespace's TCP congestion control
        r.cc = f"udp/{policy or 'fair'}"
    env = ours_env({"FALLBACK_PASSWORD": srv.password})
    mark = srv.log_size()
    m = measured(site, srv.probe, argv, cap_s or ctx.cap_s, ctx.logs, f"{peer}-{r.direction}",
                 env=env)
    m.fill(r)
    r.seconds = m.run.wall_s
    res = _last_json(m.run.stdout)
    got = tree_bytes(landed)
    r.bytes = got
    r.status, r.note = status_of(m.run, expected, got)
    if res is not None:
        if not res.get("ok") and r.status == "ok":
            r.status, r.note = "failed", str(res.get("error"))[:160]
        sent, total, skipped = (int(res.get(k) or 0) for k in ("sent_bytes", "bytes",
                                                               "skipped_bytes"))
        if res.get("ok"):
            r.app_resent_bytes = max(0, sent - (total - skipped))
            r.note = (r.note + f" own rate {res.get('rate_mbps', 0):.1f} Mbit/s").strip()
        secs = float(res.get("seconds") or 0.0)
        if udp and res.get("ok") and 0 < secs <= r.seconds:
            # Issue 12's measure: session start (connect, login) to verified file, without
            # the interpreter's start-up; the process wall time stays in the note.
            r.note = (r.note + f"; process wall {r.seconds:.1f} s "
                      f"({got * 8 / r.seconds / 1e6:.1f} Mbit/s)").strip("; ")
            r.seconds = secs
        if udp and upload:  # the client sent the data: its figures are the sender's
            r.udp_resent_bytes = int(res.get("retransmitted_bytes") or 0)
            r.udp_loss_pct = float(res.get("loss_pct") or 0.0)
            r.udp_rtt_ms = float(res.get("rtt_ms") or 0.0)
    if udp and not upload:  # the daemon sent the data: its close line has the figures
        paths = srv.udp_paths_since(mark)
        if paths:
            r.udp_resent_bytes = int(sum(p["resent"] for p in paths))
            r.udp_loss_pct = paths[-1]["lost_pct"]
            r.udp_rtt_ms = paths[-1]["rtt_ms"]
        elif res is not None:
            r.udp_rtt_ms = float(res.get("rtt_ms") or 0.0) or None
    if files is not None:
        r.files = count_files(landed)
    shutil.rmtree(target, ignore_errors=True)
    return r
