"""Measure peer processes: wall time, CPU seconds and peak RSS, always with a time bound.

Client processes are children of the runner, so ``wait4`` gives exact user+system time and
peak RSS including their own reaped children (``ip netns exec`` execs in place, so the pid *is*
the client).  Long-lived servers (nginx, iperf3 -s, the fallback daemon) are sampled from /proc
before and after each run; their peak RSS window is reset through ``/proc/PID/clear_refs``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass
class RunOutcome:
    """Result of one bounded client run."""

    returncode: int
    wall_s: float
    cpu_s: float
    maxrss_mb: float
    timed_out: bool
    stdout: str
    stderr: str


def run_measured(
    argv: Sequence[str],
    timeout_s: float,
    out_dir: Path,
    tag: str,
    env: dict[str, str] | None = None,
    stdin_data: bytes | None = None,
) -> RunOutcome:
    """Run *argv* to completion or until *timeout_s*, measuring it with ``wait4``.

    stdout/stderr go to files (no pipe can fill up and stall the client); on timeout the process
    group gets SIGTERM, then SIGKILL, and the run is reported as timed out, not failed, so the
    caller can still count the bytes that made it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = out_dir / f"{tag}.out", out_dir / f"{tag}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.monotonic()
        p = subprocess.Popen(
            list(argv), stdout=out, stderr=err, env=env, start_new_session=True,
            stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
        )
        if stdin_data is not None and p.stdin is not None:
            try:
                p.stdin.write(stdin_data)
                p.stdin.close()
            except BrokenPipeError:
                pass
        result: list[tuple[int, int, object]] = []
        waiter = threading.Thread(target=lambda: result.append(os.wait4(p.pid, 0)), daemon=True)
        waiter.start()
        waiter.join(timeout_s)
        timed_out = waiter.is_alive()
        if timed_out:
            _kill_group(p.pid, signal.SIGTERM)
            waiter.join(3.0)
            if waiter.is_alive():
                _kill_group(p.pid, signal.SIGKILL)
                waiter.join(5.0)
        wall = time.monotonic() - t0
    if not result:
        raise RuntimeError(f"{tag}: process {p.pid} could not be reaped")
    _, status, ru = result[0]
    p.returncode = os.waitstatus_to_exitcode(status)
    cpu = ru.ru_utime + ru.ru_stime  # type: ignore[attr-defined]
    return RunOutcome(
        returncode=p.returncode,
        wall_s=wall,
        cpu_s=cpu,
        maxrss_mb=ru.ru_maxrss / 1024.0,  # type: ignore[attr-defined]
        timed_out=timed_out,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace")[-4000:],
    )


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def descendants(pid: int) -> list[int]:
    """*pid* and all its descendants (one /proc scan; servers fork workers and helpers)."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent_of[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree = [pid]
    frontier = [pid]
    while frontier:
        nxt = [c for c, pp in parent_of.items() if pp in frontier]
        tree += nxt
        frontier = nxt
    return tree


def tree_cpu_s(pid: int) -> float:
    """User+system seconds of a process tree, including children it has already reaped."""
    total = 0.0
    for p in descendants(pid):
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in f[11:15]) / CLK_TCK  # utime stime cutime cstime
    return total


def reset_peak_rss(pid: int) -> None:
    """Start a new peak-RSS window for a whole server tree (``echo 5 > clear_refs``)."""
    for p in descendants(pid):
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            pass


def tree_peak_rss_mb(pid: int) -> float:
    """Largest VmHWM in a server tree since the last reset (workers are separate processes)."""
    best = 0
    for p in descendants(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    best = max(best, int(line.split()[1]))
        except OSError:
            continue
    return best / 1024.0


class ServerProbe:
    """CPU and peak-RSS window over a long-running server process tree."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self._cpu0 = 0.0

    def start(self) -> None:
        """Open the window."""
        if self.pid:
            reset_peak_rss(self.pid)
            self._cpu0 = tree_cpu_s(self.pid)

    def stop(self) -> tuple[float | None, float | None]:
        """Close the window: (cpu seconds, peak RSS MB), None when there is no server."""
        if not self.pid:
            return None, None
        return tree_cpu_s(self.pid) - self._cpu0, tree_peak_rss_mb(self.pid)
