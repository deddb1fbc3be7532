"""Concurrent peers: per-process bytes over a steady-state window, sampled with ``ss``.

Fairness needs each flow's share *while both run*; file sizes and finish times cannot give that.
The kernel's per-socket ``bytes_received`` can: sample ``ss -tinp`` on the client side, group
sockets by owning pid, and difference the samples over the window.  Sockets that close during
the window keep their last sample (at most one sampling period is lost).

UDP clients (ours over UDP) have no kernel byte counter per flow: their bytes are the file
bytes that landed in their destination directory (``measure.tree_bytes``: allocated blocks,
so holes of a sparse part file do not count), sampled the same way.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.site import Site

_SOCK = re.compile(r"^\S+\s+\d+\s+\d+\s+(\S+)\s+(\S+)\s+users:\(\((.*)\)\)")
_PID = re.compile(r"pid=(\d+)")
_RX = re.compile(r"bytes_received:(\d+)")
SAMPLE_S = 0.5


def sample(site: Site) -> dict[tuple[str, str], tuple[set[int], int]]:
    """{(local, peer): (owner pids, bytes_received)} for the client side's TCP sockets."""
    p = subprocess.run(site.client_argv(["ss", "-tinpH"]), capture_output=True, text=True,
                       timeout=10)
    out: dict[tuple[str, str], tuple[set[int], int]] = {}
    key: tuple[str, str] | None = None
    pids: set[int] = set()
    for line in p.stdout.splitlines():
        m = _SOCK.match(line)
        if m:
            key, pids = (m.group(1), m.group(2)), {int(x) for x in _PID.findall(m.group(3))}
            continue
        rx = _RX.search(line)
        if key is not None and rx:
            out[key] = (pids, int(rx.group(1)))
            key = None
    return out


@dataclass
class FlowWindow:
    """Bytes received per client pid between the first and the last sample of a window."""

    start: dict[tuple[str, str], int] = field(default_factory=dict)
    last: dict[tuple[str, str], tuple[set[int], int]] = field(default_factory=dict)
    t0: float = 0.0
    t1: float = 0.0

    def feed(self, snap: dict[tuple[str, str], tuple[set[int], int]], opening: bool) -> None:
        """Add one sample; the opening sample sets each existing socket's baseline."""
        for k, (pids, rx) in snap.items():
            if opening:
                self.start[k] = rx
            self.last[k] = (pids, rx)

    def bytes_by_pid(self) -> dict[int, int]:
        """Window bytes per owning pid (sockets opened inside the window count from 0)."""
        out: dict[int, int] = {}
        for k, (pids, rx) in self.last.items():
            delta = rx - self.start.get(k, 0)
            for pid in pids:
                out[pid] = out.get(pid, 0) + delta
        return out


@dataclass
class Concurrent:
    """Outcome of running several clients at once."""

    pids: list[int]
    window: FlowWindow
    cpu_s: dict[int, float]
    maxrss_mb: dict[int, float]
    returncodes: dict[int, int]


def run_concurrent(site: Site, argvs: Sequence[Sequence[str]], total_s: float, warmup_s: float,
                   env: dict[str, str] | None = None, log_prefix: str = "",
                   dirs: Sequence[Path | None] | None = None) -> Concurrent:
    """Start every argv on the client side at once; measure [warmup, total]; stop them all.

    *dirs*: per argv, a destination directory whose landed bytes count as that client's
    (UDP clients), or None to count its TCP sockets' ``bytes_received``."""
    from bench.peers.measure import tree_bytes

    procs = []
    for i, a in enumerate(argvs):
        err = open(f"{log_prefix}{i}.err", "wb") if log_prefix else None  # noqa: SIM115
        procs.append(subprocess.Popen(site.client_argv(a), stdout=subprocess.DEVNULL, stderr=err,
                                      stdin=subprocess.DEVNULL, env=env, start_new_session=True))
        if err:
            err.close()
    rusage: dict[int, tuple[int, object]] = {}

    def reap(pid: int) -> None:
        _, status, ru = os.wait4(pid, 0)
        rusage[pid] = (status, ru)

    waiters = [threading.Thread(target=reap, args=(p.pid,), daemon=True) for p in procs]
    for w in waiters:
        w.start()
    by_dir = {p.pid: d for p, d in zip(procs, dirs or [None] * len(procs), strict=True) if d}

    def snap() -> dict[tuple[str, str], tuple[set[int], int]]:
        out = {k: v for k, v in sample(site).items() if not v[0] & by_dir.keys()}
        for pid, d in by_dir.items():
            out[("dir", str(d))] = ({pid}, tree_bytes(d))
        return out

    win = FlowWindow()
    t_start = time.monotonic()
    end = t_start + total_s
    opened = False
    while time.monotonic() < end:
        now = time.monotonic()
        if not opened and now - t_start >= warmup_s:
            win.feed(snap(), opening=True)
            win.t0 = time.monotonic()
            opened = True
        elif opened:
            win.feed(snap(), opening=False)
            win.t1 = time.monotonic()
        if all(not w.is_alive() for w in waiters):
            break
        time.sleep(SAMPLE_S)
    for p in procs:
        if p.pid not in rusage:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for w in waiters:
        w.join(5)
    for p, w in zip(procs, waiters, strict=True):
        if w.is_alive():
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            w.join(5)
    cpu: dict[int, float] = {}
    rss: dict[int, float] = {}
    codes: dict[int, int] = {}
    for p in procs:
        if p.pid in rusage:
            status, ru = rusage[p.pid]
            cpu[p.pid] = ru.ru_utime + ru.ru_stime  # type: ignore[attr-defined]
            rss[p.pid] = ru.ru_maxrss / 1024.0  # type: ignore[attr-defined]
            codes[p.pid] = os.waitstatus_to_exitcode(status)
            p.returncode = codes[p.pid]
    return Concurrent([p.pid for p in procs], win, cpu, rss, codes)
