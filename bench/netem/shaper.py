"""One direction of the emulated link: loss, bottleneck queue, serialisation clock, delay line.

Kept free of I/O so the arithmetic can be unit-tested and so the forwarder's hot loop only pays
for one method call per *batch* of packets, not per packet.  Model (same order as a router):

1. independent random loss at ingress (seeded RNG, so runs are reproducible);
2. drop-tail queue in front of the bottleneck, bounded in bytes; its backlog is implied by the
   serialisation clock, so no per-packet queue object is needed;
3. serialisation: a packet leaves the bottleneck at ``max(now, last_departure) + size*8/rate``;
4. propagation: it is due at ``departure + delay (+ jitter)``; jitter is clamped so packets keep
   their order unless reordering is explicitly allowed.
"""

from __future__ import annotations

import heapq
import random
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from itertools import accumulate
from operator import sub

LATE_BUCKET_S = 10e-6  # histogram resolution for lateness (actual write time - due time)
LATE_BUCKETS = 5000  # 10 us x 5000 = 50 ms; anything later lands in the last bucket
MIN_QUEUE_BYTES = 16 * 1500  # a bottleneck with less than ~16 packets of buffer is unrealistic


@dataclass
class DirectionParams:
    """Settings of one direction; rates are bits/s on IP packet bytes, 0 means unlimited."""

    rate_bps: float = 0.0
    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    queue_bytes: int = 0  # 0 means no bottleneck queue limit (only sensible when rate == 0)
    reorder: bool = False

    def to_dict(self) -> dict[str, float | int | bool]:
        """JSON-friendly form for the control channel."""
        return asdict(self)


@dataclass
class Counters:
    """What happened to the packets of one direction; proves the emulator was not the bottleneck."""

    rx_packets: int = 0
    fwd_packets: int = 0
    fwd_bytes: int = 0
    drop_loss_packets: int = 0
    drop_loss_bytes: int = 0
    drop_queue_packets: int = 0
    drop_queue_bytes: int = 0
    write_errors: int = 0
    late_max_s: float = 0.0
    late_hist: list[int] = field(default_factory=lambda: [0] * LATE_BUCKETS)

    def late_quantiles(self, qs: tuple[float, ...]) -> list[float]:
        """Lateness quantiles from the histogram (upper bucket edge: never under-reports).

        Runs inside the forwarding loop when the control channel asks, so it uses C-speed
        accumulate + bisect rather than a Python loop over the buckets.
        """
        cum = list(accumulate(self.late_hist))
        if not cum or cum[-1] == 0:
            return [0.0 for _ in qs]
        return [min(bisect_left(cum, q * cum[-1]) + 1, LATE_BUCKETS) * LATE_BUCKET_S for q in qs]

    def copy(self) -> Counters:
        """Independent snapshot (the histogram list is copied too)."""
        c = replace(self, late_hist=list(self.late_hist))
        return c

    def minus(self, base: Counters) -> Counters:
        """Counts since *base* was taken (late_max_s is kept: it is tracked per window)."""
        d = replace(self, late_hist=list(map(sub, self.late_hist, base.late_hist)))
        for name in _SCALARS:
            setattr(d, name, getattr(self, name) - getattr(base, name))
        return d

    def summary(self) -> dict[str, float | int]:
        """Counters without the raw histogram, lateness in milliseconds.

        Built by hand: ``dataclasses.asdict`` would deep-copy the 5000-bucket histogram element
        by element, stalling the forwarding loop for milliseconds on every control request.
        """
        d: dict[str, float | int] = {name: getattr(self, name) for name in _SCALARS}
        p50, p99 = self.late_quantiles((0.50, 0.99))
        d["late_max_ms"] = round(self.late_max_s * 1e3, 3)
        d["late_p99_ms"] = round(p99 * 1e3, 3)
        d["late_p50_ms"] = round(p50 * 1e3, 3)
        return d


_SCALARS = tuple(f.name for f in fields(Counters) if f.name not in ("late_hist", "late_max_s"))


