"""The benchmark scenarios and shell-style selection (``wan-100M-*-1pct``)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Scenario:
    """A named link plus what to run over it.

    kind: ``loopback`` (no emulator), ``udp-loopback`` (the UDP path against aioquic and
    qh3 on loopback, ``bench.udp_loopback.compare``), ``wan`` (every peer in turn), ``fairness`` (two of ours at
    once), ``tcp-friendly`` (ours beside iperf3 cubic), ``small-files``, ``pending`` (listed
    but not runnable yet; ``needs`` says why).
    """

    name: str
    kind: str
    rate_mbit: float = 0.0
    rtt_ms: float = 0.0
    loss_pct: float = 0.0
    needs: str = ""
    about: str = ""
    published_mbps: float = 0.0  # a vendor's published figure shown beside the rows
    published_peer: str = ""
    published_note: str = ""

    @property
    def emulated(self) -> bool:
        """True when the scenario runs across the link emulator."""
        return self.kind not in ("loopback", "udp-loopback", "pending")


def _fmt(x: float) -> str:
    return f"{x:g}"


def all_scenarios() -> list[Scenario]:
    """Every scenario, in report order."""
    out = [Scenario("loopback", "loopback", about="no emulator; 2 GiB file; CPU-bound ceiling"),
           Scenario("udp-loopback", "udp-loopback",
                    about="UDP path vs aioquic and qh3, 500 MB each, encrypted, no emulator")]
    for rtt in (10, 100, 300):
        for loss in (0, 0.1, 1, 2):
            out.append(Scenario(f"wan-100M-{rtt}ms-{_fmt(loss)}pct", "wan", 100, rtt, loss))
    out.insert(len(out) - 4, Scenario("wan-100M-200ms-2pct", "wan", 100, 200, 2,
                                      about="issue 12's 200 ms / 2 % goal"))
    out += [
        Scenario("wan-1G-200ms-2pct", "wan", 1000, 200, 2,
                 about="FASP's published case (ANCHORS.md): 505 Mbit/s",
                 published_mbps=505.0, published_peer="fasp-published",
                 published_note="published by IBM Aspera (ANCHORS.md), not measured here"),
        Scenario("sat-20M-600ms-0.5pct", "wan", 20, 600, 0.5, about="geostationary satellite"),
        Scenario("lossy-100M-300ms-5pct", "wan", 100, 300, 5, about="very lossy long path"),
        Scenario("fairness", "fairness", 100, 50, 0,
                 about="two of our transfers at once; steady-state share of each"),
        Scenario("tcp-friendly", "tcp-friendly", 100, 50, 0,
                 about="our transfer beside one iperf3 cubic flow; share of each"),
        Scenario("small-files", "small-files", 100, 10, 0,
                 about="10,000 x 8 KiB up and down; files/s vs rsync -a (rsync daemon), "
                       "tar|curl -T and per-file curl -T"),
        Scenario("failover", "pending", 100, 100, 0,
                 needs="runs on its own: python -m bench.failover --out DIR",
                 about="UDP blocked at 30 % of a download, unblocked at 60 %"),
    ]
    return out


QUICK = ("loopback", "wan-100M-100ms-1pct")


def select(patterns: Sequence[str]) -> list[Scenario]:
    """Scenarios matching any of *patterns* (exact names or shell globs), in report order.

    An unmatched pattern is an error: a typo must not silently run nothing.
    """
    scenarios = all_scenarios()
    chosen: list[Scenario] = []
    for pat in patterns:
        hits = [s for s in scenarios if fnmatch.fnmatchcase(s.name, pat)]
        if not hits:
            names = ", ".join(s.name for s in scenarios)
            raise ValueError(f"no scenario matches {pat!r}; known: {names}")
        chosen += [h for h in hits if h not in chosen]
    return [s for s in scenarios if s in chosen]
