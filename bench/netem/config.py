"""User-facing link settings and their translation into per-direction shaper parameters.

Users think in "100 Mbit/s, 100 ms RTT, 1 % loss"; the shaper wants bits/s, one-way seconds,
probabilities and a queue limit in bytes.  Keeping the conversion in one place means the
control channel, the Python API and the validation all agree on what "rtt" and "queue" mean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from bench.netem.shaper import MIN_QUEUE_BYTES, DirectionParams

DEFAULT_QUEUE_BDP = 1.5  # drop-tail buffer of 1.5 x bandwidth-delay product unless told otherwise


@dataclass(frozen=True)
class LinkConfig:
    """Settings of one direction, in user units.

    ``rtt_ms`` is the round trip the direction contributes half of (one-way delay = rtt/2), so
    setting the same value on both directions yields that ping RTT.  ``queue_ms`` sizes the
    bottleneck buffer as time of queueing at the bottleneck rate; None means 1.5 x BDP.
    """

    rate_mbit: float = 0.0
    rtt_ms: float = 0.0
    loss_pct: float = 0.0
    jitter_ms: float = 0.0
    queue_ms: float | None = None
    reorder: bool = False

    def queue_bytes(self) -> int:
        """Bottleneck buffer in bytes (0 = unlimited, only when the rate is unlimited)."""
        if self.rate_mbit <= 0:
            return 0
        bytes_per_s = self.rate_mbit * 1e6 / 8.0
        if self.queue_ms is None:
            q = DEFAULT_QUEUE_BDP * bytes_per_s * self.rtt_ms / 1e3
        else:
            q = bytes_per_s * self.queue_ms / 1e3
        return max(MIN_QUEUE_BYTES, int(q))

    def to_params(self) -> DirectionParams:
        """Shaper parameters for this direction."""
        if not 0.0 <= self.loss_pct <= 100.0:
            raise ValueError(f"loss_pct out of range: {self.loss_pct}")
        if self.rate_mbit < 0 or self.rtt_ms < 0 or self.jitter_ms < 0:
            raise ValueError("rate, rtt and jitter must be >= 0")
        return DirectionParams(
            rate_bps=self.rate_mbit * 1e6,
            delay_s=self.rtt_ms / 2e3,
            jitter_s=self.jitter_ms / 1e3,
            loss=self.loss_pct / 100.0,
            queue_bytes=self.queue_bytes(),
            reorder=self.reorder,
        )

    def updated(self, changes: dict[str, Any]) -> LinkConfig:
        """Copy with *changes* applied; unknown keys are an error so typos do not pass silently."""
        names = {f.name for f in fields(self)}
        unknown = set(changes) - names
        if unknown:
            raise ValueError(f"unknown link setting(s): {sorted(unknown)}")
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)