class Shaper:
    """Loss + bottleneck + delay line for one direction."""

    def __init__(self, params: DirectionParams, seed: int) -> None:
        self.params = params
        self.rng = random.Random(seed)
        self.counters = Counters()  # cumulative, except late_max_s which is per window
        self._window_base = Counters()
        self._total_late_max = 0.0
        self.last_departure = 0.0
        self.last_due = 0.0
        self._fifo: deque[tuple[float, bytes]] = deque()
        self._heap: list[tuple[float, int, bytes]] = []
        self._seq = 0

    def set_params(self, params: DirectionParams) -> None:
        """Apply new settings; packets already scheduled keep their times (like a real link)."""
        if params.reorder != self.params.reorder:
            pending = list(self._fifo) + [(d, p) for d, _, p in self._heap]
            self._fifo.clear()
            self._heap.clear()
            pending.sort(key=lambda x: x[0])
            self.params = params
            for due, pkt in pending:
                self._push(due, pkt)
        self.params = params

    def reset_counters(self) -> None:
        """Start a fresh measurement window (e.g. per benchmark peer); totals keep counting.

        Only a snapshot is taken here, so the per-packet path updates a single set of counters.
        """
        self._total_late_max = max(self._total_late_max, self.counters.late_max_s)
        self.counters.late_max_s = 0.0
        self._window_base = self.counters.copy()

    def window(self) -> Counters:
        """Counters since the last :meth:`reset_counters`."""
        return self.counters.minus(self._window_base)

    def total(self) -> Counters:
        """Counters since the shaper started (shares the live histogram: read it, don't keep it)."""
        return replace(self.counters, late_max_s=max(self._total_late_max, self.counters.late_max_s))

    def _push(self, due: float, pkt: bytes) -> None:
        if self.params.reorder:
            self._seq += 1
            heapq.heappush(self._heap, (due, self._seq, pkt))
        else:
            self._fifo.append((due, pkt))

    def ingest(self, packets: list[bytes], now: float) -> None:
        """Schedule a batch of packets that all arrived at *now*."""
        p = self.params
        c = self.counters
        rnd = self.rng.random
        loss = p.loss
        rate = p.rate_bps
        qlimit = p.queue_bytes
        delay = p.delay_s
        jitter = p.jitter_s
        reorder = p.reorder
        fifo_append = self._fifo.append
        last_dep = self.last_departure
        last_due = self.last_due
        c.rx_packets += len(packets)
        for pkt in packets:
            size = len(pkt)
            if loss and rnd() < loss:
                c.drop_loss_packets += 1
                c.drop_loss_bytes += size
                continue
            if rate:
                start = last_dep if last_dep > now else now
                if qlimit and (start - now) * rate / 8.0 + size > qlimit:
                    c.drop_queue_packets += 1
                    c.drop_queue_bytes += size
                    continue
                last_dep = start + size * 8.0 / rate
                due = last_dep + delay
            else:
                due = now + delay
            if jitter:
                due += self.rng.uniform(-jitter, jitter)
                if due < now:
                    due = now
            if reorder:
                self._seq += 1
                heapq.heappush(self._heap, (due, self._seq, pkt))
            else:
                if due < last_due:
                    due = last_due
                last_due = due
                fifo_append((due, pkt))
        self.last_departure = last_dep
        self.last_due = last_due

    def next_due(self) -> float | None:
        """Due time of the earliest pending packet, for the poll timeout."""
        if self._heap:
            h = self._heap[0][0]
            if self._fifo:
                return min(h, self._fifo[0][0])
            return h
        if self._fifo:
            return self._fifo[0][0]
        return None

    def emit(self, clock: Callable[[], float], write: Callable[[bytes], object]) -> int:
        """Write every packet that is due, re-reading the clock after each write.

        Lateness is taken right before each write (not once per batch), so the counters show
        the real send time minus the due time, including the time spent writing earlier
        packets of the same batch.
        """
        c = self.counters
        hist = c.late_hist
        top = LATE_BUCKETS - 1
        inv = 1.0 / LATE_BUCKET_S
        late_max = c.late_max_s
        n = 0
        nbytes = 0
        fifo = self._fifo
        heap = self._heap
        now = clock()
        while True:
            if fifo and fifo[0][0] <= now:
                due, pkt = fifo.popleft()
            elif heap and heap[0][0] <= now:
                due, _, pkt = heapq.heappop(heap)
            else:
                break
            late = now - due
            try:
                write(pkt)
            except OSError:
                c.write_errors += 1
                now = clock()
                continue
            if late > late_max:
                late_max = late
            i = int(late * inv)
            hist[i if i < top else top] += 1
            n += 1
            nbytes += len(pkt)
            now = clock()
        c.late_max_s = late_max
        c.fwd_packets += n
        c.fwd_bytes += nbytes
        return n

    def pending(self) -> int:
        """Packets in the delay line (including those still queued at the bottleneck)."""
        return len(self._fifo) + len(self._heap)
