"""``UdpConnection``: the sans-IO core of one UDP path, in aioquic's shape.

No sockets, no clock, no asyncio: the owner feeds datagrams and the time
(``receive_datagram(data, addr, now)``), asks for datagrams to send
(``datagrams_to_send(now)``, or ``build_batch(now)`` which fills a reused buffer with
equal-size datagrams ready for one UDP GSO ``sendmsg``), arms ``get_timer()`` and calls
``handle_timer(now)``, and drains typed events with ``next_event()``.

One connection both sends and receives pieces (each direction has its own packet
numbers and keys). The sender's pieces come from ``queue_piece`` (bounded by
``UdpConfig.max_queue_bytes``; ``send_budget()`` says how much more fits) and are split
into datagram-sized pieces as they are sent; the core keeps no data after sending, only
``(file, block, offset, length)`` per packet, and reports every piece once as acknowledged
(``PiecesAcked``) or lost (``PiecesLost``, the owner re-queues it). Rate control
(``rate.py``) decides *how fast*, recovery (``recovery.py``) decides *what arrived*;
neither knows the other.

Datagrams that fail any check (size, magic, connection id, replay window, AEAD,
malformed body) are dropped and counted in ``drops`` by kind; ``receive_datagram`` never
raises for what arrives. Header checks and the replay window run before the AEAD, so a
flood of strangers' datagrams costs a struct unpack each.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag

from transport.errors import ProtocolError
from transport.udp import codec
from transport.udp.acks import AckTracker
from transport.udp.codec import (
    DATA,
    DATA_FIRST,
    DATA_PREFIX,
    FEEDBACK,
    HEADER,
    HEADER_SIZE,
    HOLE_LENGTH,
    KEEPALIVE,
    MAGIC,
    PIECE_HEADER,
    TAG_SIZE,
    U32,
    VERSION_HOLES,
)
from transport.udp.crypto import NONCE, Opener, PathKeys, ReplayWindow, Sealer
from transport.udp.events import (
    Address,
    Closed,
    Event,
    MtuRaised,
    PathResumed,
    PathSilent,
    PieceRef,
    PiecesAcked,
    PiecesLost,
    PiecesReceived,
    ProbeAnswered,
    ReceivedPiece,
    Stats,
    UdpConfig,
)
from transport.udp.rate import RatePolicer
from transport.udp.sending import SendHalf

_MAX_AHEAD = 1 << 24          # a packet number this far past the highest seen is forged
_DROP_KINDS = ("short", "magic", "cid", "type", "replay", "ahead", "auth", "malformed",
               "closed", "policed")
_PH = PIECE_HEADER.size
_I32 = 1 << 31


class UdpConnection(SendHalf):
    """One UDP path between two ends sharing ``keys`` and ``connection_id``.

    ``peer`` is the peer's address when known (the client); the daemon's end learns it
    from the first authenticated datagram, and follows a NAT rebinding once the new
    address answered a PROBE (path validation, ``_new_address``).
    """

    def __init__(self, config: UdpConfig, connection_id: int, keys: PathKeys, now: float,
                 peer: Address | None = None) -> None:
        super().__init__(config, connection_id, Sealer(keys.send), now, peer)
        self._opener = Opener(keys.receive)
        self._replay = ReplayWindow(config.replay_window)
        # receive half
        self._acks = AckTracker(config.max_tracked_ranges)
        self._received: list[ReceivedPiece] = []
        self._holes: list[PieceRef] = []
        self._rx_holes = 0         # hole pieces received (version 2)
        self._rx_bytes = 0
        self._rx_packets = 0
        self._rx_piece_bytes = 0
        self._rx_pending = 0
        self._rx_first_pending = 0.0
        self._feedback_now = False
        self._owd_ref = -1
        self._owd_min = _I32
        self._owd_max = -_I32
        self._owd_count = 0
        self._owd_time = now       # receive time of the datagram in hand, for its delay
        # both
        self._authenticated = 0    # datagrams of any type that passed the AEAD and replay checks
        self._last_heard = now
        self._silent = False
        self._silent_since = now
        self.drops = dict.fromkeys(_DROP_KINDS, 0)
        self._validating: dict[int, tuple[Address, float]] = {}  # token -> (address, sent)
        # Path MTU search (UdpConfig.initial_datagram_size): the due time of the next
        # PROBE of config.datagram_size bytes, None when there is nothing (more) to try.
        self._pmtu_next: float | None = (
            0.0 if config.initial_datagram_size is not None
            and config.initial_datagram_size < config.datagram_size else None)
        self._pmtu_tries = 0
        self._pmtu_token = -1
        cap = config.receive_cap
        self.policer = None if cap is None else RatePolicer(
            cap / 8 * (1.0 + config.receive_cap_margin),
            max(cap / 8 * config.receive_cap_burst, 16.0 * config.datagram_size))

    # == owner API: sending ===============================================================
    @property
    def closed(self) -> bool:
        return self._closed is not None

    def probe(self, now: float, token: int, pad_to: int | None = None) -> None:
        """Send a PROBE (answered by ``ProbeAnswered``); padded to ``pad_to`` bytes
        (default: the datagram size, so the answer proves full-size datagrams pass)."""
        body = codec.encode_probe(token, int(now * 1e6), self.size if pad_to is None else pad_to)
        self._control.append((codec.PROBE, body, None))

    def close(self, now: float, code: int = 0, reason: str = "", *, error: bool = False) -> None:
        """Close: send CLOSE (or ERROR), report unacknowledged and unsent pieces lost."""
        if self._closed:
            return
        self._control.clear()
        self._control.append((codec.ERROR if error else codec.CLOSE,
                              codec.encode_close(code, reason), None))
        self._finish(code, reason, error, by_peer=False)

    def _finish(self, code: int, reason: str, error: bool, by_peer: bool) -> None:
        self.recovery.abandon()
        lost = self.recovery.lost
        for c in self._queue:
            lost.append((c.file, c.block, c.offset, c.hole) if c.hole
                        else (c.file, c.block, c.offset + c.pos, len(c.view) - c.pos))
        self._queue.clear()
        self._front = 0
        self._queued = 0
        self._closed = Closed(code, reason, error, by_peer)
        self._events.append(self._closed)

    @property
    def last_heard(self) -> float:
        """When the last authenticated datagram arrived (the owner's clock)."""
        return self._last_heard

    # == owner API: events, timers ========================================================
    @property
    def highest_received(self) -> int:
        """The highest packet number authenticated so far (-1: none): beside
        ``authenticated``, the receiver's view of the loss (gaps)."""
        return int(self._replay.highest)

    @property
    def authenticated(self) -> int:
        """Datagrams of any type received that passed authentication and the replay check."""
        return self._authenticated

    def next_event(self) -> Event | None:
        if self._received or self._holes:
            pieces, self._received = self._received, []
            holes, self._holes = self._holes, []
            return PiecesReceived(pieces, holes)
        rec = self.recovery
        if rec.acked:
            acked, rec.acked = rec.acked, []
            return PiecesAcked(acked)
        if rec.lost:
            lost, rec.lost = rec.lost, []
            return PiecesLost(lost)
        if self._events:
            return self._events.popleft()
        return None

    def get_timer(self) -> float | None:
        """The next time ``handle_timer`` must run (seconds, the owner's clock), or None."""
        if self._closed:
            return None
        rec = self.recovery
        times = [self._last_heard + self.config.silent_after] if not self._silent else []
        if rec.loss_time is not None:
            times.append(rec.loss_time)
        pto = rec.pto_time()
        if pto is not None:
            times.append(pto)
        if self._rx_pending:
            times.append(self._rx_first_pending + self.config.max_ack_delay)
        if self.peer is not None:
            times.append(self._last_eliciting + self.config.keepalive_interval)
            if self._pmtu_next is not None and self._authenticated:
                times.append(self._pmtu_next)
            if self._queue and self._cwnd_room() >= self.size:
                times.append(self._pacer.next_time(self._quantum(), self.controller.rate))
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        if self._closed:
            return
        rec = self.recovery
        if rec.loss_time is not None and now >= rec.loss_time:
            rec.detect_loss(now)
        pto = rec.pto_time()
        if pto is not None and now >= pto:
            rec.on_pto()
            self._keepalive_due = True
        if now >= self._last_eliciting + self.config.keepalive_interval:
            self._keepalive_due = True
        if self._rx_pending and now >= self._rx_first_pending + self.config.max_ack_delay:
            self._feedback_now = True
        if (self._pmtu_next is not None and now >= self._pmtu_next and self._authenticated
                and self.peer is not None):
            self._probe_mtu(now)
        if not self._silent and now >= self._last_heard + self.config.silent_after:
            self._silent = True
            self._silent_since = self._last_heard
            self.controller.on_silence()
            self._events.append(PathSilent(self._last_heard))

    def _probe_mtu(self, now: float) -> None:
        """One PROBE padded to ``config.datagram_size``, once the peer was heard from
        (it knows our address); the answer raises the size (``_on_control``). A PROBE is
        not ack-eliciting: its loss is no congestion signal. After ``pmtu_probes``
        unanswered tries the base size stays (RFC 8899 section 5.1.2, MAX_PROBES)."""
        cfg = self.config
        if self._pmtu_tries >= cfg.pmtu_probes:
            self._pmtu_next = None
            return
        self._pmtu_tries += 1
        self._pmtu_token = int.from_bytes(os.urandom(8), "big")
        self._control.append((codec.PROBE, codec.encode_probe(
            self._pmtu_token, int(now * 1e6), cfg.datagram_size), None))
        self._pmtu_next = now + max(3.0 * self.recovery.rtt.smoothed, cfg.pmtu_probe_spacing)

    def _feedback_wanted(self) -> bool:
        return self._feedback_now or self._rx_pending >= self.config.ack_every

    def _feedback_body(self, now: float) -> bytes | None:
        acks = self._acks
        self._feedback_now = False
        self._rx_pending = 0
        if acks.largest < 0:
            return None
        fb = codec.Feedback(
            largest=acks.largest, ack_delay_us=max(0, int((now - acks.largest_time) * 1e6)),
            recv_bytes=self._rx_bytes, recv_packets=self._rx_packets,
            recv_time_us=int(now * 1e6), owd_count=self._owd_count,
            owd_min_us=self._owd_min if self._owd_count else 0,
            owd_max_us=self._owd_max if self._owd_count else 0,
            low=acks.low, ranges=tuple(acks.ranges()))
        self._owd_min, self._owd_max, self._owd_count = _I32, -_I32, 0
        return codec.encode_feedback(fb, self.size - HEADER_SIZE - TAG_SIZE)

    # == receiving ========================================================================
    def receive_datagram(self, data: bytes | bytearray | memoryview, addr: Address,
                         now: float, rx_time: float | None = None) -> None:
        """Process one datagram. Never raises for its content: drops are counted.

        ``rx_time``: when the datagram reached this host (the kernel's receive
        timestamp, ``SO_TIMESTAMPNS``, on the owner's clock), if known. One-way delay is
        measured to it rather than to ``now``, so the time the datagram waited for this
        process (event-loop lag, a descheduled process on a busy host) does not read as
        network queueing; lag beyond ``UdpConfig.host_lag_allowance`` still counts,
        so a receiver that cannot keep up slows a delay-based sender down.

        Checks before the AEAD, cheapest first: length, magic and version, connection
        id, type and flags, then the replay window and the packet number's distance
        ahead (RFC 4303's order: the window test costs a shift, the AEAD microseconds).
        """
        n = len(data)
        if n < HEADER_SIZE + TAG_SIZE:
            self.drops["short"] += 1
            return
        magic, version, type_, flags, cid, pn = HEADER.unpack_from(data, 0)
        if magic != MAGIC or version != self.version:
            self.drops["magic"] += 1
            return
        if cid != self.connection_id:
            self.drops["cid"] += 1
            return
        if flags or not codec.PROBE <= type_ <= codec.ERROR:
            self.drops["type"] += 1
            return
        replay = self._replay
        d = replay.highest - pn
        if d >= 0:
            if d >= replay.size or replay.slots[pn & replay.mask] == pn:
                self.drops["replay"] += 1
                return
        elif pn > replay.highest + _MAX_AHEAD or pn > codec.MAX_PN:
            self.drops["ahead"] += 1
            return
        opener = self._opener
        try:
            body = opener.aead.decrypt(NONCE.pack(opener.iv_hi, opener.iv_lo ^ pn),
                                       data[HEADER_SIZE:], data[:HEADER_SIZE])
        except InvalidTag:
            self.drops["auth"] += 1
            return
        if self._closed is not None:
            self.drops["closed"] += 1
            return
        replay.slots[pn & replay.mask] = pn  # replay.mark(pn), inlined
        if d < 0:
            replay.highest = pn
            if self.peer != addr:
                self._new_address(addr, n, now)
        self._last_heard = now
        self._authenticated += 1
        if rx_time is not None and rx_time < now:
            self._owd_time = max(rx_time, now - self.config.host_lag_allowance)
        else:
            self._owd_time = now
        if self._silent:
            self._silent = False
            self._events.append(PathResumed(now - self._silent_since))
        if type_ != DATA:
            try:
                self._on_control(type_, body, pn, now, addr)
            except ProtocolError:
                self.drops["malformed"] += 1
            return
        if self.policer is not None and not self.policer.admit(n, now):
            self.drops["policed"] += 1  # over the receiver's cap: not received, not acked
            return
        # DATA, inlined: one piece filling the body is the common case.
        end = len(body)
        if end < DATA_FIRST.size:
            self.drops["malformed"] += 1
            return
        ts, fdelta, file, block, offset, length = DATA_FIRST.unpack_from(body, 0)
        if length and DATA_FIRST.size + length == end:
            self._received.append((file, block, offset, memoryview(body)[DATA_FIRST.size:]))
            self._rx_piece_bytes += length
        elif not self._more_pieces(body):
            self.drops["malformed"] += 1
            return
        # self._record(pn, n, now, ts, fdelta), inlined
        acks = self._acks
        stops = acks.stops
        if stops and pn == stops[-1] and pn >= acks.low:
            stops[-1] = pn + 1
            acks.largest = pn
            acks.largest_time = now
        else:
            acks.add(pn, now)
        if pn - fdelta > acks.low:
            acks.raise_low(pn - fdelta)
        now_us = int(self._owd_time * 1e6)
        ref = self._owd_ref
        if ref < 0:
            ref = self._owd_ref = (now_us - ts) & U32
        rel = ((now_us - ts - ref + _I32) & U32) - _I32  # signed, relative to the first
        if rel < self._owd_min:
            self._owd_min = rel
        if rel > self._owd_max:
            self._owd_max = rel
        self._owd_count += 1
        self._rx_bytes += n
        self._rx_packets += 1
        if not self._rx_pending:
            self._rx_first_pending = now
        self._rx_pending += 1

    def _more_pieces(self, body: bytes) -> bool:
        """Parse a DATA body of several pieces (or with padding, or hole pieces on a
        version 2 connection); False when malformed (nothing of it is taken)."""
        end = len(body)
        pos = DATA_PREFIX.size
        view = memoryview(body)
        pieces = self._received
        first = len(pieces)
        holes = self._holes
        first_hole = len(holes)
        got = 0
        while pos + _PH <= end:
            file, block, offset, length = PIECE_HEADER.unpack_from(body, pos)
            pos += _PH
            if length == 0 and self.version >= VERSION_HOLES and pos + 4 <= end:
                (hole,) = HOLE_LENGTH.unpack_from(body, pos)
                pos += 4
                if hole and offset + hole <= U32 + 1:
                    holes.append((file, block, offset, hole))
                    continue
                length = 0  # an empty hole, or one past 2**32: malformed
            if length == 0 or pos + length > end:
                del pieces[first:]
                del holes[first_hole:]
                return False
            pieces.append((file, block, offset, view[pos:pos + length]))
            pos += length
            got += length
        if pos < end and any(view[pos:end]):
            del pieces[first:]
            del holes[first_hole:]
            return False
        self._rx_piece_bytes += got
        self._rx_holes += len(holes) - first_hole
        return True

    def _record(self, pn: int, n: int, now: float, ts: int, fdelta: int) -> None:
        """Ack tracking, floor, one-way delay and feedback scheduling for DATA/KEEPALIVE."""
        acks = self._acks
        stops = acks.stops
        if stops and pn == stops[-1] and pn >= acks.low:
            stops[-1] = pn + 1
            acks.largest = pn
            acks.largest_time = now
        else:
            acks.add(pn, now)
        floor = pn - fdelta
        if floor > acks.low:
            acks.raise_low(floor)
        now_us = int(self._owd_time * 1e6)
        ref = self._owd_ref
        if ref < 0:
            ref = self._owd_ref = (now_us - ts) & U32
        rel = ((now_us - ts - ref + _I32) & U32) - _I32
        if rel < self._owd_min:
            self._owd_min = rel
        if rel > self._owd_max:
            self._owd_max = rel
        self._owd_count += 1
        self._rx_bytes += n
        self._rx_packets += 1
        if not self._rx_pending:
            self._rx_first_pending = now
        self._rx_pending += 1

    def _new_address(self, addr: Address, size: int, now: float) -> None:
        """The newest authenticated datagram came from ``addr``, not from the peer.

        First contact: adopt it. Otherwise (NAT rebinding, or an on-path attacker
        racing a copy of a genuine datagram from a spoofed source) keep sending to the
        old address and validate the new one first, as QUIC does (RFC 9000 section
        8.2): a PROBE there, at most 3x the triggering datagram's size (no
        amplification); only the PROBE_ACK it elicits, from that address, moves the peer.
        """
        if self.peer is None:
            self.peer = addr
            return
        retry = max(2 * self.recovery.rtt.smoothed, 0.01)  # a PROBE or its answer got lost
        if any(a == addr and now - t < retry for a, t in self._validating.values()):
            return
        token = int.from_bytes(os.urandom(8), "big")
        if len(self._validating) >= 4:  # bounded: forget the oldest attempt
            del self._validating[next(iter(self._validating))]
        self._validating[token] = (addr, now)
        pad = min(self.size, max(3 * size, codec.HEADER_SIZE + codec.TAG_SIZE + 16))
        self._control.append((codec.PROBE, codec.encode_probe(token, int(now * 1e6), pad),
                              addr))

    def _on_control(self, type_: int, body: bytes, pn: int, now: float,
                    addr: Address) -> None:
        if type_ == FEEDBACK:
            self._on_feedback(codec.parse_feedback(body), now)
        elif type_ == KEEPALIVE:
            ka = codec.parse_keepalive(body)
            self._record(pn, HEADER_SIZE + len(body) + TAG_SIZE, now, ka.ts_us, ka.floor_delta)
            self._rx_packets -= 1  # not a DATA datagram: keep receive-rate counters honest
            self._rx_bytes -= HEADER_SIZE + len(body) + TAG_SIZE
            self._feedback_now = True
        elif type_ == codec.PROBE:
            probe = codec.parse_probe(body)  # answered where it came from
            self._control.append((codec.PROBE_ACK, codec.encode_probe_ack(
                probe.token, probe.send_time_us, probe.size), addr))
        elif type_ == codec.PROBE_ACK:
            ack = codec.parse_probe_ack(body)
            if ack.token == self._pmtu_token:  # our path MTU probe crossed: raise the size
                self._pmtu_token = -1
                self._pmtu_next = None
                if ack.probe_size >= self.config.datagram_size > self.size:
                    previous = self.size
                    self._size_buffers(self.config.datagram_size)
                    self._events.append(MtuRaised(self.size, previous))
                return
            if ack.token in self._validating:  # ours, for path validation
                if addr == self._validating[ack.token][0]:
                    self.peer = addr
                    self._validating.clear()
                return
            self._events.append(ProbeAnswered(ack.token, max(0.0, now - ack.echo_time_us / 1e6),
                                              ack.probe_size))
        else:  # CLOSE / ERROR
            close = codec.parse_close(body, error=type_ == codec.ERROR)
            self._finish(close.code, close.reason, close.error, by_peer=True)

    # == statistics =======================================================================
    def stats(self) -> Stats:
        rec = self.recovery
        resolved = rec.acked_packets + rec.lost_packets
        return Stats(
            rtt_ms=rec.rtt.smoothed * 1e3,
            min_rtt_ms=rec.rtt.min_rtt * 1e3 if rec.rtt.samples else 0.0,
            queue_delay_ms=self._queue_delay * 1e3,
            loss_pct=100.0 * rec.lost_packets / resolved if resolved else 0.0,
            rate=self.controller.rate * 8, delivery_rate=self._delivery_rate * 8,
            sent_bytes=self.sent_bytes, sent_packets=self.sent_packets,
            sent_piece_bytes=self.sent_piece_bytes,
            retransmitted_bytes=self.retransmitted_bytes, lost_bytes=rec.lost_bytes,
            spurious_losses=rec.spurious_packets, received_bytes=self._rx_bytes,
            received_packets=self._rx_packets, received_piece_bytes=self._rx_piece_bytes,
            bytes_in_flight=rec.bytes_in_flight, queued_bytes=self._queued,
            controller=type(self.controller).__name__, controller_state=self.controller.state,
            packet_threshold=rec.packet_threshold, time_threshold=rec.time_threshold,
            drops=dict(self.drops), datagram_size=self.size,
            sent_hole_pieces=self.sent_hole_pieces,
            sent_hole_bytes=self.sent_hole_bytes, received_hole_pieces=self._rx_holes)
