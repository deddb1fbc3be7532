"""Where a scenario's peers run: plain loopback or the two ends of an emulated link.

Peers only ever ask the site to wrap an argv for the client or the server side, for the server
address, and to open/close a measurement window; so the same peer code runs on loopback (#2)
and across the emulator (#3).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.netem.link import BaseLink

MSS_BYTES = 1448  # 1500 MTU - IP/TCP headers - timestamps option: bytes per retransmitted segment
CLK_TCK = os.sysconf("SC_CLK_TCK")


def steal_ticks() -> int:
    """CPU time the hypervisor gave to others while this VM wanted to run (all CPUs, ticks).

    On a shared VM this, not the emulator, explains most lateness spikes; every row reports it.
    """
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8])
    except (OSError, IndexError, ValueError):
        return 0


def steal_pct(ticks: int, seconds: float) -> float:
    """Steal as a percentage of all CPUs' time over *seconds*."""
    return 100.0 * ticks / CLK_TCK / max(1e-6, seconds * (os.cpu_count() or 1))


@dataclass
class Window:
    """Counters at the start of one measured peer run."""

    t0: float
    steal: int = 0
    snmp: dict[str, dict[str, int]] = field(default_factory=dict)
    emu_cpu: dict[str, float] = field(default_factory=dict)


@dataclass
class Site:
    """Client side (A), server side (B) and the server address as the client sees it."""

    label: str
    host: str
    work: Path
    link: BaseLink | None = None
    rate_mbit: float | None = None

    def client_argv(self, argv: Sequence[str]) -> list[str]:
        """argv to run on the client side."""
        return self.link.exec_argv("a", argv) if self.link else list(argv)

    def server_argv(self, argv: Sequence[str]) -> list[str]:
        """argv to run on the server side."""
        return self.link.exec_argv("b", argv) if self.link else list(argv)

    def launch_server(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a long-running server on the server side (killed at link teardown too)."""
        if self.link:
            return self.link.run_in_b(argv, **kw)
        return subprocess.Popen(list(argv), **kw)

    @property
    def bind(self) -> str:
        """Address servers listen on: everything inside a private namespace, else loopback."""
        return "0.0.0.0" if self.link else self.host

    def begin(self) -> Window:
        """Open a measurement window (emulator counters reset, kernel counters noted)."""
        w = Window(t0=time.monotonic(), steal=steal_ticks())
        if self.link:
            self.link.reset_counters()
            w.snmp = {s: self.link.tcp_counters(s) for s in ("a", "b")}
            w.emu_cpu = self.link.counters().get("cpu_s", {})
        return w

    def end(self, w: Window) -> tuple[int | None, dict[str, Any]]:
        """Close the window: (TCP bytes retransmitted, emulator summary)."""
        steal = round(steal_pct(steal_ticks() - w.steal, time.monotonic() - w.t0), 1)
        if not self.link:
            return None, {"steal_pct": steal}
        segs = 0
        for s in ("a", "b"):
            now = self.link.tcp_counters(s)
            segs += now.get("Tcp.RetransSegs", 0) - w.snmp[s].get("Tcp.RetransSegs", 0)
        c = self.link.counters()
        dt = max(1e-6, time.monotonic() - w.t0)
        emu: dict[str, Any] = {"steal_pct": steal}
        for d in ("ab", "ba"):
            if d in c:
                emu[d] = c[d]
        cpu = c.get("cpu_s", {})
        if cpu and w.emu_cpu:
            emu["cpu_pct"] = round(
                100.0 * sum(cpu[k] - w.emu_cpu.get(k, 0.0) for k in cpu) / dt, 1
            )
        lates = [c[d].get("late_p99_ms", 0.0) for d in ("ab", "ba") if d in c]
        emu["late_p99_ms"] = max(lates) if lates else None
        return segs * MSS_BYTES, emu
