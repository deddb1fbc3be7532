"""Blocks over one UDP connection: the glue between ``transport.udp`` and ``transport.blocks``.

A ``UdpPump`` drives one ``UdpConnection`` (on a ``UdpEndpoint``) for one session, on
either end:

* **sending** (the client's upload, the daemon's download): it leases whole blocks
  from the session's ``BlockSender`` under its own path id (the same scheduler the
  HTTP streams lease from), reads them off the event loop, queues the block's digest
  (a piece at ``DIGEST_OFFSET``) and its bytes into the connection, and marks the
  lease delivered. A block lying wholly in a hole of its file (the sender's
  ``read`` gives a ``Hole``, as for an HTTP stream: ``SEEK_DATA``, never for a source
  being encrypted) goes as a hole piece with no payload on a connection of datagram
  format version 2, and as zeros on a version 1 one. The core reports every piece once: acknowledged
  (``PiecesAcked``: the scheduler's piece-level ``received``, and the held bytes are
  freed once the whole lease is acknowledged) or lost (``PiecesLost``: queued again,
  first, from the bytes held). Nothing is read twice for a retransmission.
* **receiving** (the daemon's upload, the client's download): received pieces go,
  in batches, into the session's one ``BlockSink`` (the same assembly and journal
  as HTTP frames), in worker threads (``BlockSink.pieces``). The inbox is bounded:
  past ``INBOX_HIGH`` bytes the endpoint stops reading the socket (the kernel
  buffer fills, the sender's one-way delay grows and its delay-based controller
  slows down) until it drains below ``INBOX_LOW``. Hole pieces go to the sink as
  ``Hole``s (its assembler's ``receive_hole``: the range stays a hole), after the data
  pieces of the same datagram (the block's digest travels with its hole).

An authenticated peer's piece the sink refuses (unknown file, outside its block, a
block failing its digest again and again) ends the path with that error (``error``);
nothing of it reaches a file. Time for the core is ``time.perf_counter()``
(the endpoint's clock), never the loop's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from fallback.control import Flow
from fallback.udpcontrol import DIGEST_OFFSET, DIGEST_SIZE
from transport.blocks.scheduler import Lease, PathTiming
from transport.blocks.sender import BlockSender
from transport.blocks.sink import BlockSink
from transport.blocks.sparse import Hole
from transport.errors import (
    ConnectionLost,
    ErrorKind,
    ProtocolError,
    TransportError,
    from_os_error,
)
from transport.udp.aio import UdpEndpoint
from transport.udp.codec import VERSION_HOLES
from transport.udp.connection import UdpConnection
from transport.udp.events import (
    CLOSE_ABORTED,
    CLOSE_FAILED,
    Closed,
    Event,
    MtuRaised,
    PathResumed,
    PathSilent,
    PiecesAcked,
    PiecesLost,
    PiecesReceived,
    ProbeAnswered,
    SendReady,
    UdpConfig,
)
from transport.udp.rate import RateConfig

log = logging.getLogger("fallback.udp")

UDP_TIMING = PathTiming(lease_timeout=30.0, ack_timeout=30.0)
"""Deadlines of a UDP path's leases (seconds): a lease is queued at once, and a block
delivered waits for its journal acknowledgement (the control channel's ``acks``,
every 0.5 s); the core's own retransmission handles loss well within that."""
INBOX_HIGH = 48 << 20
INBOX_LOW = 16 << 20
READ_AHEAD = 2
"""Block reads in flight per path."""
MAX_DIGEST_PARTS = 4096
"""Digests a receiving pump keeps half-received (64 bytes each)."""
TICK = 0.02
"""Seconds between a sending pump's checks for new work (wants, blocks given back)."""

MAX_QUEUE = 16 << 20


def rate_config(flow: Flow) -> RateConfig:
    """The core's rate options for a session's flow (bits/s; 0: no cap, no floor).
    ``fixed`` without a target rate cannot run at a fixed rate: it runs ``fair``."""
    policy = flow.policy if flow.policy != "fixed" or flow.target_rate else "fair"
    target = float(flow.target_rate) if flow.target_rate else None
    floor = float(min(flow.min_rate, flow.target_rate) if flow.target_rate else flow.min_rate)
    initial = min(10e6, target) if target else 10e6
    return RateConfig(policy=policy, target_rate=target, min_rate=floor,
                      initial_rate=max(initial, floor, 1.0))


