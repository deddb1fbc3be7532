"""Sender-side reliability: sent-packet map, acknowledgements, RTT, loss detection.

The shape follows aioquic's ``quic/recovery.py`` and RFC 9002, with two changes
for bulk data over lossy links:

* **Only what the receiver reported missing can be declared lost.** A FEEDBACK says,
  for every packet number in ``[low, stop of its last range)``, whether it arrived
  (``codec`` module). Packet numbers below that bound that are still outstanding go
  into ``missing`` (ascending); loss detection (RFC 9002 section 6.1: packet threshold
  3, time threshold 9/8 x max(smoothed_rtt, latest_rtt)) looks at ``missing`` only.
  Feedback lost on the way back therefore never turns a delivered packet into a
  "lost" one; packets never reported on (tail, or every feedback lost) are chased by
  the probe timeout (section 6.2), whose KEEPALIVE makes the receiver report.
* **Adaptive reordering thresholds** (section 6.1.1 allows it; quiche caps the packet
  threshold at 20, Linux's RACK widens its window on spurious retransmissions): when a
  packet declared lost is acknowledged later, the loss was spurious; it is counted and
  the threshold that fired is widened.

The map keeps per packet only ``(time sent, size, piece references)``: the data itself
is not held (the owner re-reads what it re-leases), so in-flight memory is bookkeeping.
Work per feedback is O(newly covered packet numbers + packets still missing), never the
whole window again, so a FEEDBACK that repeats old ranges costs little.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from collections.abc import Sequence

from transport.errors import ProtocolError

#: ``(file, block, offset, length)`` of a piece sent in a packet.
PieceRef = tuple[int, int, int, int]
#: What the map keeps per packet: time sent (s), size (bytes), pieces (None: KEEPALIVE).
SentRecord = tuple[float, int, tuple[PieceRef, ...] | None]

K_PACKET_THRESHOLD = 3          # RFC 9002 section 6.1.1
K_MAX_PACKET_THRESHOLD = 20     # quiche's MAX_PACKET_THRESHOLD
K_NO_PACKET_THRESHOLD = 1 << 62  # time threshold only
K_TIME_THRESHOLD = 9 / 8        # RFC 9002 section 6.1.2
K_MAX_TIME_THRESHOLD = 2.0
K_GRANULARITY = 0.001           # RFC 9002 section 6.1.2 (kGranularity)
K_INITIAL_RTT = 0.333           # RFC 9002 section 6.2.2
K_MAX_PTO = 1.0                 # backoff cap: a path that comes back is noticed within 1 s
_LOST_MEMORY = 1 << 16          # lost packet numbers remembered for spurious detection


class RttEstimator:
    """RFC 9002 section 5: latest, smoothed, variation and minimum RTT, in seconds."""

    __slots__ = ("latest", "smoothed", "rttvar", "min_rtt", "samples")

    def __init__(self) -> None:
        self.latest = 0.0
        self.smoothed = K_INITIAL_RTT
        self.rttvar = K_INITIAL_RTT / 2
        self.min_rtt = float("inf")
        self.samples = 0

    def update(self, latest: float, ack_delay: float) -> None:
        """One sample: ``latest`` RTT and the receiver's reported ``ack_delay`` (seconds)."""
        self.latest = latest
        self.min_rtt = min(self.min_rtt, latest)
        if self.samples == 0:
            self.smoothed = latest
            self.rttvar = latest / 2
        else:
            adjusted = latest - ack_delay if latest >= self.min_rtt + ack_delay else latest
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.smoothed - adjusted)
            self.smoothed = 0.875 * self.smoothed + 0.125 * adjusted
        self.samples += 1

    def pto(self, max_ack_delay: float) -> float:
        """Probe timeout base (RFC 9002 section 6.2.1), before backoff."""
        return self.smoothed + max(4 * self.rttvar, K_GRANULARITY) + max_ack_delay


