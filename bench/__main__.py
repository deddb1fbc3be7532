"""``python -m bench SCENARIO... [--out DIR] [--quick]``, ``python -m bench validate`` and
``python -m bench check`` (which reference tools are missing; ``--install-peers`` installs them).

Scenario names accept shell globs (``'wan-100M-*-1pct'``); ``python -m bench list`` shows them.
Set FB_BENCH_TINY=1 (or pass --tiny) for the smoke-test sizes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench.scenarios import QUICK, all_scenarios, select


def _main_run(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*", help="names or globs; default: all (quick: subset)")
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    ap.add_argument("--quick", action="store_true", help="short subset, under 3 minutes")
    ap.add_argument("--tiny", action="store_true", default=os.environ.get("FB_BENCH_TINY") == "1",
                    help="smoke-test sizes (also FB_BENCH_TINY=1)")
    ap.add_argument("--peers", default="*", help="comma-separated globs, e.g. 'curl*,ours*'")
    ap.add_argument("--cc", default="bbr", help="congestion control for HTTP peers (namespaces)")
    ap.add_argument("--seed", type=int, default=1, help="loss RNG seed")
    ap.add_argument("--backend", default="tun", choices=["tun", "netem"],
                    help="tun: user-space emulator; netem: kernel tc netem where available")
    ap.add_argument("--tcp-buffers", default="typical", choices=["typical", "wan", "inherit"],
                    help="TCP buffer sysctls in the namespaces (see bench/README.md)")
    ap.add_argument("--keep-work", action="store_true", help="keep the scratch directory")
    ap.add_argument("--install-peers", action="store_true",
                    help="apt-get install the reference tools that are missing (nginx-light, "
                         "curl, aria2, iperf3) before the run")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench needs root (network namespaces, TUN devices)", file=sys.stderr)
        return 2
    from bench import prereqs

    missing = prereqs.missing_tools()
    if missing and a.install_peers:
        prereqs.install(missing)
        missing = prereqs.missing_tools()
    if missing:  # our own rows still run; the peers' rows say "not measured (X missing)"
        print(prereqs.install_line(missing), file=sys.stderr, flush=True)
    patterns = a.scenarios or (list(QUICK) if a.quick or a.tiny else ["*"])
    try:
        scenarios = select(patterns)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if a.backend == "netem":
        from bench.netem.kernel import netem_available

        if not netem_available():
            print("netem backend not available on this kernel (no sch_netem)", file=sys.stderr)
            return 2

    from bench.report import write_report
    from bench.runner import Runner, RunOptions

    opts = RunOptions.make(a.out, quick=a.quick, tiny=a.tiny,
                           peers=tuple(p.strip() for p in a.peers.split(",") if p.strip()),
                           cc=a.cc, seed=a.seed, backend=a.backend, keep_work=a.keep_work,
                           tcp_buffers=a.tcp_buffers, missing=tuple(missing))
    t0 = time.monotonic()
    load0 = Path("/proc/loadavg").read_text().split()[0]
    runner = Runner(opts)
    try:
        results = runner.run(scenarios)
    finally:
        runner.close()
    took = time.monotonic() - t0
    mode = "tiny" if a.tiny else "quick" if a.quick else "full"
    meta = {
        "command": "python -m bench " + " ".join(argv),
        "mode": mode,
        "duration_s": round(took, 1),
        "backend": a.backend,
        "congestion control (HTTP peers)": a.cc,
        "loss seed": a.seed,
        "TCP buffers": a.tcp_buffers,
        "load average at start": load0,
        "file size": f"link rate x {opts.data_seconds:g} s; loopback "
                     f"{opts.loopback_bytes >> 20} MiB; cap {opts.cap_s:g} s per transfer",
    }
    path = write_report(a.out, results, runner.emulator, meta)
    print(f"wrote {path} ({took:.0f} s)")
    return 0 if all(r.status != "failed" for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    """Dispatch: ``validate``, ``list``, or scenario names."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "check":  # no root needed: what a run would be missing
        from bench import prereqs

        missing = prereqs.missing_tools()
        print(prereqs.install_line(missing) if missing else
              f"all reference tools found: {', '.join(prereqs.PACKAGES)}")
        return 1 if missing else 0
    if args and args[0] == "validate":
        from bench.validate import main as validate_main

        return validate_main(args[1:])
    if args and args[0] == "list":
        for s in all_scenarios():
            extra = f"  [{s.needs}]" if s.needs else ""
            link = f"{s.rate_mbit:g} Mbit/s, {s.rtt_ms:g} ms, {s.loss_pct:g} %" if s.emulated \
                else "no emulator"
            print(f"{s.name:<24} {link:<28} {s.about}{extra}")
        return 0
    return _main_run(args)


if __name__ == "__main__":
    sys.exit(main())
