"""Run one client against a server inside a measurement window and fill a PeerResult."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.proc import RunOutcome, ServerProbe, run_measured
from bench.results import PeerResult
from bench.site import Site


@dataclass
class Measured:
    """Client outcome plus what the window saw on the server and the link."""

    run: RunOutcome
    server_cpu_s: float | None
    server_rss_mb: float | None
    resent_bytes: int | None
    emu: dict[str, Any]

    def fill(self, r: PeerResult) -> PeerResult:
        """Copy the measured columns into *r* (bytes/seconds/status are the caller's)."""
        r.client_cpu_s = self.run.cpu_s
        r.client_rss_mb = self.run.maxrss_mb
        r.server_cpu_s = self.server_cpu_s
        r.server_rss_mb = self.server_rss_mb
        r.resent_bytes = self.resent_bytes
        r.emu = self.emu
        return r


def measured(
    site: Site,
    probe: ServerProbe | None,
    argv: Sequence[str],
    cap_s: float,
    logs: Path,
    tag: str,
    env: dict[str, str] | None = None,
    stdin_data: bytes | None = None,
) -> Measured:
    """Run *argv* on the client side within a window over server and link counters."""
    w = site.begin()
    if probe:
        probe.start()
    run = run_measured(site.client_argv(argv), cap_s, logs, tag, env=env, stdin_data=stdin_data)
    cpu, rss = probe.stop() if probe else (None, None)
    resent, emu = site.end(w)
    return Measured(run, cpu, rss, resent, emu)


def tree_bytes(path: Path) -> int:
    """Payload bytes present under *path* (a file or a directory tree).

    Sparse files written out of order (aria2 segments, parallel streams) are counted by
    allocated blocks when that is smaller than their apparent size, so a capped run is not
    credited for holes.
    """
    if not path.exists():
        return 0
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    total = 0
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        total += min(st.st_size, st.st_blocks * 512)
    return total


def count_files(path: Path) -> int:
    """Regular files under *path* (small-files scenario)."""
    if not path.exists():
        return 0
    n = 0
    for _root, _dirs, files in os.walk(path):
        n += len(files)
    return n


def status_of(run: RunOutcome, expected: int | None, got: int) -> tuple[str, str]:
    """(status, note) from exit code, time cap and byte count."""
    if run.timed_out:
        return "capped", f"time cap hit; goodput from {got / 1e6:.1f} MB received"
    if run.returncode != 0:
        tail = (run.stderr.strip().splitlines() or ["?"])[-1][:160]
        return "failed", f"exit {run.returncode}: {tail}"
    if expected is not None and got < expected:
        return "failed", f"short: {got} of {expected} bytes"
    return "ok", ""