class Recovery:
    """Outstanding ack-eliciting packets, acknowledgement processing and loss detection.

    ``on_feedback`` and ``detect_loss`` append to ``acked`` / ``lost`` (lists of
    ``PieceRef``) which the connection drains into events.
    """

    def __init__(self, max_ack_delay: float) -> None:
        self.max_ack_delay = max_ack_delay
        self.rtt = RttEstimator()
        self.sent: dict[int, SentRecord] = {}
        self._floor = 0                        # no outstanding packet number below this
        self.missing: deque[int] = deque()     # outstanding pns reported missing (lazy)
        self.lost_recent: dict[int, tuple[bool, float]] = {}  # pn -> (by packet thr., t)
        self.covered_hi = 0
        self.largest_acked = -1
        self.bytes_in_flight = 0
        self.packet_threshold = K_PACKET_THRESHOLD
        self.time_threshold = K_TIME_THRESHOLD
        self.loss_time: float | None = None
        self.last_eliciting_sent = 0.0
        self.pto_count = 0
        self.acked: list[PieceRef] = []
        self.lost: list[PieceRef] = []
        # counters
        self.acked_packets = 0
        self.acked_bytes = 0
        self.lost_packets = 0
        self.lost_bytes = 0
        self.spurious_packets = 0
        self.spurious_bytes = 0

    # -- sending ------------------------------------------------------------------------
    def on_sent(self, pn: int, now: float, size: int,
                pieces: tuple[PieceRef, ...] | None) -> None:
        self.sent[pn] = (now, size, pieces)
        self.bytes_in_flight += size
        self.last_eliciting_sent = now

    def floor(self, next_pn: int) -> int:
        """The oldest outstanding packet number, or ``next_pn`` when none.

        Walks up from the previous floor: each packet number is passed once over the
        connection's life (amortised O(1) per packet).
        """
        f, sent = self._floor, self.sent
        if not sent:
            f = next_pn
        else:
            while f < next_pn and f not in sent:
                f += 1
        self._floor = f
        return f

    # -- acknowledgements ---------------------------------------------------------------
    def _ack(self, pn: int) -> bool:
        rec = self.sent.pop(pn, None)
        if rec is None:
            return False
        self.bytes_in_flight -= rec[1]
        self.acked_packets += 1
        self.acked_bytes += rec[1]
        if rec[2] is not None:
            self.acked.extend(rec[2])
        return True

    def _ack_range(self, start: int, stop: int) -> None:
        """``_ack`` for every number of ``[start, stop)`` (inlined: the hot loop)."""
        pop, acked = self.sent.pop, self.acked
        count = size = 0
        for pn in range(start, stop):
            rec = pop(pn, None)
            if rec is not None:
                count += 1
                size += rec[1]
                if rec[2] is not None:
                    acked.extend(rec[2])
        self.bytes_in_flight -= size
        self.acked_packets += count
        self.acked_bytes += size

    def on_feedback(self, now: float, largest: int, ack_delay: float, low: int,
                    ranges: Sequence[tuple[int, int]], next_pn: int) -> bool:
        """Apply one FEEDBACK; returns True when ``largest`` was newly acknowledged.

        ``ProtocolError`` when it acknowledges a packet number never sent.
        """
        if largest >= next_pn:
            raise ProtocolError(f"feedback acknowledges packet {largest}, never sent")
        sent = self.sent
        largest_rec = sent.get(largest)
        hi = max(ranges[-1][1], low) if ranges else low
        # Spurious losses: packets declared lost that the receiver reports received.
        if self.lost_recent and ranges:
            self._check_spurious(low, hi, ranges, largest)
        # 1. Packets already reported missing that arrived since (reordering).
        if self.missing and ranges:
            starts = [r[0] for r in ranges]
            for pn in self.missing:
                if pn in sent and low <= pn < hi:
                    i = bisect_right(starts, pn) - 1
                    if i >= 0 and pn < ranges[i][1]:
                        self._ack(pn)
        # 2. Newly covered territory [cursor, hi): ranges acknowledged, gaps missing.
        # Below ``low`` the receiver has forgotten (it follows our floor, so normally
        # nothing of ours is outstanding there): whatever is, counts as missing.
        cursor = self.covered_hi
        if hi > cursor:
            missing = self.missing
            for start, stop in ranges:
                if stop <= cursor:
                    continue
                if start > cursor:
                    for pn in range(cursor, start):
                        if pn in sent:
                            missing.append(pn)
                    cursor = start
                self._ack_range(cursor, stop)
                cursor = stop
            for pn in range(cursor, hi):
                if pn in sent:
                    missing.append(pn)
            self.covered_hi = hi
        # 3. The largest, which a truncated report may leave outside its ranges.
        self._ack(largest)
        if largest > self.largest_acked:
            self.largest_acked = largest
        if largest_rec is not None:
            self.rtt.update(now - largest_rec[0], min(ack_delay, self.max_ack_delay))
        self.pto_count = 0
        self.detect_loss(now)
        return largest_rec is not None

    def _check_spurious(self, low: int, hi: int, ranges: Sequence[tuple[int, int]],
                        largest: int) -> None:
        starts = [r[0] for r in ranges]
        for pn in [p for p in self.lost_recent if p < low]:
            del self.lost_recent[pn]  # the receiver has forgotten them: no late news
        for pn, (by_packet, _t) in list(self.lost_recent.items()):
            got = pn == largest
            if not got and pn < hi:
                i = bisect_right(starts, pn) - 1
                got = i >= 0 and pn < ranges[i][1]
            if got:
                del self.lost_recent[pn]
                self.spurious_packets += 1
                if by_packet:
                    # Reordering deeper than the threshold: widen it; past 20 packets
                    # (quiche's cap) count no more packets and rely on time alone, as
                    # RACK does once reordering is seen (RFC 8985 section 6.2).
                    distance = self.largest_acked - pn
                    wider = max(self.packet_threshold, distance + 1)
                    self.packet_threshold = (wider if wider <= K_MAX_PACKET_THRESHOLD
                                             else K_NO_PACKET_THRESHOLD)
                else:
                    self.time_threshold = min(K_MAX_TIME_THRESHOLD, self.time_threshold + 0.125)

    # -- loss detection (RFC 9002 section 6.1) ------------------------------------------
    def loss_delay(self) -> float:
        rtt = self.rtt
        return max(self.time_threshold * max(rtt.latest, rtt.smoothed), K_GRANULARITY)

    def detect_loss(self, now: float) -> None:
        """Declare lost the missing packets past the packet or time threshold."""
        self.loss_time = None
        missing, sent = self.missing, self.sent
        if not missing:
            return
        delay = self.loss_delay()
        threshold_pn = self.largest_acked - self.packet_threshold
        while missing:
            pn = missing[0]
            rec = sent.get(pn)
            if rec is None:
                missing.popleft()
                continue
            by_packet = pn <= threshold_pn
            if not by_packet and rec[0] + delay > now:  # same sum as the timer: no float gap
                self.loss_time = rec[0] + delay
                return
            missing.popleft()
            del sent[pn]
            self.bytes_in_flight -= rec[1]
            self.lost_packets += 1
            self.lost_bytes += rec[1]
            if rec[2] is not None:
                self.lost.extend(rec[2])
            if len(self.lost_recent) < _LOST_MEMORY:
                self.lost_recent[pn] = (by_packet, now)

    # -- probe timeout (RFC 9002 section 6.2) -------------------------------------------
    def pto_time(self) -> float | None:
        """When to send a KEEPALIVE to elicit feedback, or None with nothing outstanding."""
        if not self.sent:
            return None
        interval = min(self.rtt.pto(self.max_ack_delay) * (1 << min(self.pto_count, 16)),
                       max(K_MAX_PTO, self.rtt.smoothed))
        return self.last_eliciting_sent + interval

    def on_pto(self) -> None:
        self.pto_count += 1

    def abandon(self) -> None:
        """Report every outstanding packet's pieces as lost (closing, or giving the path up)."""
        for rec in self.sent.values():
            self.lost_packets += 1
            self.lost_bytes += rec[1]
            if rec[2] is not None:
                self.lost.extend(rec[2])
        self.sent.clear()
        self.missing.clear()
        self.bytes_in_flight = 0
        self.loss_time = None
