"""report.md (one markdown table per run), results.json and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.results import PeerResult

COLUMNS = (
    ("scenario", "scenario"),
    ("peer", "peer"),
    ("dir", "dir"),
    ("cc", "cc"),
    ("status", "status"),
    ("MB", "size MB"),
    ("s", "time s"),
    ("goodput", "goodput Mbit/s"),
    ("pct", "% of link"),
    ("share", "share %"),
    ("ccpu", "client CPU s/GB"),
    ("scpu", "server CPU s/GB"),
    ("crss", "client peak RSS MB"),
    ("srss", "server peak RSS MB"),
    ("resent", "re-sent MB"),
    ("uretx", "UDP re-sent MB"),
    ("redund", "redundancy %"),
    ("uloss", "UDP loss %"),
    ("urtt", "UDP rtt ms"),
    ("late", "emu late p99 ms"),
    ("ecpu", "emu CPU %"),
    ("steal", "VM steal %"),
    ("load", "load 1m"),
    ("note", "note"),
)


def _f(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def row_cells(r: PeerResult) -> dict[str, str]:
    """Formatted cells of one row (empty cell = not applicable / not measured)."""
    resent = r.resent_bytes
    if r.app_resent_bytes:
        resent = (resent or 0) + r.app_resent_bytes
    return {
        "scenario": r.scenario,
        "peer": r.peer,
        "dir": r.direction,
        "cc": r.cc,
        "status": r.status,
        "MB": _f(r.bytes / 1e6 if r.bytes else None),
        "s": _f(r.seconds if r.seconds else None, 2),
        "goodput": _f(r.goodput_mbps),
        "pct": _f(r.pct_of_link),
        "share": _f(r.share_pct),
        "ccpu": _f(r.cpu_per_gb("client"), 2),
        "scpu": _f(r.cpu_per_gb("server"), 2),
        "crss": _f(r.client_rss_mb),
        "srss": _f(r.server_rss_mb),
        "resent": _f(resent / 1e6 if resent is not None else None, 2),
        "uretx": _f(r.udp_resent_bytes / 1e6 if r.udp_resent_bytes is not None else None, 2),
        "redund": _f(r.redundancy_pct, 2),
        "uloss": _f(r.udp_loss_pct, 2),
        "urtt": _f(r.udp_rtt_ms),
        "late": _f(r.emu.get("late_p99_ms"), 2),
        "ecpu": _f(r.emu.get("cpu_pct")),
        "steal": _f(r.emu.get("steal_pct")),
        "load": _f(r.load_avg),
        "note": r.note.replace("\n", " "),
    }


def markdown_table(results: Sequence[PeerResult]) -> str:
    """The results as one GitHub-flavoured markdown table."""
    head = "| " + " | ".join(t for _, t in COLUMNS) + " |"
    sep = "|" + "|".join("---" if k in ("scenario", "peer", "note", "dir", "cc", "status")
                         else "---:" for k, _ in COLUMNS) + "|"
    lines = [head, sep]
    for r in results:
        c = row_cells(r)
        lines.append("| " + " | ".join(c[k].replace("|", "\\|") for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def emulator_table(emulator: dict[str, dict[str, Any]]) -> str:
    """Per-scenario emulator counters returned at teardown."""
    if not emulator:
        return ""
    lines = ["| scenario | dir | forwarded pkts | loss drops | queue drops | late p50 ms "
             "| late p99 ms | late max ms | write errors | CPU s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for sc, c in emulator.items():
        cpu = c.get("cpu_s", {})
        for d in ("ab", "ba"):
            x = c.get(d) or {}
            if not x:
                continue
            lines.append(
                f"| {sc} | {'A->B' if d == 'ab' else 'B->A'} | {x.get('fwd_packets', '')} | "
                f"{x.get('drop_loss_packets', '')} | {x.get('drop_queue_packets', '')} | "
                f"{x.get('late_p50_ms', '')} | {x.get('late_p99_ms', '')} | "
                f"{x.get('late_max_ms', '')} | {x.get('write_errors', '')} | "
                f"{_f(cpu.get(d), 1)} |")
    return "\n".join(lines)


def machine() -> str:
    """One line describing where the numbers come from."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} x {cpu}, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def write_report(out: Path, results: Sequence[PeerResult], emulator: dict[str, dict[str, Any]],
                 meta: dict[str, Any]) -> Path:
    """Write report.md, results.json and the plots into *out*; returns the report path."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        plots = write_plots(out, results)
    except ImportError:  # matplotlib is the optional [bench] extra: the tables still count
        print("plots skipped: matplotlib is not installed (pip install -e '.[bench]')",
              file=sys.stderr)
        plots = []
    parts = [
        "# fallback WAN benchmark report",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- machine: {machine()}",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "",
        "Columns are explained in bench/README.md. Goodput = file bytes / wall time of the "
        "client process (iperf3: its own interval; concurrent rows: steady-state window).",
        "",
        markdown_table(results),
        "",
    ]
    emu = emulator_table(emulator)
    if emu:
        parts += ["## Emulator counters per scenario (whole scenario, at teardown)", "", emu, ""]
    if plots:
        parts += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    (out / "results.json").write_text(json.dumps(
        {"meta": meta, "results": [r.to_dict() for r in results], "emulator": emulator},
        indent=1, default=str))
    return path


def write_plots(out: Path, results: Sequence[PeerResult]) -> list[Path]:
    """Goodput bars per scenario, plus goodput vs loss per RTT for the WAN grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    scenarios = list(dict.fromkeys(r.scenario for r in results))
    for sc in scenarios:
        rows = [r for r in results if r.scenario == sc and r.goodput_mbps is not None]
        if not rows:
            continue
        labels = [f"{r.peer}\n{r.direction}" for r in rows]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4))
        colors = ["tab:orange" if r.peer.startswith("ours") else "tab:blue" for r in rows]
        ax.bar(range(len(rows)), [r.goodput_mbps or 0 for r in rows], color=colors)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylabel("goodput Mbit/s")
        ax.set_title(sc)
        if rows[0].link_mbit:
            ax.axhline(rows[0].link_mbit, color="gray", linestyle="--", linewidth=1)
        fig.tight_layout()
        p = out / f"goodput-{sc}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    paths += _loss_plot(out, results, plt)
    return paths


def _loss_plot(out: Path, results: Sequence[PeerResult], plt: Any) -> list[Path]:
    grid: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in results:
        parts = r.scenario.split("-")
        if len(parts) != 4 or parts[:2] != ["wan", "100M"] or r.goodput_mbps is None:
            continue
        rtt, loss = parts[2], float(parts[3].removesuffix("pct"))
        key = f"{r.peer} {r.direction}"
        grid.setdefault(rtt, {}).setdefault(key, []).append((loss, r.goodput_mbps))
    if not grid or all(len(v) < 2 for g in grid.values() for v in g.values()):
        return []
    rtts = sorted(grid, key=lambda s: float(s.removesuffix("ms")))
    fig, axes = plt.subplots(1, len(rtts), figsize=(5 * len(rtts), 4), squeeze=False)
    for ax, rtt in zip(axes[0], rtts, strict=True):
        for key, pts in sorted(grid[rtt].items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key,
                    linewidth=2.5 if key.startswith("ours") else 1)
        ax.set_title(f"100 Mbit/s, RTT {rtt}")
        ax.set_xlabel("loss %")
        ax.set_ylabel("goodput Mbit/s")
        ax.set_ylim(bottom=0)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    p = out / "goodput-vs-loss.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    return [p]
