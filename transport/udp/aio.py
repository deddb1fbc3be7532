"""asyncio adapter: one non-blocking UDP socket, many ``UdpConnection`` s by connection id.

Thin on purpose. The socket is read with ``loop.add_reader`` (no ``DatagramProtocol``
object per datagram): each wake reads until the socket is empty or ``MAX_READS``
calls, with ``recvmsg_into`` and UDP GRO where the kernel has it (one call returns
many datagrams), splits, and hands each datagram to the connection named by its
header. Sending drains ``build_batch`` into one ``sendmsg`` per batch with UDP GSO
(or ``sendto`` per datagram without). When the socket's send buffer is full the
unsent batch is kept and sent when writable: nothing the core sealed is thrown away.

Time: the core is fed ``time.perf_counter()`` (``clock``), never ``loop.time()``:
uvloop's loop clock moves in 1 ms steps, which ruined aioquic's RTT estimate on
loopback (ANCHORS). The loop's timer is only used to wake up.

Owners register a handler ``(connection, event) -> None`` called for every event;
inside it they may queue pieces (``SendReady`` asks for them). After queuing pieces
from elsewhere (a disk thread's callback), call ``wake``.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import time
from collections import deque
from collections.abc import Callable

from transport.udp.connection import UdpConnection
from transport.udp.events import Address, Closed, Event
from transport.udp.sockopt import (
    GRO_CMSG_SPACE,
    TS_CMSG_SPACE,
    SocketFeatures,
    configure,
    gro_segment,
    gso_cmsg,
    log,
    rx_timestamp,
)

Handler = Callable[[UdpConnection, Event], None]
MAX_READS = 64            # recv calls per wake before the loop gets a turn
READ_HOLD = 0.001         # seconds the reader rests after a wake that read a trickle
TRICKLE = 8               # ... of fewer datagrams than this, one of them DATA-sized
_CID = struct.Struct("!Q")
_RECV_BUFFER = 1 << 16    # one datagram or one GRO batch (64 KiB)


class UdpEndpoint:
    """A bound UDP socket and the connections on it (the daemon has one for all)."""

    def __init__(self, sock: socket.socket, features: SocketFeatures,
                 loop: asyncio.AbstractEventLoop, clock: Callable[[], float]) -> None:
        self.sock = sock
        self.features = features
        self.loop = loop
        self.clock = clock
        self._gso = features.gso
        self._gro = features.gro
        self._conns: dict[int, tuple[UdpConnection, Handler]] = {}
        self._buf = bytearray(_RECV_BUFFER)
        self._mv = memoryview(self._buf)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._pending: deque[tuple[bytes, int, int, Address]] = deque()
        self._writing = False
        self._wake_scheduled = False
        self._closed = False
        self._paused = False
        self.unknown_cid = 0
        self.send_errors = 0
        self.last_send_error: str | None = None  # the newest send error's text, for a diagnosis
        self.refused = 0  # ICMP port unreachable seen (when the owner set IP_RECVERR)
        self.recv_calls = 0
        self.send_calls = 0
        self.blocked_sends = 0
        self._wall_offset: float | None = None  # CLOCK_REALTIME - clock (receive stamps)
        self._hold: asyncio.TimerHandle | None = None
        self.read_hold = READ_HOLD
        fd = sock.fileno()
        loop.add_reader(fd, self._on_readable)

    @classmethod
    async def bind(cls, host: str = "0.0.0.0", port: int = 33001, *, rcvbuf: int = 32 << 20,
                   sndbuf: int = 4 << 20, gso: bool = True, gro: bool = True,
                   clock: Callable[[], float] = time.perf_counter) -> UdpEndpoint:
        """Bind ``host:port`` (port 0: any). ``OSError`` when the address is taken."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(addr)
            features = configure(sock, rcvbuf=rcvbuf, sndbuf=sndbuf, gso=gso, gro=gro)
        except BaseException:
            sock.close()
            raise
        return cls(sock, features, loop, clock)

    @property
    def address(self) -> Address:
        return tuple(self.sock.getsockname())

    # -- connections ----------------------------------------------------------------------
    def add(self, conn: UdpConnection, handler: Handler) -> None:
        """Serve ``conn``; ``ValueError`` when its connection id is already served here."""
        if conn.connection_id in self._conns:
            raise ValueError(f"connection id {conn.connection_id:#x} already on this endpoint")
        self._conns[conn.connection_id] = (conn, handler)
        self.wake()

    def remove(self, conn: UdpConnection) -> None:
        self._conns.pop(conn.connection_id, None)

    def wake(self) -> None:
        """Service every connection soon (after an owner queued pieces outside a handler)."""
        if not self._wake_scheduled and not self._closed:
            self._wake_scheduled = True
            self.loop.call_soon(self._on_wake)

    def pause_reading(self) -> None:
        """Stop reading the socket (an owner that cannot keep up): datagrams queue in the
        kernel buffer, their one-way delay grows and delay-based senders slow down."""
        if not self._closed and not self._paused:
            self._paused = True
            self.loop.remove_reader(self.sock.fileno())  # (no-op during a rest)

    def resume_reading(self) -> None:
        if not self._closed and self._paused:
            self._paused = False
            if self._hold is None:  # a rest in progress adds the reader when it ends
                self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def close(self) -> None:
        """Stop serving (no CLOSE is sent: close connections first for that)."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._hold is not None:
            self._hold.cancel()
            self._hold = None
        if not self._paused:
            self.loop.remove_reader(self.sock.fileno())
        if self._writing:
            self.loop.remove_writer(self.sock.fileno())
        self.sock.close()
        self._conns.clear()

    # -- receiving ------------------------------------------------------------------------
    def _on_readable(self) -> None:
        sock, mv, conns, clock = self.sock, self._mv, self._conns, self.clock
        gro = self._gro
        stamps = self.features.rx_timestamps
        anc_space = (GRO_CMSG_SPACE if gro else 0) + (TS_CMSG_SPACE if stamps else 0)
        wall = time.time
        touched: dict[int, UdpConnection] = {}
        unpack_cid = _CID.unpack_from
        rx: float | None = None
        self._hold = None
        reads = 0
        big = 0
        for _ in range(MAX_READS):
            try:
                if anc_space:
                    n, anc, _flags, addr = sock.recvmsg_into([mv], anc_space)
                    seg = gro_segment(anc, n) if gro and anc else n
                else:
                    n, addr = sock.recvfrom_into(mv)
                    seg = n
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:  # ICMP port unreachable (IP_RECVERR set)
                self.refused += 1
                self.send_errors += 1
                continue
            except OSError:  # other ICMP errors reported on the socket
                self.send_errors += 1
                continue
            self.recv_calls += 1
            reads += n // seg if seg and n > seg else 1  # datagrams (GRO: segments)
            if seg >= 1000:
                big += 1
            now = clock()
            if stamps:
                # The kernel's receive time (CLOCK_REALTIME) on our clock: minus the
                # offset between the two clocks, measured only from a read of both
                # that nothing interrupted (bracketed by ``clock()`` within 100 us).
                # A preemption between ``now`` and ``wall()`` put the datagram
                # milliseconds early; one such too-low one-way delay stood as the base
                # for a minute and read as a standing queue (bench/README.md).
                ts = rx_timestamp(anc) if anc else None
                if ts is None:
                    rx = None
                else:
                    w = wall()
                    after = clock()
                    if after - now < 1e-4:
                        self._wall_offset = w - (now + after) / 2
                    off = self._wall_offset
                    rx = min(now, ts - off) if off is not None else None
            if len(touched) and (n > seg or self.recv_calls & 15 == 0):
                # Service between reads too, so FEEDBACK leaves on time under a flood
                # (a wake may read up to MAX_READS x 64 KiB) and events stay small.
                for conn in touched.values():
                    self._service(conn, now)
                touched.clear()
            if not n:  # an empty datagram is a stranger's too: counted like the rest
                self.unknown_cid += 1
            off = 0
            while off < n:
                end = min(off + seg, n)
                if end - off >= 12:
                    cid = unpack_cid(mv, off + 4)[0]
                    entry = conns.get(cid)
                    if entry is not None:
                        conn = entry[0]
                        conn.receive_datagram(mv[off:end], addr, now, rx)
                        touched[cid] = conn
                    else:
                        self.unknown_cid += 1
                else:
                    self.unknown_cid += 1
                off = end
        now = clock()
        for conn in touched.values():
            self._service(conn, now)
        self._arm_timer()
        if big and reads < TRICKLE and self.read_hold > 0 and not self._paused \
                and not self._closed:
            # Data arriving one datagram per wake (a WAN link's paced trickle; no GRO
            # across a router) costs a wake, a service pass and a timer per datagram:
            # 45 CPU s/GB on the emulated 100 Mbit/s link against 4 on loopback. Rest
            # the reader for READ_HOLD so the next wake finds a batch. The one-way
            # delay is measured to the kernel's receive stamp, so the rest is not
            # read as queueing; FEEDBACK leaves at most READ_HOLD later.
            self.loop.remove_reader(self.sock.fileno())
            self._hold = self.loop.call_later(self.read_hold, self._end_hold)

    def _end_hold(self) -> None:
        self._hold = None
        if self._closed or self._paused:
            return
        self.loop.add_reader(self.sock.fileno(), self._on_readable)
        self._on_readable()

    # -- sending and timers ---------------------------------------------------------------
    def _dispatch(self, conn: UdpConnection) -> bool:
        entry = self._conns.get(conn.connection_id)
        if entry is None:
            return False
        handler = entry[1]
        any_event = False
        while (ev := conn.next_event()) is not None:
            any_event = True
            handler(conn, ev)
            if isinstance(ev, Closed):
                self._closing(conn)
        return any_event

    def _closing(self, conn: UdpConnection) -> None:
        # Flush the CLOSE (if ours), then forget the connection.
        self._send(conn, self.clock())
        self.remove(conn)

    def _service(self, conn: UdpConnection, now: float) -> None:
        for _ in range(4):  # events may queue pieces, sending may emit SendReady
            self._dispatch(conn)
            if conn.connection_id not in self._conns:
                return
            if not self._send(conn, now) or not self._dispatch(conn):
                break

    def _send(self, conn: UdpConnection, now: float) -> bool:
        """Send what ``conn`` has due; False when the socket is full or nothing was due."""
        if self._pending:
            return False
        sent = False
        clock = self.clock
        # A fresh clock per batch: DATA is stamped as late as possible (the one-way
        # delay must not include the time this loop spent sealing earlier batches).
        while (batch := conn.build_batch(clock())) is not None:
            view, seg, count, addr = batch
            done = self._transmit(view, seg, count, addr)
            if done < count:  # socket full: keep the rest (a copy: the view is reused)
                self.blocked_sends += 1
                self._pending.append((bytes(view[done * seg:]), seg, count - done, addr))
                self._want_write()
                return False
            sent = True
        return sent

    def _transmit(self, data: memoryview | bytes, seg: int, count: int, addr: Address) -> int:
        """How many of the ``count`` datagrams the kernel took (fewer: the socket is full).

        Errors other than a full socket (unreachable, message too big) drop the datagrams:
        to the core that is loss, which it handles.
        """
        sock = self.sock
        if count > 1 and self._gso:
            try:
                sock.sendmsg([data], gso_cmsg(seg), 0, addr)
                self.send_calls += 1
                return count
            except (BlockingIOError, InterruptedError):
                return 0
            except OSError as exc:
                if exc.errno not in (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP):
                    self.send_errors += 1
                    self.last_send_error = exc.strerror or str(exc)
                    return count
                self._gso = False  # e.g. EIO: no checksum offload on this route
                log.warning("UDP GSO send failed (%s); sending datagrams one by one", exc)
        for i in range(count):
            try:
                sock.sendto(data[i * seg:(i + 1) * seg], addr)
                self.send_calls += 1
            except (BlockingIOError, InterruptedError):
                return i
            except OSError as exc:
                self.send_errors += 1
                self.last_send_error = exc.strerror or str(exc)
                if isinstance(exc, ConnectionRefusedError):
                    self.refused += 1
        return count

    def _want_write(self) -> None:
        if not self._writing:
            self._writing = True
            self.loop.add_writer(self.sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        while self._pending:
            data, seg, count, addr = self._pending[0]
            done = self._transmit(data, seg, count, addr)
            if done < count:
                self._pending[0] = (data[done * seg:], seg, count - done, addr)
                return
            self._pending.popleft()
        self._writing = False
        self.loop.remove_writer(self.sock.fileno())
        self._on_wake()

    def _on_wake(self) -> None:
        self._wake_scheduled = False
        if self._closed:
            return
        now = self.clock()
        for conn, _ in list(self._conns.values()):
            self._service(conn, now)
        self._arm_timer()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        if self._closed:
            return
        now = self.clock()
        for conn, _ in list(self._conns.values()):
            t = conn.get_timer()
            if t is not None and t <= now:
                conn.handle_timer(now)
            self._service(conn, now)
        self._arm_timer()

    def _arm_timer(self) -> None:
        if self._closed:
            return
        at = min((t for c, _ in self._conns.values() if (t := c.get_timer()) is not None),
                 default=float("inf"))
        if at == float("inf") or at >= self._timer_at:
            if at == float("inf") and self._timer is not None:
                self._timer.cancel()
                self._timer, self._timer_at = None, float("inf")
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        delay = at - self.clock()
        # Event-loop timers tick in milliseconds (uvloop truncates a 0.3 ms delay to 0
        # and would spin until the pacer's tokens are there): sleep at least 1 ms; the
        # pacer's 2 ms bucket keeps the rate, and batches get fuller.
        self._timer = self.loop.call_later(0.0 if delay <= 0 else max(delay, 0.001),
                                           self._on_timer)
