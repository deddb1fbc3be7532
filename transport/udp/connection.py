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

from collections import deque

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
    KEEPALIVE,
    MAGIC,
    PIECE_HEADER,
    TAG_SIZE,
    U32,
    VERSION,
)
from transport.udp.crypto import NONCE, Opener, PathKeys, ReplayWindow, Sealer
from transport.udp.events import (
    CLOSE_PN_EXHAUSTED,
    Address,
    Closed,
    Event,
    PathResumed,
    PathSilent,
    PieceRef,
    PiecesAcked,
    PiecesLost,
    PiecesReceived,
    ProbeAnswered,
    ReceivedPiece,
    SendReady,
    Stats,
    UdpConfig,
)
from transport.udp.rate import (
    DelayTracker,
    DeliveryTracker,
    Pacer,
    RateSample,
    controller_for,
)
from transport.udp.recovery import Recovery

_MAX_AHEAD = 1 << 24          # a packet number this far past the highest seen is forged
_DROP_KINDS = ("short", "magic", "cid", "type", "replay", "ahead", "auth", "malformed",
               "closed")
_PH = PIECE_HEADER.size
_I32 = 1 << 31
_PN_RESERVE = 1024            # numbers kept back for the CLOSE after exhaustion


class _Chunk:
    """Queued piece data: ``view[pos:]`` is still to send, at ``offset + pos``."""

    __slots__ = ("file", "block", "offset", "view", "pos")

    def __init__(self, file: int, block: int, offset: int, view: memoryview) -> None:
        self.file = file
        self.block = block
        self.offset = offset
        self.view = view
        self.pos = 0