def udp_config(size: int, flow: Flow, block: int, *, police: bool = False,
               base: int | None = None, version: int = 1) -> UdpConfig:
    """Per-connection options: the datagram size agreed, the flow, a send queue that holds
    a few whole blocks (``UdpPump`` queues a lease whole). ``police``: this end receives
    the data (the daemon's end of an upload) and holds the peer to the flow's target rate
    whatever it sends (``UdpConfig.receive_cap``: 10 % over the cap is dropped).
    ``base``: send datagrams of this size until a PROBE of ``size`` bytes is answered
    (``UdpConfig.initial_datagram_size``, path MTU discovery). ``version``: the datagram
    format agreed (2: hole pieces)."""
    cap = float(flow.target_rate) if police and flow.target_rate else None
    return UdpConfig(datagram_size=size, initial_datagram_size=base, rate=rate_config(flow),
                     max_queue_bytes=max(MAX_QUEUE, 3 * block + (1 << 20)), receive_cap=cap,
                     version=version)


Piece = tuple[int, int, int, "bytes | memoryview | Hole", "bytes | None"]
"""``(file, block, offset, data, digest)`` for the sink; ``data`` a ``Hole`` for a hole
piece, empty when only the digest came."""


def coalesce(batch: list[Piece]) -> list[Piece]:
    """Join runs of contiguous pieces of one block into one piece each (in order).

    A datagram carries about 1.4 KB: taking each alone costs the assembler and a
    ``pwrite`` per datagram; a batch's consecutive pieces of one block are almost always
    contiguous, so one copy of the run saves hundreds of Python calls and system calls.
    """
    out: list[Piece] = []
    run: list[bytes | memoryview] = []
    key: tuple[int, int] | None = None
    start = end = 0

    def flush() -> None:
        if key is not None and run:
            out.append((key[0], key[1], start, run[0] if len(run) == 1 else b"".join(run), None))

    for piece in batch:
        f, b, off, data, digest = piece
        if isinstance(data, Hole) or digest is not None:  # a hole or a digest: alone
            flush()
            run = []
            key = None
            out.append(piece)
            continue
        if key == (f, b) and off == end:
            run.append(data)
            end += len(data)
            continue
        flush()
        key, start, end = (f, b), off, off + len(data)
        run = [data]
    flush()
    return out


@dataclass(slots=True)
class _Held:
    lease: Lease
    data: bytes | bytearray | memoryview | Hole
    digest: bytes | None
    outstanding: int


