"""The sending half of ``UdpConnection``: piece queue, sealing DATA in GSO batches,
pacing, the in-flight window, and the rate controller fed from FEEDBACK.

``SendHalf`` holds what both halves share (configuration, keys, control queue, events,
close state) and everything about sending; ``connection.UdpConnection`` adds receiving
and the owner API. Split only to keep modules small; neither is used alone.
"""

from __future__ import annotations

from collections import deque

from transport.udp import codec
from transport.udp.codec import (
    DATA,
    DATA_FIRST,
    DATA_PREFIX,
    FEEDBACK,
    HEADER,
    HEADER_SIZE,
    HOLE_PIECE,
    KEEPALIVE,
    MAGIC,
    PIECE_HEADER,
    TAG_SIZE,
    U32,
    VERSION_HOLES,
)
from transport.udp.crypto import NONCE, Sealer
from transport.udp.events import (
    CLOSE_PN_EXHAUSTED,
    Address,
    Closed,
    Event,
    PieceRef,
    SendReady,
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

_PH = PIECE_HEADER.size
_HH = HOLE_PIECE.size         # 18: a hole piece, never split
_GLUE = 64                    # a piece this small is kept in one datagram with its hole
_PN_RESERVE = 1024            # numbers kept back for the CLOSE after exhaustion
_EMPTY = memoryview(b"")


class _Chunk:
    """Queued piece data: ``view[pos:]`` is still to send, at ``offset + pos``; or, when
    ``hole`` > 0, a hole piece of ``hole`` bytes at ``offset`` (``view`` empty)."""

    __slots__ = ("file", "block", "offset", "view", "pos", "hole")

    def __init__(self, file: int, block: int, offset: int, view: memoryview,
                 hole: int = 0) -> None:
        self.file = file
        self.block = block
        self.offset = offset
        self.view = view
        self.pos = 0
        self.hole = hole


class SendHalf:
    """Sending state and the batch builder (see the module docstring)."""

    def __init__(self, config: UdpConfig, connection_id: int, sealer: Sealer, now: float,
                 peer: Address | None) -> None:
        self.config = config
        self.connection_id = connection_id
        self.peer = peer
        self.size = config.initial_datagram_size or config.datagram_size
        self.version = config.version
        self._sealer = sealer
        self._events: deque[Event] = deque()
        self._closed: Closed | None = None
        self.sent_bytes = 0
        self.sent_packets = 0
        self.sent_piece_bytes = 0
        self.retransmitted_bytes = 0
        self.sent_hole_pieces = 0     # hole pieces sent (retransmissions included)
        self.sent_hole_bytes = 0      # bytes they stood for (not on the wire)
        self._pn = 0
        self._queue: deque[_Chunk] = deque()
        self._front = 0               # retransmission chunks at the head of ``_queue``
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
        self._last_len = 0
        self._size_buffers(self.size)
        # (type, body, address or None for the peer's): control datagrams go first
        self._control: deque[tuple[int, bytes, Address | None]] = deque()
        self._keepalive_due = peer is not None  # the first datagram tells our address
        self._last_eliciting = -1e9

    def _size_buffers(self, size: int) -> None:
        """Send ``size``-byte datagrams from now on: fresh batch buffers (a view handed
        out by ``build_batch`` keeps the old ones alive until the owner drops it), the
        pacer's minimum burst and the controller's segment size follow."""
        self.size = size
        self._segments = max(1, min(64, 65000 // size))  # one UDP GSO send
        self._out = bytearray(self._segments * size)
        self._out_mv = memoryview(self._out)
        self._scratch = bytearray(size)
        self._scratch_mv = memoryview(self._scratch)
        self._full_plain = self._scratch_mv[:size - HEADER_SIZE - TAG_SIZE]
        # Per segment of the batch buffer: (header view = AAD, sealed-body view).
        self._seg_views = [(self._out_mv[o:o + HEADER_SIZE],
                            self._out_mv[o + HEADER_SIZE:o + size])
                           for o in range(0, len(self._out), size)]
        self._pacer.min_burst = 4.0 * size
        self.controller.mss = size

    # -- hooks the connection provides -------------------------------------------------------
    def close(self, now: float, code: int = 0, reason: str = "", *, error: bool = False) -> None:
        raise NotImplementedError

    def _feedback_wanted(self) -> bool:
        raise NotImplementedError

    def _feedback_body(self, now: float) -> bytes | None:
        raise NotImplementedError

    # -- owner API: sending ------------------------------------------------------------------
    def send_budget(self) -> int:
        """Piece bytes ``queue_piece`` accepts now (0 when closed)."""
        return 0 if self._closed else max(0, self.config.max_queue_bytes - self._queued)

    def queue_piece(self, file: int, block: int, offset: int,
                    data: bytes | bytearray | memoryview, *, retransmission: bool = False,
                    reserved: bool = False) -> None:
        """Queue ``data`` (bytes at ``offset`` of ``(file, block)``) for sending.

        The core keeps a view of ``data`` until every byte is sent (then drops it), so
        the caller must not modify it meanwhile. A ``retransmission`` (bytes reported
        lost, which the owner holds anyway) goes ahead of queued new data, after earlier
        retransmissions, and is not held to ``send_budget()``. ``reserved``: the owner
        counted these bytes against ``send_budget()`` when it decided to read them (a
        read in flight), so they are not checked again: retransmissions queued
        meanwhile may have used the room, and the bytes are read already. ``ValueError`` when the
        queue is not empty and new ``data`` exceeds ``send_budget()``, when fields exceed
        u32 or the piece would cross offset 2**32; ``ConnectionError`` when closed.
        """
        if self._closed:
            raise ConnectionError("UDP connection closed")
        n = len(data)
        if n == 0:
            return
        if self._queued and n > self.send_budget() and not (retransmission or reserved):
            raise ValueError(f"piece of {n} bytes exceeds the send budget {self.send_budget()}")
        if not (0 <= file <= U32 and 0 <= block <= U32 and 0 <= offset and offset + n <= U32 + 1):
            raise ValueError("file, block and offset + length must fit in 32 bits")
        chunk = _Chunk(file, block, offset, memoryview(data).cast("B"))
        if retransmission:
            # Resends go ahead of new data (after earlier resends, in their order): behind
            # a full queue (16 MiB, 1.3 s at 100 Mbit/s) every block with a loss stayed
            # half-assembled that long, and at 2 % loss most blocks have one.
            self._queue.insert(self._front, chunk)
            self._front += 1
            self.retransmitted_bytes += n
        else:
            self._queue.append(chunk)
        self._queued += n
        if self._queued > self.config.max_queue_bytes // 2:
            self._ready_signalled = False

    def queue_hole(self, file: int, block: int, offset: int, length: int, *,
                   retransmission: bool = False) -> None:
        """Queue a hole piece (datagram format version 2): ``length`` bytes at ``offset``
        of ``(file, block)`` that read as zeros. It goes as an 18-byte piece header with
        no payload, so it costs the send budget nothing and the pacer only its wire
        bytes; it is acknowledged or reported lost like any piece (``PieceRef`` with
        ``length``), and a small piece queued just before it for the same block (its
        digest) goes in the same datagram. ``ValueError`` on a version 1 connection, for
        ``length`` < 1 or a range past 2**32; ``ConnectionError`` when closed."""
        if self._closed:
            raise ConnectionError("UDP connection closed")
        if self.version < VERSION_HOLES:
            raise ValueError("hole pieces need datagram format version 2")
        if not (0 <= file <= U32 and 0 <= block <= U32 and 0 <= offset
                and 0 < length and offset + length <= U32 + 1):
            raise ValueError("file, block and offset + length must fit in 32 bits")
        chunk = _Chunk(file, block, offset, _EMPTY, length)
        if retransmission:
            self._queue.insert(self._front, chunk)
            self._front += 1
        else:
            self._queue.append(chunk)

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
            type_, body, to = self._control.popleft()
            if type_ in (codec.CLOSE, codec.ERROR):
                self._control.clear()
            view = self._single(type_, body, now)  # a path MTU probe may exceed self.size
            return view, len(view), 1, to or peer
        if self._closed:
            return None
        if self._feedback_wanted():
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
        n = HEADER_SIZE + len(body) + TAG_SIZE
        # A path MTU probe may be larger than the batch buffer: a buffer of its own.
        out = self._out_mv if n <= len(self._out) else memoryview(bytearray(n))
        HEADER.pack_into(out, 0, MAGIC, self.version, type_, 0, self.connection_id, pn)
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
        version = self.version
        ts = int(now * 1e6) & U32
        floor = rec.floor(self._pn)
        if self._pn + n - floor > U32:  # a packet unresolved for 2**32 packets: say less
            floor = self._pn + n - U32
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
            pack_header(buf, off, MAGIC, version, DATA, 0, cid, pn)
            aad, sealed = seg_views[count]
            if left >= piece_room:  # the common case: one piece fills the datagram
                offset = c.offset + pos
                pack_first(scratch, 0, ts, pn - floor, c.file, c.block, offset, piece_room)
                scratch[data_start:body_room] = view[pos:pos + piece_room]
                encrypt_into(nonce(iv_hi, iv_lo ^ pn), full_plain, aad, sealed)
                sent[pn] = (now, size, ((c.file, c.block, offset, piece_room),))
                piece_bytes += piece_room
                if left == piece_room:
                    queue.popleft()
                    if self._front:
                        self._front -= 1
                else:
                    c.pos = pos + piece_room
            else:
                DATA_PREFIX.pack_into(scratch, 0, ts, pn - floor)
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
        small ones, or the tail of one; hole pieces whole); zero-pad a remainder shorter
        than a piece header so full datagrams keep one size (GSO), and end the datagram
        short instead when a longer remainder would read as a (zero) piece header.
        ``(body length, piece bytes, refs)``."""
        scratch, queue = self._scratch, self._queue
        p = DATA_PREFIX.size
        got = 0
        refs: list[PieceRef] = []
        while queue and body_room - p > _PH:
            c = queue[0]
            if c.hole:
                if body_room - p < _HH:
                    break
                ref = (c.file, c.block, c.offset, c.hole)
                HOLE_PIECE.pack_into(scratch, p, c.file, c.block, c.offset, 0, c.hole)
                p += _HH
                refs.append(ref)
                self.sent_hole_pieces += 1
                self.sent_hole_bytes += c.hole
                queue.popleft()
                if self._front:
                    self._front -= 1
                continue
            view, pos = c.view, c.pos
            left = len(view) - pos
            if left <= _GLUE and len(queue) > 1 and body_room - p < _PH + left + _HH:
                nxt = queue[1]
                if nxt.hole and nxt.file == c.file and nxt.block == c.block and p > DATA_PREFIX.size:
                    break  # the digest and its hole go together, in the next datagram
            take = min(body_room - p - _PH, left)
            ref = (c.file, c.block, c.offset + pos, take)
            PIECE_HEADER.pack_into(scratch, p, *ref)
            p += _PH
            scratch[p:p + take] = view[pos:pos + take]
            p += take
            got += take
            refs.append(ref)
            if pos + take == len(view):
                queue.popleft()
                if self._front:
                    self._front -= 1
            else:
                c.pos = pos + take
        if queue and body_room - p < _PH:
            scratch[p:body_room] = bytes(body_room - p)
            p = body_room
        return p, got, tuple(refs)

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

