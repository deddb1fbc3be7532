"""``python -m bench.netem cleanup|status|probe``: housekeeping for the link emulator.

``cleanup`` removes leftovers of crashed runs by name prefix: namespaces ``fbA-*``/``fbB-*``
(after killing the processes inside them), forwarder processes recorded in run directories,
and the run directories under the run base.  Runs whose owner process is still alive are left
alone unless ``--all`` is given, so cleaning up never breaks a benchmark running in parallel.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from bench.netem import netns


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_from(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_forwarder(pid: int) -> bool:
    """Only kill a recorded pid if it still is our forwarder (pids get reused)."""
    try:
        return b"bench.netem.forwarder" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def cleanup(all_runs: bool = False) -> list[str]:
    """Remove leftovers; returns what was removed (for the log)."""
    removed: list[str] = []
    live_suffixes: set[str] = set()
    if netns.RUN_BASE.is_dir():
        for run_dir in sorted(netns.RUN_BASE.iterdir()):
            owner = _pid_from(run_dir / "owner.pid")
            if not all_runs and owner is not None and _alive(owner):
                live_suffixes.add(run_dir.name)
                continue
            fwd = _pid_from(run_dir / "forwarder.pid")
            if fwd is not None and _is_forwarder(fwd):
                netns.kill_pids([fwd])
                removed.append(f"forwarder pid {fwd}")
            shutil.rmtree(run_dir, ignore_errors=True)
            removed.append(f"run dir {run_dir}")
    for ns in netns.list_ns():
        if ns.split("-", 1)[1] in live_suffixes:
            continue
        netns.delete_ns(ns)
        removed.append(f"netns {ns}")
    return removed


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m bench.netem", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cleanup", help="remove namespaces/processes/run dirs left by crashed runs")
    c.add_argument("--all", action="store_true", help="also runs whose owner is still alive")
    sub.add_parser("status", help="list emulator namespaces and run dirs")
    sub.add_parser("probe", help="say whether the kernel netem backend is usable here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    if args.cmd == "cleanup":
        for item in cleanup(args.all):
            print(f"removed {item}")
        return 0
    if args.cmd == "status":
        for ns in netns.list_ns():
            print(f"netns {ns}")
        if netns.RUN_BASE.is_dir():
            for d in sorted(netns.RUN_BASE.iterdir()):
                print(f"run dir {d} owner={_pid_from(d / 'owner.pid')}")
        return 0
    from bench.netem.kernel import netem_available

    print("netem backend:", "available" if netem_available() else "not available (no sch_netem)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