class UdpPump:
    """One session's blocks over one connection (see the module docstring)."""

    def __init__(self, conn: UdpConnection, endpoint: UdpEndpoint, path: str, *,
                 sender: BlockSender | None = None, sink: BlockSink | None = None,
                 on_bytes: Callable[[int], None] | None = None,
                 on_fail: Callable[[TransportError], None] | None = None,
                 leasing: bool = True) -> None:
        self.conn = conn
        self.leasing = leasing  # False: lease nothing yet (a path still being probed)
        self.endpoint = endpoint
        self.path = path
        self.sender = sender
        self.sink = sink
        self.on_bytes = on_bytes
        self.on_fail = on_fail  # called once, with the error that ended the path
        self.error: TransportError | None = None
        self.closed: Closed | None = None
        self.changed = asyncio.Event()
        self.moved = 0       # bytes of pieces sent and acknowledged, or received and taken
        self.blocks = 0      # leases fully acknowledged, or batches taken
        self.last_activity = time.monotonic()
        self._held: dict[tuple[int, int], list[_Held]] = {}
        self._retx: deque[tuple[int, int, int, int]] = deque()
        self._reading = 0
        self._reserved = 0
        self._reads: set[asyncio.Task[None]] = set()
        self._inbox: list[Piece] = []
        self._inbox_bytes = 0
        self._paused = False
        self._drain: asyncio.Task[None] | None = None
        self._probes: dict[int, asyncio.Future[float]] = {}
        self._digest_parts: dict[tuple[int, int], tuple[bytearray, bytearray]] = {}
        self._room = 0
        self._ticker: asyncio.Task[None] | None = None
        if sender is not None:
            sender.sched.set_path(path, UDP_TIMING)
            self._room = max((s.layout.max_stored_block for s in sender.sources.values()),
                             default=1)
        endpoint.add(conn, self.handle)

    # -- state ----------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        """Nothing held, read, queued for resend or waiting to be taken."""
        return not (self._held or self._reading or self._retx or self._inbox
                    or self._drain is not None)

    def _touch(self) -> None:
        self.last_activity = time.monotonic()
        self.changed.set()

    def start_ticker(self) -> None:
        """Look for work every ``TICK`` seconds (a sending pump: new wants, blocks another
        path gave back, the peer's address learnt) until the connection closes."""
        if self._ticker is None and self.sender is not None:
            self._ticker = asyncio.ensure_future(self._tick())

    async def _tick(self) -> None:
        sender = self.sender
        assert sender is not None
        shown = time.monotonic()
        while not self.conn.closed and not sender.closed:
            self.fill()
            await asyncio.sleep(TICK)
            if log.isEnabledFor(logging.DEBUG) and time.monotonic() - shown >= 1.0:
                shown = time.monotonic()  # the sender's controller, once a second (-v)
                st = self.conn.stats()
                log.debug("%s: rate %.1f Mbit/s (%s), delivered %.1f, queue %.2f ms, rtt "
                          "%.1f/%.1f ms, lost %.2f %%, in flight %d B, queued %d B, acked %d B",
                          self.path, st.rate / 1e6, st.controller_state,
                          st.delivery_rate / 1e6, st.queue_delay_ms, st.min_rtt_ms, st.rtt_ms,
                          st.loss_pct, st.bytes_in_flight, st.queued_bytes, self.moved)

    # -- events from the endpoint --------------------------------------------------------
    def handle(self, conn: UdpConnection, ev: Event) -> None:
        """The endpoint's handler: runs on the event loop, inside its dispatch."""
        if isinstance(ev, PiecesReceived):
            self._received(ev)
        elif isinstance(ev, PiecesAcked):
            self._acked(ev)
        elif isinstance(ev, PiecesLost):
            self._retx.extend(ev.pieces)
            self.fill()
        elif isinstance(ev, SendReady):
            self.fill()
        elif isinstance(ev, ProbeAnswered):
            fut = self._probes.pop(ev.token, None)
            if fut is not None and not fut.done():
                fut.set_result(ev.rtt)
        elif isinstance(ev, MtuRaised):
            log.info("UDP path %s: the peer answered a %d-byte probe: datagrams of %d bytes "
                     "from now on (were %d)", self.path, ev.size, ev.size, ev.previous)
        elif isinstance(ev, Closed):
            self._on_closed(ev)
        elif isinstance(ev, PathSilent | PathResumed):
            self.changed.set()

    def _on_closed(self, ev: Closed) -> None:
        self.closed = ev
        if ev.by_peer and ev.error and self.error is None:
            # the peer failed for good (CLOSE_FAILED): its own error, not a lost path
            self.error = TransportError(ev.reason) if ev.code == CLOSE_FAILED else \
                ConnectionLost(f"UDP path closed by the peer: {ev.reason}")
        if self.sender is not None:
            self.sender.drop_path(self.path)
        self._held.clear()
        self._retx.clear()
        for fut in self._probes.values():
            if not fut.done():
                fut.cancel()
        self._probes.clear()
        self.changed.set()

    # -- sending --------------------------------------------------------------------------
    def _acked(self, ev: PiecesAcked) -> None:
        sender = self.sender
        if sender is None:
            return
        now = time.monotonic()
        for f, b, off, n in ev.pieces:
            held = self._held.get((f, b))
            if not held:
                continue
            for h in held:
                if off >= DIGEST_OFFSET:
                    if h.digest is not None:
                        h.outstanding -= n
                        break
                elif h.lease.offset <= off < h.lease.stop:
                    h.outstanding -= n
                    if not isinstance(h.data, Hole):
                        self.moved += n  # bytes moved: a hole piece's are not on the wire
                    try:
                        sender.sched.received(f, b, [(off, off + n)], now)
                    except ProtocolError:
                        pass  # our own piece: cannot be outside its block
                    break
            done = [h for h in held if h.outstanding <= 0]
            if done:
                self.blocks += len(done)
                rest = [h for h in held if h.outstanding > 0]
                if rest:
                    self._held[f, b] = rest
                else:
                    del self._held[f, b]
        self._touch()
        self.fill()

    def fill(self) -> None:
        """Queue resends first, then lease and read new blocks while the queue has room."""
        sender, conn = self.sender, self.conn
        if sender is None or conn.closed or conn.peer is None or not self.leasing:
            return  # the daemon's end leases nothing before the client was heard
        while self._retx:
            f, b, off, n = self._retx[0]
            held = self._held.get((f, b), [])
            data: bytes | bytearray | memoryview | Hole | None = None
            for h in held:
                if off >= DIGEST_OFFSET:  # the core may have split the digest's piece
                    if h.digest is not None:
                        data = h.digest[off - DIGEST_OFFSET:off - DIGEST_OFFSET + n]
                elif h.lease.offset <= off < h.lease.stop:
                    start = off - h.lease.offset
                    data = Hole(n) if isinstance(h.data, Hole) \
                        else memoryview(h.data)[start:start + n]
                if data is not None:
                    break
            if data is None:  # retired meanwhile (acknowledged by the journal)
                self._retx.popleft()
                continue
            # Not held to the send budget: the bytes are held here anyway, and the core
            # sends them ahead of the queued new blocks (a resend waiting behind 16 MiB
            # of queue kept its block half-assembled for 1.3 s at 100 Mbit/s).
            if isinstance(data, Hole):  # a lost hole piece: sent again as one
                conn.queue_hole(f, b, off, data.length, retransmission=True)
            else:
                conn.queue_piece(f, b, off, data, retransmission=True)
            self._retx.popleft()
        while self._reading < READ_AHEAD and not sender.closed \
                and conn.send_budget() - self._reserved >= self._room + DIGEST_SIZE:
            lease = sender.lease(self.path)
            if lease is None:
                break
            self._reading += 1
            self._reserved += lease.length + DIGEST_SIZE
            task = asyncio.ensure_future(self._read(lease))
            self._reads.add(task)
            task.add_done_callback(self._read_done)

    def _read_done(self, task: asyncio.Task[None]) -> None:
        """A read task that raised something unexpected fails the path at once (it was
        "Task exception was never retrieved" and a 10 s stall before the session gave up)."""
        self._reads.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("UDP path %s: sending a block failed: %r", self.path, exc)
            self._fail(TransportError(f"UDP sender failed: {exc}"))

    async def _read(self, lease: Lease) -> None:
        sender = self.sender
        assert sender is not None
        try:
            data, digest = await sender.read(lease)
        except TransportError as exc:
            self._fail(exc)
            return
        finally:
            self._reading -= 1
            self._reserved -= lease.length + DIGEST_SIZE
        if self.conn.closed:
            sender.drop_path(self.path)
            return
        hole = isinstance(data, Hole) and self.conn.version >= VERSION_HOLES
        if isinstance(data, Hole) and not hole:  # a version 1 peer: zeros on the wire
            data = bytes(data.length)
        out = len(data) + (len(digest) if digest is not None else 0)
        self._held.setdefault((lease.file, lease.block), []).append(
            _Held(lease, data, digest, out))
        # Reserved in ``fill`` when the read began: retransmissions queued since (not held
        # to the budget) may have used the room; queueing must not fail then. It raised
        # "piece of 32 bytes exceeds the send budget 0" in this task, unseen, and the
        # block was never sent: a 2 GiB download over 65,000-byte datagrams stalled
        # ("1 blocks still missing, no progress for 10 s") twice in three tries.
        if digest is not None:  # first: the core keeps it in one datagram with a hole
            self.conn.queue_piece(lease.file, lease.block, DIGEST_OFFSET, digest, reserved=True)
        if isinstance(data, Hole):
            self.conn.queue_hole(lease.file, lease.block, lease.offset, data.length)
        else:
            self.conn.queue_piece(lease.file, lease.block, lease.offset, data, reserved=True)
        sender.delivered(lease, hole=hole)
        self._touch()
        self.endpoint.wake()
        self.fill()

    # -- receiving ------------------------------------------------------------------------
    def _received(self, ev: PiecesReceived) -> None:
        if self.sink is None or self.error is not None:
            return
        inbox = self._inbox
        for f, b, off, data in ev.pieces:
            if off >= DIGEST_OFFSET:
                digest = self._digest_part(f, b, off - DIGEST_OFFSET, data)
                if digest is not None:
                    inbox.append((f, b, 0, b"", digest))
            else:
                inbox.append((f, b, off, data, None))
                self._inbox_bytes += len(data)
        for f, b, off, n in ev.holes:  # after the digests: a datagram's pieces come first
            inbox.append((f, b, off, Hole(n), None))  # bounds: the sink's (receive_hole)
        if self._inbox_bytes > INBOX_HIGH and not self._paused:
            self._paused = True
            self.endpoint.pause_reading()
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._take())

    def _digest_part(self, f: int, b: int, at: int, data: memoryview) -> bytes | None:
        """A digest piece, or part of one (the core fills datagrams, so it may split it):
        the whole digest once every byte of it came, else None. At most
        ``MAX_DIGEST_PARTS`` digests are kept half-received (the oldest is forgotten:
        its sender resends the block when it is not acknowledged)."""
        if at == 0 and len(data) == DIGEST_SIZE:
            return bytes(data)
        if at + len(data) > DIGEST_SIZE:
            return None  # past the digest: nothing a sender of ours sends
        parts = self._digest_parts
        key = (f, b)
        got = parts.get(key)
        if got is None:
            if len(parts) >= MAX_DIGEST_PARTS:
                del parts[next(iter(parts))]
            got = parts[key] = (bytearray(DIGEST_SIZE), bytearray(DIGEST_SIZE))
        buf, seen = got
        buf[at:at + len(data)] = data
        seen[at:at + len(data)] = b"\x01" * len(data)
        if all(seen):
            del parts[key]
            return bytes(buf)
        return None

    async def _take(self) -> None:
        sink = self.sink
        assert sink is not None
        try:
            while self._inbox:
                batch, self._inbox = self._inbox, []
                n = sum(len(p[3]) for p in batch if not isinstance(p[3], Hole))
                await sink.batch(coalesce(batch))
                self._inbox_bytes -= n
                self.moved += n
                self.blocks += 1
                if self.on_bytes is not None:
                    self.on_bytes(n)
                self._touch()
                if self._paused and self._inbox_bytes < INBOX_LOW:
                    self._paused = False
                    self.endpoint.resume_reading()
        except (TransportError, OSError) as exc:  # refused pieces; the disk failing
            self._inbox.clear()
            self._inbox_bytes = 0
            self._fail(exc if isinstance(exc, TransportError)
                       else from_os_error(exc, "a received block"))
        finally:
            self._drain = None
            if self._paused:
                self._paused = False
                self.endpoint.resume_reading()
            self.changed.set()

    async def drained(self) -> None:
        """Wait until every piece received so far is in the sink."""
        while self._drain is not None:
            await asyncio.wait({self._drain})  # its failure is ``error``, not raised here

    # -- probing and closing --------------------------------------------------------------
    async def probe(self, timeout: float) -> float | None:
        """Round-trip time (s) of a full-size PROBE, or None without an answer in time."""
        if self.conn.closed:
            return None
        token = int.from_bytes(os.urandom(8), "big")
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._probes[token] = fut
        self.conn.probe(time.perf_counter(), token)
        self.endpoint.wake()
        try:
            return await asyncio.wait_for(fut, timeout)
        except (TimeoutError, asyncio.CancelledError):
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the caller is being cancelled (a probe no longer wanted)
            if not fut.cancelled() and fut.done():
                return fut.result()
            return None
        finally:
            self._probes.pop(token, None)

    def _fail(self, exc: TransportError) -> None:
        if self.error is None:
            self.error = exc
            if self.on_fail is not None:
                self.on_fail(exc)
        # An error a new connection would meet again (this end's disk full or read-only):
        # CLOSE_FAILED tells the peer not to retry (it used to re-connect for ever).
        for_good = exc.kind in (ErrorKind.INTERNAL, ErrorKind.FORBIDDEN, ErrorKind.CONFLICT) \
            and not isinstance(exc, ConnectionLost)
        self.close(exc.message, error=True, code=CLOSE_FAILED if for_good else CLOSE_ABORTED)

    def close(self, reason: str = "", *, error: bool = False, code: int | None = None) -> None:
        """Send CLOSE (or ERROR) and give back every lease; idempotent."""
        if not self.conn.closed:
            self.conn.close(time.perf_counter(),
                            code if code is not None else CLOSE_ABORTED if error else 0,
                            reason[:200], error=error)
            self.endpoint.wake()
        for t in list(self._reads):
            t.cancel()
        if self._ticker is not None:
            self._ticker.cancel()
        if self.sender is not None:
            self.sender.drop_path(self.path)
        self.changed.set()