class UdpConnection:
    """One UDP path between two ends sharing ``keys`` and ``connection_id``.

    ``peer`` is the peer's address when known (the client); the daemon's end learns it
    from the first authenticated datagram, and follows a NAT rebinding when a datagram
    with a new highest packet number comes from another address.
    """

    def __init__(self, config: UdpConfig, connection_id: int, keys: PathKeys, now: float,
                 peer: Address | None = None) -> None:
        self.config = config
        self.connection_id = connection_id
        self.peer = peer
        self.size = config.datagram_size
        self._sealer = Sealer(keys.send)
        self._opener = Opener(keys.receive)
        self._replay = ReplayWindow(config.replay_window)
        # send half
        self._pn = 0
        self._queue: deque[_Chunk] = deque()
        self._queued = 0
        self._ready_signalled = True
        self.recovery = Recovery(config.max_ack_delay)
        self.controller = controller_for(config.rate, self.size)
        self._pacer = Pacer(self.size, config.burst_time)
        self._delay = DelayTracker()
        self._delivery = DeliveryTracker()
        self._queue_delay = 0.0
        self._delivery_rate = 0.0
        self._app_limited = False
        self._loss_hist: deque[tuple[float, int, int]] = deque()
        self._last_sample = now
        self._last_lost = 0
        self._last_acked = 0
        self._segments = max(1, min(64, 65000 // self.size))  # one UDP GSO send
        self._out = bytearray(self._segments * self.size)
        self._out_mv = memoryview(self._out)
        self._last_len = 0
        self._scratch = bytearray(self.size)
        self._scratch_mv = memoryview(self._scratch)
        body_room = self.size - HEADER_SIZE - TAG_SIZE
        self._full_plain = self._scratch_mv[:body_room]
        # Per segment of the batch buffer: (header view = AAD, sealed-body view).
        self._seg_views = [(self._out_mv[o:o + HEADER_SIZE],
                            self._out_mv[o + HEADER_SIZE:o + self.size])
                           for o in range(0, len(self._out), self.size)]
        self._control: deque[tuple[int, bytes]] = deque()  # (type, body) to send first
        self._keepalive_due = False
        self._last_eliciting = -1e9
        # receive half
        self._acks = AckTracker(config.max_tracked_ranges)
        self._received: list[ReceivedPiece] = []
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
        # both
        self._events: deque[Event] = deque()
        self._created = now
        self._last_heard = now
        self._silent = False
        self._silent_since = now
        self._closed: Closed | None = None
        self.drops = dict.fromkeys(_DROP_KINDS, 0)
        self.sent_bytes = 0
        self.sent_packets = 0
        self.sent_piece_bytes = 0
        self.retransmitted_bytes = 0

    # == owner API: sending ===============================================================
    @property
    def closed(self) -> bool:
        return self._closed is not None

    def send_budget(self) -> int:
        """Piece bytes ``queue_piece`` accepts now (0 when closed)."""
        return 0 if self._closed else max(0, self.config.max_queue_bytes - self._queued)

    def queue_piece(self, file: int, block: int, offset: int,
                    data: bytes | bytearray | memoryview, *, retransmission: bool = False
                    ) -> None:
        """Queue ``data`` (bytes at ``offset`` of ``(file, block)``) for sending.

        The core keeps a view of ``data`` until every byte is sent (then drops it), so
        the caller must not modify it meanwhile. ``ValueError`` when the queue is not
        empty and ``data`` exceeds ``send_budget()``, when fields exceed u32 or the
        piece would cross offset 2**32; ``ConnectionError`` when closed.
        """
        if self._closed:
            raise ConnectionError("UDP connection closed")
        n = len(data)
        if n == 0:
            return
        if self._queued and n > self.send_budget():
            raise ValueError(f"piece of {n} bytes exceeds the send budget {self.send_budget()}")
        if not (0 <= file <= U32 and 0 <= block <= U32 and 0 <= offset and offset + n <= U32 + 1):
            raise ValueError("file, block and offset + length must fit in 32 bits")
        self._queue.append(_Chunk(file, block, offset, memoryview(data).cast("B")))
        self._queued += n
        if retransmission:
            self.retransmitted_bytes += n
        if self._queued > self.config.max_queue_bytes // 2:
            self._ready_signalled = False

    def probe(self, now: float, token: int, pad_to: int | None = None) -> None:
        """Send a PROBE (answered by ``ProbeAnswered``); padded to ``pad_to`` bytes
        (default: the datagram size, so the answer proves full-size datagrams pass)."""
        body = codec.encode_probe(token, int(now * 1e6), self.size if pad_to is None else pad_to)
        self._control.append((codec.PROBE, body))

    def close(self, now: float, code: int = 0, reason: str = "", *, error: bool = False) -> None:
        """Close: send CLOSE (or ERROR), report unacknowledged and unsent pieces lost."""
        if self._closed:
            return
        self._control.clear()
        self._control.append((codec.ERROR if error else codec.CLOSE,
                              codec.encode_close(code, reason)))
        self._finish(code, reason, error, by_peer=False)

    def _finish(self, code: int, reason: str, error: bool, by_peer: bool) -> None:
        self.recovery.abandon()
        lost = self.recovery.lost
        for c in self._queue:
            lost.append((c.file, c.block, c.offset + c.pos, len(c.view) - c.pos))
        self._queue.clear()
        self._queued = 0
        self._closed = Closed(code, reason, error, by_peer)
        self._events.append(self._closed)

    # == owner API: events, timers ========================================================
    def next_event(self) -> Event | None:
        if self._received:
            pieces, self._received = self._received, []
            return PiecesReceived(pieces)
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
        if not self._silent and now >= self._last_heard + self.config.silent_after:
            self._silent = True
            self._silent_since = self._last_heard
            self.controller.on_silence()
            self._events.append(PathSilent(self._last_heard))

    # == sending ==========================================================================
    def _quantum(self) -> int:
        """Bytes worth one send: about 1 ms at the pacing rate, one datagram to one GSO
        batch (BBR's send quantum, Linux's TSO autosizing): batches amortise the
        per-call cost at high rates and stay small bursts at low ones."""
        size = self.size
        q = int(self.controller.rate * 0.001) // size * size
        return min(max(q, size), self._segments * size)

    def _cwnd_room(self) -> int:
        rtt = self.recovery.rtt
        window = 2.0 * self.controller.rate * (rtt.smoothed + self.config.max_ack_delay)
        return int(max(window, 16.0 * self.size)) - self.recovery.bytes_in_flight

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """Every datagram due now, one ``bytes`` each (aioquic's shape; copies)."""
        out: list[tuple[bytes, Address]] = []
        while (batch := self.build_batch(now)) is not None:
            view, seg, count, addr = batch
            for i in range(count):
                out.append((bytes(view[i * seg:(i + 1) * seg]), addr))
        return out

    def build_batch(self, now: float) -> tuple[memoryview, int, int, Address] | None:
        """The next datagrams due, contiguous in a reused buffer: ``(view, segment size,
        count, address)``; all but the last are ``segment size`` bytes. The view is valid
        until the next call. None when nothing is due (paced, window full, nothing queued
        or peer address unknown)."""
        peer = self.peer
        if peer is None:
            return None
        if self._control:
            type_, body = self._control.popleft()
            if type_ in (codec.CLOSE, codec.ERROR):
                self._control.clear()
            return self._single(type_, body, now), self.size, 1, peer
        if self._closed:
            return None
        if self._feedback_now or self._rx_pending >= self.config.ack_every:
            fb = self._feedback_body(now)
            if fb is not None:
                return self._single(FEEDBACK, fb, now), self.size, 1, peer
        if self._keepalive_due:
            self._keepalive_due = False
            floor = self.recovery.floor(self._pn)
            view = self._single(KEEPALIVE, codec.encode_keepalive(
                int(now * 1e6), min(self._pn - floor, U32)), now, eliciting=True)
            return view, self.size, 1, peer
        if not self._queue:
            return None
        count = self._build_data(now)
        if count == 0:
            return self.build_batch(now) if self._control else None  # e.g. the ERROR
        last = self._last_len
        return self._out_mv[:(count - 1) * self.size + last], self.size, count, peer

    def _single(self, type_: int, body: bytes, now: float, eliciting: bool = False
                ) -> memoryview:
        pn = self._pn
        self._pn = pn + 1
        out = self._out_mv
        HEADER.pack_into(self._out, 0, MAGIC, VERSION, type_, 0, self.connection_id, pn)
        n = HEADER_SIZE + len(body) + TAG_SIZE
        self._sealer.seal_into(pn, out[:HEADER_SIZE], body, out[HEADER_SIZE:n])
        self.sent_bytes += n
        self.sent_packets += 1
        if eliciting:
            self.recovery.on_sent(pn, now, n, None)
            self._last_eliciting = now
        return out[:n]

    def _build_data(self, now: float) -> int:
        """Seal up to one GSO batch of DATA datagrams into ``_out``; returns the count.

        The per-datagram path is inlined on purpose (struct ``pack_into`` on reused
        buffers, one copy of the piece bytes into the plaintext scratch, one
        ``encrypt_into`` straight into the send buffer, one dict store): method calls
        and temporary objects are what Python charges for.
        """
        size = self.size
        rate = self.controller.rate
        tokens = self._pacer.refill(now, rate)
        by_tokens = int((tokens + 1.0) // size)
        n = min(self._segments, by_tokens, self._cwnd_room() // size)
        if n <= 0:
            return 0
        if by_tokens * size < self._quantum() and self._queued >= self._segments * size:
            return 0  # paced: wait for a full send quantum while there is data for one
        if self._pn + n > codec.MAX_PN - _PN_RESERVE:
            self.close(now, CLOSE_PN_EXHAUSTED, "packet numbers exhausted", error=True)
            return 0
        buf, mv = self._out, self._out_mv
        scratch, smv = self._scratch, self._scratch_mv
        full_plain, seg_views = self._full_plain, self._seg_views
        queue = self._queue
        sealer = self._sealer
        encrypt_into, iv_hi, iv_lo = sealer.aead.encrypt_into, sealer.iv_hi, sealer.iv_lo
        nonce = NONCE.pack
        rec = self.recovery
        sent = rec.sent
        pack_header = HEADER.pack_into
        pack_first = DATA_FIRST.pack_into
        cid = self.connection_id
        ts = int(now * 1e6) & U32
        floor = rec.floor(self._pn)
        body_room = size - HEADER_SIZE - TAG_SIZE
        data_start = DATA_PREFIX.size + _PH
        piece_room = body_room - data_start
        pn = self._pn
        count = 0
        sent_bytes = 0
        piece_bytes = 0
        dlen = size
        off = 0
        while count < n and queue:
            c = queue[0]
            view, pos = c.view, c.pos
            left = len(view) - pos
            pack_header(buf, off, MAGIC, VERSION, DATA, 0, cid, pn)
            aad, sealed = seg_views[count]
            if left >= piece_room:  # the common case: one piece fills the datagram
                offset = c.offset + pos
                pack_first(scratch, 0, ts, min(pn - floor, U32), c.file, c.block, offset,
                           piece_room)
                scratch[data_start:body_room] = view[pos:pos + piece_room]
                encrypt_into(nonce(iv_hi, iv_lo ^ pn), full_plain, aad, sealed)
                sent[pn] = (now, size, ((c.file, c.block, offset, piece_room),))
                piece_bytes += piece_room
                if left == piece_room:
                    queue.popleft()
                else:
                    c.pos = pos + piece_room
            else:
                DATA_PREFIX.pack_into(scratch, 0, ts, min(pn - floor, U32))
                p, got, refs = self._pack_pieces(body_room)
                piece_bytes += got
                dlen = HEADER_SIZE + p + TAG_SIZE
                encrypt_into(nonce(iv_hi, iv_lo ^ pn), smv[:p], aad,
                             mv[off + HEADER_SIZE:off + dlen])
                sent[pn] = (now, dlen, refs)
            pn += 1
            count += 1
            sent_bytes += dlen
            off += size
            if dlen < size:
                break
        self._pn = pn
        self._last_len = dlen
        rec.bytes_in_flight += sent_bytes
        rec.last_eliciting_sent = now
        self._pacer.tokens -= sent_bytes
        self._queued -= piece_bytes
        self.sent_bytes += sent_bytes
        self.sent_packets += count
        self.sent_piece_bytes += piece_bytes
        self._last_eliciting = now
        if not queue:
            self._app_limited = True
        if not self._ready_signalled and self._queued <= self.config.max_queue_bytes // 2:
            self._ready_signalled = True
            self._events.append(SendReady(self.send_budget()))
        return count

    def _pack_pieces(self, body_room: int) -> tuple[int, int, tuple[PieceRef, ...]]:
        """Fill the scratch body after its prefix with pieces from the queue (several
        small ones, or the tail of one); zero-pad a remainder shorter than a piece
        header so full datagrams keep one size (GSO). ``(body length, piece bytes, refs)``."""
        scratch, queue = self._scratch, self._queue
        p = DATA_PREFIX.size
        got = 0
        refs: list[PieceRef] = []
        while queue and body_room - p > _PH:
            c = queue[0]
            view, pos = c.view, c.pos
            take = min(body_room - p - _PH, len(view) - pos)
            ref = (c.file, c.block, c.offset + pos, take)
            PIECE_HEADER.pack_into(scratch, p, *ref)
            p += _PH
            scratch[p:p + take] = view[pos:pos + take]
            p += take
            got += take
            refs.append(ref)
            if pos + take == len(view):
                queue.popleft()
            else:
                c.pos = pos + take
        if queue and p < body_room:
            scratch[p:body_room] = bytes(body_room - p)
            p = body_room
        return p, got, tuple(refs)

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
                         now: float) -> None:
        """Process one datagram. Never raises for its content: drops are counted.

        Checks before the AEAD, cheapest first: length, magic and version, connection
        id, type and flags, then the replay window and the packet number's distance
        ahead (RFC 4303's order: the window test costs a shift, the AEAD microseconds).
        """
        n = len(data)
        if n < HEADER_SIZE + TAG_SIZE:
            self.drops["short"] += 1
            return
        magic, version, type_, flags, cid, pn = HEADER.unpack_from(data, 0)
        if magic != MAGIC or version != VERSION:
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
            if self.peer != addr:  # first contact, or NAT rebinding (new highest only)
                self.peer = addr
        self._last_heard = now
        if self._silent:
            self._silent = False
            self._events.append(PathResumed(now - self._silent_since))
        if type_ != DATA:
            try:
                self._on_control(type_, body, pn, now)
            except ProtocolError:
                self.drops["malformed"] += 1
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
        now_us = int(now * 1e6)
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
        """Parse a DATA body of several pieces (or with padding); False when malformed."""
        end = len(body)
        pos = DATA_PREFIX.size
        view = memoryview(body)
        pieces = self._received
        first = len(pieces)
        got = 0
        while pos + _PH <= end:
            file, block, offset, length = PIECE_HEADER.unpack_from(body, pos)
            pos += _PH
            if length == 0 or pos + length > end:
                del pieces[first:]
                return False
            pieces.append((file, block, offset, view[pos:pos + length]))
            pos += length
            got += length
        if pos < end and any(view[pos:end]):
            del pieces[first:]
            return False
        self._rx_piece_bytes += got
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
        now_us = int(now * 1e6)
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

    def _on_control(self, type_: int, body: bytes, pn: int, now: float) -> None:
        if type_ == FEEDBACK:
            self._on_feedback(codec.parse_feedback(body), now)
        elif type_ == KEEPALIVE:
            ka = codec.parse_keepalive(body)
            self._record(pn, HEADER_SIZE + len(body) + TAG_SIZE, now, ka.ts_us, ka.floor_delta)
            self._rx_packets -= 1  # not a DATA datagram: keep receive-rate counters honest
            self._rx_bytes -= HEADER_SIZE + len(body) + TAG_SIZE
            self._feedback_now = True
        elif type_ == codec.PROBE:
            probe = codec.parse_probe(body)
            self._control.append((codec.PROBE_ACK, codec.encode_probe_ack(
                probe.token, probe.send_time_us, probe.size)))
        elif type_ == codec.PROBE_ACK:
            ack = codec.parse_probe_ack(body)
            self._events.append(ProbeAnswered(ack.token, max(0.0, now - ack.echo_time_us / 1e6),
                                              ack.probe_size))
        else:  # CLOSE / ERROR
            close = codec.parse_close(body, error=type_ == codec.ERROR)
            self._finish(close.code, close.reason, close.error, by_peer=True)

    def _on_feedback(self, fb: codec.Feedback, now: float) -> None:
        rec = self.recovery
        rec.on_feedback(now, fb.largest, fb.ack_delay_us / 1e6, fb.low, fb.ranges, self._pn)
        window = min(max(rec.rtt.smoothed, 0.02), 0.2)
        self._delivery_rate, dmax = self._delivery.update(now, fb.recv_time_us, fb.recv_bytes,
                                                          window)
        if fb.owd_count:
            self._queue_delay = self._delay.update(now, fb.owd_min_us)
        sample = RateSample(
            now=now, interval=max(0.0, now - self._last_sample), queue_delay=self._queue_delay,
            delivery_rate=self._delivery_rate, delivery_max=dmax, min_rtt=rec.rtt.min_rtt,
            srtt=rec.rtt.smoothed, acked_bytes=rec.acked_bytes - self._last_acked,
            lost_bytes=rec.lost_bytes - self._last_lost, loss_rate=self._loss_rate(now),
            app_limited=self._app_limited)
        self._last_sample = now
        self._last_acked = rec.acked_bytes
        self._last_lost = rec.lost_bytes
        self._app_limited = not self._queue
        self.controller.on_feedback(sample)

    def _loss_rate(self, now: float) -> float:
        """Fraction of packets lost among those resolved over the last ~8 RTTs (>= 0.5 s)."""
        rec = self.recovery
        hist = self._loss_hist
        hist.append((now, rec.acked_packets, rec.lost_packets))
        horizon = max(0.5, 8 * rec.rtt.smoothed)
        while len(hist) > 2 and now - hist[1][0] > horizon:
            hist.popleft()
        _, a0, l0 = hist[0]
        lost = rec.lost_packets - l0
        total = lost + rec.acked_packets - a0
        return lost / total if total > 0 else 0.0

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
            drops=dict(self.drops))
