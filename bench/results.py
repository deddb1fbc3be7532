"""One row of the benchmark report, plus the derived columns everyone computes the same way."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PeerResult:
    """Outcome of one peer in one scenario.

    ``bytes`` are payload (file) bytes that arrived; ``seconds`` is wall time of the client
    process (for iperf3: its own measured interval).  ``status`` is ok, capped (time limit hit,
    goodput from the bytes that made it), skipped (with ``note`` saying why) or failed.
    """

    scenario: str
    peer: str
    direction: str = "down"
    cc: str = ""
    status: str = "ok"
    bytes: int = 0
    seconds: float = 0.0
    link_mbit: float | None = None
    client_cpu_s: float | None = None
    server_cpu_s: float | None = None
    client_rss_mb: float | None = None
    server_rss_mb: float | None = None
    resent_bytes: int | None = None
    app_resent_bytes: int | None = None
    files: int | None = None
    share_pct: float | None = None
    udp_resent_bytes: int | None = None  # UDP rows: piece bytes the sender sent again
    udp_loss_pct: float | None = None  # UDP rows: datagrams declared lost, % (sender's view)
    udp_rtt_ms: float | None = None  # UDP rows: smoothed RTT of the path
    load_avg: float | None = None  # the host's 1-minute load average when the row ended
    published_mbps: float | None = None  # a vendor's published figure (status "published")
    emu: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def goodput_mbps(self) -> float | None:
        """File bytes over wall time, in Mbit/s (None when nothing was measured); a
        published row gives the published figure."""
        if self.status == "published":
            return self.published_mbps
        if self.status in ("skipped", "failed") or self.seconds <= 0:
            return None
        return self.bytes * 8 / self.seconds / 1e6

    @property
    def pct_of_link(self) -> float | None:
        """Goodput as a share of the emulated bottleneck rate."""
        g = self.goodput_mbps
        if g is None or not self.link_mbit:
            return None
        return 100.0 * g / self.link_mbit

    @property
    def redundancy_pct(self) -> float | None:
        """UDP rows: bytes sent again as a share of the file bytes moved, in %."""
        if self.udp_resent_bytes is None or self.bytes <= 0:
            return None
        return 100.0 * self.udp_resent_bytes / self.bytes

    def cpu_per_gb(self, side: str) -> float | None:
        """CPU seconds per GB moved on the client ("client") or server ("server") side."""
        cpu = self.client_cpu_s if side == "client" else self.server_cpu_s
        if cpu is None or self.bytes <= 0:
            return None
        return cpu / (self.bytes / 1e9)

    @property
    def files_per_s(self) -> float | None:
        """Small-file rate, when the row counts files."""
        if self.files is None or self.seconds <= 0:
            return None
        return self.files / self.seconds

    def to_dict(self) -> dict[str, Any]:
        """JSON form with the derived columns included."""
        d = asdict(self)
        d["goodput_mbps"] = self.goodput_mbps
        d["pct_of_link"] = self.pct_of_link
        d["client_cpu_s_per_gb"] = self.cpu_per_gb("client")
        d["server_cpu_s_per_gb"] = self.cpu_per_gb("server")
        d["files_per_s"] = self.files_per_s
        d["redundancy_pct"] = self.redundancy_pct
        return d

    def sane(self) -> bool:
        """No NaN/inf anywhere in the numeric columns (checked by the smoke test too)."""
        for v in self.to_dict().values():
            if isinstance(v, float) and not math.isfinite(v):
                return False
        return True
