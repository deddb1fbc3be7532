"""A scripted link and hand-stepped clock for the sans-IO UDP core (no sockets).

``Bottleneck``: a drop-tail queue of ``queue_bytes`` drained at ``rate_bps``, shared by
every ``Link`` that names it. ``Link``: one direction, with the bottleneck (optional),
random loss after it (seeded), propagation ``delay``, uniform ``jitter`` (which reorders
when larger than the packet spacing), explicit reordering (``reorder`` probability of
``reorder_extra`` more delay), duplication, corruption (one byte flipped), windows
of silence, and a path MTU (``max_size``) that silently drops larger datagrams.
``Sim`` steps time to the next arrival or connection timer, like an event loop would,
and calls the owners after each step.

Host jitter (``Peer.stall``): a peer on a busy host does not run the moment a datagram
arrives or its timer falls due; it runs up to ``stall`` seconds later (uniform), and
then takes everything that arrived meanwhile at once, as an event loop whose process
was descheduled does. That delay is not queueing on the path: with ``kernel_ts`` the
peer is told each datagram's arrival time (the kernel's receive timestamp) as well.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from transport.blocks.ranges import RangeSet
from transport.udp import UdpConfig, UdpConnection, derive_path_keys, new_path_secret
from transport.udp.events import PiecesAcked, PiecesLost, PiecesReceived, SendReady


class Bottleneck:
    def __init__(self, rate_bps: float, queue_bytes: int) -> None:
        self.rate = rate_bps / 8
        self.queue_bytes = queue_bytes
        self.busy_until = 0.0
        self.dropped = 0
        self.max_delay = 0.0
        self.delays: list[tuple[float, float]] = []  # (time, queueing delay) samples

    def enqueue(self, now: float, size: int) -> float | None:
        """Departure time of a datagram of ``size`` bytes, or None (tail drop)."""
        backlog = max(0.0, self.busy_until - now) * self.rate
        if backlog + size > self.queue_bytes:
            self.dropped += 1
            return None
        depart = max(now, self.busy_until) + size / self.rate
        self.busy_until = depart
        qd = depart - now - size / self.rate
        self.max_delay = max(self.max_delay, qd)
        self.delays.append((now, qd))
        return depart


@dataclass
class Link:
    rng: random.Random
    delay: float = 0.025
    jitter: float = 0.0
    loss: float = 0.0
    dup: float = 0.0
    corrupt: float = 0.0
    reorder: float = 0.0
    reorder_extra: float = 0.005
    bottleneck: Bottleneck | None = None
    silent: list[tuple[float, float]] = field(default_factory=list)
    max_size: int = 0           # a path MTU: larger datagrams vanish (0: none)
    sent: int = 0
    lost: int = 0
    delivered: int = 0
    too_big: int = 0

    def transmit(self, now: float, data: bytes) -> list[tuple[float, bytes]]:
        self.sent += 1
        if self.max_size and len(data) > self.max_size:
            self.too_big += 1  # an ICMP "fragmentation needed" that no one hears
            return []
        if any(a <= now < b for a, b in self.silent):
            self.lost += 1
            return []
        t = now
        if self.bottleneck is not None:
            depart = self.bottleneck.enqueue(now, len(data))
            if depart is None:
                self.lost += 1
                return []
            t = depart
        if self.loss and self.rng.random() < self.loss:
            self.lost += 1
            return []
        if self.corrupt and self.rng.random() < self.corrupt:
            i = self.rng.randrange(len(data))
            data = data[:i] + bytes([data[i] ^ (1 << self.rng.randrange(8))]) + data[i + 1:]
        out = []
        copies = 2 if self.dup and self.rng.random() < self.dup else 1
        for _ in range(copies):
            arrive = t + self.delay
            if self.jitter:
                arrive += self.rng.random() * self.jitter
            if self.reorder and self.rng.random() < self.reorder:
                arrive += self.reorder_extra
            out.append((arrive, data))
        self.delivered += 1
        return out


class Source:
    """Sending owner: pieces ``(file, block, 0, data)``; re-queues what is reported lost
    at once, as ``fallback.udpblocks.UdpPump`` does (retransmissions are not held to the
    send budget; the core sends them ahead of new data)."""

    def __init__(self, blocks: dict[tuple[int, int], bytes]) -> None:
        self.blocks = blocks
        self.pending: deque[tuple[int, int, int, int, bool]] = deque(
            (f, b, 0, len(d), False) for (f, b), d in blocks.items())
        self.retx: deque[tuple[int, int, int, int]] = deque()
        self.lost_at: list[tuple[float, tuple[int, int, int]]] = []  # (time, piece start)
        self.acked: dict[tuple[int, int], RangeSet] = {k: RangeSet() for k in blocks}
        self.acked_twice = 0
        self.lost_bytes = 0
        self.total = sum(len(d) for d in blocks.values())
        self.acked_bytes = 0
        self.piece_size = 256 * 1024

    def feed(self, conn: UdpConnection) -> None:
        while self.retx and not conn.closed:
            f, b, off, n = self.retx.popleft()
            conn.queue_piece(f, b, off, memoryview(self.blocks[(f, b)])[off:off + n],
                             retransmission=True)
        while self.pending and not conn.closed:
            f, b, off, n, retx = self.pending[0]
            take = min(n, self.piece_size, conn.send_budget())
            if take <= 0:
                return
            data = memoryview(self.blocks[(f, b)])[off:off + take]
            conn.queue_piece(f, b, off, data, retransmission=retx)
            if take == n:
                self.pending.popleft()
            else:
                self.pending[0] = (f, b, off + take, n - take, retx)

    def on_event(self, ev: object, now: float = 0.0) -> None:
        if isinstance(ev, PiecesAcked):
            for f, b, off, n in ev.pieces:
                rs = self.acked[(f, b)]
                if rs.overlaps(off, off + n):
                    self.acked_twice += 1
                rs.add(off, off + n)
                self.acked_bytes += n
        elif isinstance(ev, PiecesLost):
            for f, b, off, n in ev.pieces:
                self.lost_bytes += n
                self.retx.append((f, b, off, n))
                self.lost_at.append((now, (f, b, off)))

    @property
    def done(self) -> bool:
        return self.acked_bytes >= self.total and not self.pending and not self.retx


class Sink:
    """Receiving owner: assembles blocks, counts bytes delivered more than once."""

    def __init__(self, sizes: dict[tuple[int, int], int]) -> None:
        self.data = {k: bytearray(n) for k, n in sizes.items()}
        self.have = {k: RangeSet() for k in sizes}
        self.duplicate_bytes = 0
        self.unknown = 0
        self.received_bytes = 0
        self.times: list[tuple[float, int]] = []
        self.arrived: dict[tuple[int, int, int], float] = {}  # piece start -> last arrival

    def on_event(self, ev: object, now: float = 0.0) -> None:
        if isinstance(ev, PiecesReceived):
            for f, b, off, data in ev.pieces:
                key = (f, b)
                n = len(data)
                if key not in self.data or off + n > len(self.data[key]):
                    self.unknown += 1
                    continue
                if self.have[key].overlaps(off, off + n):
                    self.duplicate_bytes += n
                self.have[key].add(off, off + n)
                self.data[key][off:off + n] = data
                self.received_bytes += n
                self.times.append((now, n))
                self.arrived[(f, b, off)] = now

    def complete(self) -> bool:
        return all(rs.covers(0, len(self.data[k])) for k, rs in self.have.items())


@dataclass
class Peer:
    conn: UdpConnection
    link: Link                  # towards the other end
    other: str                  # the other end's name (its address)
    on_event: Callable[[object], None] = lambda ev: None
    feed: Callable[[UdpConnection], None] = lambda conn: None
    stall: float = 0.0          # host jitter: runs up to this many seconds late (uniform)
    kernel_ts: bool = True      # pass each datagram's arrival time as ``rx_time``


class Sim:
    """Hand-stepped clock: arrivals and connection timers in time order."""

    def __init__(self, seed: int = 7) -> None:
        self.now = 0.0
        self.peers: dict[str, Peer] = {}
        self._heap: list[tuple[float, int, str, str, bytes]] = []
        self._seq = 0
        self.steps = 0
        self._rng = random.Random(seed)
        self._inbox: dict[str, list[tuple[float, str, bytes]]] = {}
        self._wake: dict[str, float] = {}   # stalled peer -> when it runs next

    def add(self, name: str, peer: Peer) -> None:
        self.peers[name] = peer
        self._inbox[name] = []

    def _due(self, name: str) -> None:
        """``name`` has work now: it runs now, or after a host stall if it has one."""
        if name not in self._wake:
            stall = self.peers[name].stall
            self._wake[name] = self.now + (self._rng.random() * stall if stall else 0.0)

    def _flush(self, name: str) -> None:
        p = self.peers[name]
        for data, addr in p.conn.datagrams_to_send(self.now):
            assert addr == (p.other, 1)
            for when, d in p.link.transmit(self.now, data):
                heapq.heappush(self._heap, (when, self._seq, p.other, name, d))
                self._seq += 1

    def _drain(self, name: str) -> None:
        p = self.peers[name]
        while (ev := p.conn.next_event()) is not None:
            if isinstance(ev, SendReady):
                continue
            p.on_event(ev)
        p.feed(p.conn)

    def run(self, until: float, stop: Callable[[], bool] = lambda: False,
            every: tuple[float, Callable[[float], None]] | None = None) -> None:
        next_tick = (math.floor(self.now / every[0] + 1e-9) + 1) * every[0] if every else math.inf
        for name in self.peers:
            self._drain(name)
            self._flush(name)
        same = 0
        wake = self._wake
        while self.now < until and not stop():
            times = [self._heap[0][0]] if self._heap else []
            for name, p in self.peers.items():
                t = wake.get(name)
                if t is None:
                    t = p.conn.get_timer()
                if t is not None:
                    times.append(t)
            if not times:
                break
            t = max(min(times), self.now)
            if t >= next_tick and every is not None:
                every[1](next_tick)
                next_tick += every[0]
            if t <= self.now and not (self._heap and self._heap[0][0] <= self.now):
                same += 1
                if same > 10_000:  # a timer that never moves: a bug, fail fast
                    raise RuntimeError(f"timers stuck at t={self.now}")
            else:
                same = 0
            self.now = min(t, until)
            self.steps += 1
            while self._heap and self._heap[0][0] <= self.now:
                when, _, dest, src, data = heapq.heappop(self._heap)
                self._inbox[dest].append((when, src, data))
                self._due(dest)
            for name, p in self.peers.items():
                t2 = p.conn.get_timer()
                if t2 is not None and t2 <= self.now:
                    self._due(name)
            # Peers without a stall run every step (as before host jitter existed).
            ready = [n for n, p in self.peers.items()
                     if not p.stall or wake.get(n, math.inf) <= self.now]
            for name in ready:
                wake.pop(name, None)
                p = self.peers[name]
                for when, src, data in self._inbox[name]:
                    p.conn.receive_datagram(data, (src, 1), self.now,
                                            when if p.kernel_ts else None)
                self._inbox[name].clear()
            for name in ready:
                p = self.peers[name]
                t2 = p.conn.get_timer()
                if t2 is not None and t2 <= self.now:
                    p.conn.handle_timer(self.now)
            for name in ready:
                self._drain(name)
                self._flush(name)
        if every is not None and next_tick <= until + 1e-9 and not stop():
            every[1](next_tick)


def pair(config_a: UdpConfig | None = None, config_b: UdpConfig | None = None, *,
         cid: int = 0x1234, b_name: str = "b", start: float = 0.0
         ) -> tuple[UdpConnection, UdpConnection]:
    """A sender ``a`` (knows ``b``'s address) and receiver ``b`` (learns it)."""
    secret = new_path_secret()
    a = UdpConnection(config_a or UdpConfig(), cid, derive_path_keys(secret, initiator=True),
                      start, peer=(b_name, 1))
    b = UdpConnection(config_b or UdpConfig(), cid, derive_path_keys(secret, initiator=False),
                      start)
    return a, b


class Endless:
    """Sending owner with an endless supply (for rate tests): 256 KiB pieces of zeros."""

    def __init__(self) -> None:
        self.block = 0
        self.data = bytes(256 * 1024)
        self.relost: list[tuple[int, int, int, int]] = []
        self.acked = 0

    def feed(self, conn: UdpConnection) -> None:
        while self.relost and conn.send_budget() >= self.relost[-1][3]:
            f, b, off, n = self.relost.pop()
            conn.queue_piece(f, b, off, memoryview(self.data)[:n], retransmission=True)
        while conn.send_budget() >= len(self.data):
            conn.queue_piece(0, self.block, 0, self.data)
            self.block += 1

    def on_event(self, ev: object) -> None:
        if isinstance(ev, PiecesLost):
            self.relost.extend(ev.pieces)
        elif isinstance(ev, PiecesAcked):
            self.acked += sum(p[3] for p in ev.pieces)


class Counter:
    """Receiving owner that counts piece bytes (goodput)."""

    def __init__(self) -> None:
        self.bytes = 0

    def on_event(self, ev: object) -> None:
        if isinstance(ev, PiecesReceived):
            self.bytes += sum(len(p[3]) for p in ev.pieces)
