"""The asyncio adapter over real loopback sockets: encrypted bulk data, GSO/GRO on and
off, several connections on one socket, strangers' datagrams, a peer that goes away."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from transport.blocks.ranges import RangeSet
from transport.udp import (
    UdpConfig,
    UdpConnection,
    codec,
    derive_path_keys,
    new_path_secret,
)
from transport.udp.aio import UdpEndpoint
from transport.udp.events import (
    Closed,
    Event,
    PathSilent,
    PiecesAcked,
    PiecesLost,
    PiecesReceived,
    SendReady,
)

BLOCK = 1 << 20
BUFS = [i.to_bytes(8, "big") + os.urandom(BLOCK - 8) for i in range(16)]


class Sender:
    """Queues ``total`` bytes as 1 MiB blocks of file ``file``; re-queues lost pieces."""

    def __init__(self, total: int, file: int = 0) -> None:
        self.total, self.file = total, file
        self.next = 0
        self.acked = 0
        self.lost: list[tuple[int, int, int, int]] = []
        self.done = asyncio.get_running_loop().create_future()

    def feed(self, conn: UdpConnection) -> None:
        while self.lost and conn.send_budget() >= self.lost[-1][3]:
            f, b, off, n = self.lost.pop()
            conn.queue_piece(f, b, off, memoryview(BUFS[b % 16])[off:off + n],
                             retransmission=True)
        while self.next < self.total // BLOCK and conn.send_budget() >= BLOCK:
            conn.queue_piece(self.file, self.next, 0, BUFS[self.next % 16])
            self.next += 1

    def on_event(self, conn: UdpConnection, ev: Event) -> None:
        if isinstance(ev, PiecesAcked):
            self.acked += sum(p[3] for p in ev.pieces)
            if self.acked >= self.total and not self.done.done():
                self.done.set_result(None)
        elif isinstance(ev, PiecesLost):
            self.lost.extend(ev.pieces)
            self.feed(conn)
        elif isinstance(ev, SendReady):
            self.feed(conn)


class Receiver:
    """Checks every piece against the block it names; tracks coverage and duplicates."""

    def __init__(self, file: int = 0) -> None:
        self.file = file
        self.have: dict[int, RangeSet] = {}
        self.bytes = 0
        self.duplicates = 0
        self.wrong = 0
        self.events: list[Event] = []

    def on_event(self, conn: UdpConnection, ev: Event) -> None:
        if isinstance(ev, PiecesReceived):
            for f, b, off, data in ev.pieces:
                n = len(data)
                if f != self.file or data != BUFS[b % 16][off:off + n]:
                    self.wrong += 1
                    continue
                rs = self.have.setdefault(b, RangeSet())
                if rs.overlaps(off, off + n):
                    self.duplicates += n
                rs.add(off, off + n)
                self.bytes += n
        else:
            self.events.append(ev)

    def complete(self, total: int) -> bool:
        return (len(self.have) == total // BLOCK
                and all(rs.covers(0, BLOCK) for rs in self.have.values()))


def _pair(cid: int, server: UdpEndpoint, config: UdpConfig | None = None
          ) -> tuple[UdpConnection, UdpConnection]:
    """(client end knowing the server's address, server end learning the client's)."""
    secret = new_path_secret()
    now = time.perf_counter()
    cfg = config or UdpConfig()
    client = UdpConnection(cfg, cid, derive_path_keys(secret, initiator=True), now,
                           peer=server.address)
    daemon = UdpConnection(cfg, cid, derive_path_keys(secret, initiator=False), now)
    return client, daemon


@pytest.mark.parametrize("gso", [True, False], ids=["gso-gro", "plain"])
async def test_loopback_64_mib_encrypted_complete(gso: bool) -> None:
    total = 64 << 20
    server = await UdpEndpoint.bind("127.0.0.1", 0, gso=gso, gro=gso)
    client_ep = await UdpEndpoint.bind("127.0.0.1", 0, gso=gso, gro=gso)
    assert server.features.gso == gso and server.features.gro == gso
    try:
        client, daemon = _pair(0xC0FFEE, server)
        snd, rcv = Sender(total), Receiver()
        server.add(daemon, rcv.on_event)
        snd.feed(client)
        client_ep.add(client, snd.on_event)
        t0 = time.perf_counter()
        await asyncio.wait_for(snd.done, 90)
        elapsed = time.perf_counter() - t0
        assert rcv.complete(total) and rcv.wrong == 0
        st = client.stats()
        # Every byte arrived; any duplicate is a counted spurious retransmission.
        assert rcv.duplicates <= st.spurious_losses * 65000
        assert st.sent_piece_bytes == total + st.retransmitted_bytes
        assert daemon.stats().drops["auth"] == 0 and server.unknown_cid == 0
        print(f"64 MiB {'GSO/GRO' if gso else 'plain'}: {total / elapsed / 1e6:.0f} MB/s "
              f"in one process, lost {st.lost_bytes} B, rtt {st.rtt_ms:.2f} ms")
        client.close(time.perf_counter(), 0, "done")
        client_ep.wake()
        for _ in range(100):
            if any(isinstance(e, Closed) for e in rcv.events):
                break
            await asyncio.sleep(0.01)
        assert Closed(0, "done", False, True) in rcv.events
    finally:
        server.close()
        client_ep.close()


async def test_two_sessions_one_socket_and_strangers() -> None:
    server = await UdpEndpoint.bind("127.0.0.1", 0)
    up_ep = await UdpEndpoint.bind("127.0.0.1", 0)
    down_ep = await UdpEndpoint.bind("127.0.0.1", 0)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        total = 8 << 20
        up_client, up_daemon = _pair(1, server)
        down_client, down_daemon = _pair(2, server)
        up_snd, up_rcv = Sender(total, file=1), Receiver(file=1)
        down_snd, down_rcv = Sender(total, file=2), Receiver(file=2)
        server.add(up_daemon, up_rcv.on_event)
        server.add(down_daemon, down_snd.on_event)
        with pytest.raises(ValueError):
            server.add(up_daemon, up_rcv.on_event)
        up_snd.feed(up_client)
        down_snd.feed(down_daemon)  # waits for the client's first datagram (its address)
        up_ep.add(up_client, up_snd.on_event)
        down_ep.add(down_client, down_rcv.on_event)
        junk = [os.urandom(n) for n in (0, 5, 40, 1452)]
        junk.append(codec.encode_header(codec.DATA, 1, 10**6) + os.urandom(100))  # known cid
        junk.append(codec.encode_header(codec.DATA, 77, 0) + os.urandom(100))     # unknown
        for data in junk * 20:
            stranger.sendto(data, server.address)
        await asyncio.wait_for(asyncio.gather(up_snd.done, down_snd.done), 60)
        assert up_rcv.complete(total) and down_rcv.complete(total)
        assert up_rcv.wrong == 0 and down_rcv.wrong == 0
        assert server.unknown_cid >= 20 * 4  # short, random and unknown-cid datagrams
        assert up_daemon.drops["auth"] + up_daemon.drops["ahead"] >= 20
        assert up_daemon.peer == up_ep.address and down_daemon.peer == down_ep.address
    finally:
        stranger.close()
        for ep in (server, up_ep, down_ep):
            ep.close()


async def test_pause_reading_backpressure_then_complete() -> None:
    """An owner that pauses reading: datagrams wait in the kernel, the sender's delay
    signal rises and it slows; resumed, everything arrives."""
    server = await UdpEndpoint.bind("127.0.0.1", 0)
    client_ep = await UdpEndpoint.bind("127.0.0.1", 0)
    try:
        total = 16 << 20
        client, daemon = _pair(5, server)
        snd, rcv = Sender(total), Receiver()
        server.add(daemon, rcv.on_event)
        snd.feed(client)
        client_ep.add(client, snd.on_event)
        while rcv.bytes < 2 << 20:
            await asyncio.sleep(0.005)
        server.pause_reading()
        got = rcv.bytes
        await asyncio.sleep(0.3)
        assert rcv.bytes == got  # nothing read while paused
        server.resume_reading()
        await asyncio.wait_for(snd.done, 60)
        assert rcv.complete(total) and rcv.wrong == 0
    finally:
        server.close()
        client_ep.close()


async def test_peer_going_away_is_reported_silent() -> None:
    cfg = UdpConfig(silent_after=0.5, keepalive_interval=0.1)
    server = await UdpEndpoint.bind("127.0.0.1", 0)
    client_ep = await UdpEndpoint.bind("127.0.0.1", 0)
    try:
        client, daemon = _pair(3, server, cfg)
        events: list[tuple[float, Event]] = []
        server.add(daemon, lambda c, ev: events.append((time.perf_counter(), ev)))
        client_ep.add(client, lambda c, ev: None)
        await asyncio.sleep(0.3)
        assert daemon.peer == client_ep.address  # keepalives reached it
        gone = time.perf_counter()
        client_ep.close()
        for _ in range(300):
            if any(isinstance(e, PathSilent) for _, e in events):
                break
            await asyncio.sleep(0.01)
        silent = [(t, e) for t, e in events if isinstance(e, PathSilent)]
        assert silent, events
        assert silent[0][0] - gone <= 0.5 + 1.0  # the bound, plus slack for a busy host
    finally:
        server.close()
        client_ep.close()


async def test_socket_setup_reports_what_it_got() -> None:
    ep = await UdpEndpoint.bind("127.0.0.1", 0, rcvbuf=4 << 20, sndbuf=1 << 20,
                                gso=False, gro=False)
    try:
        f = ep.features
        assert not f.gso and not f.gro
        if os.geteuid() == 0:
            assert f.rcvbuf >= 4 << 20 and not f.notes  # forced past rmem_max
        else:
            assert f.rcvbuf >= 4 << 20 or any("rmem_max" in n for n in f.notes)
    finally:
        ep.close()
    with pytest.raises(OSError):
        taken = await UdpEndpoint.bind("127.0.0.1", 0)
        try:
            await UdpEndpoint.bind("127.0.0.1", taken.address[1])
        finally:
            taken.close()


class _FullEvery:
    """The real socket, except every ``k``-th send reports a full buffer (EAGAIN).

    Loopback never fills a UDP send buffer (it orphans the skb at once), so this is
    the one fault injected here; the retry then goes through the real socket.
    """

    def __init__(self, sock: socket.socket, k: int) -> None:
        self._sock, self._k, self._n = sock, k, 0
        self.refused = 0

    def _tick(self) -> None:
        self._n += 1
        if self._n % self._k == 0:
            self.refused += 1
            raise BlockingIOError(11, "Resource temporarily unavailable")

    def sendto(self, data: object, addr: object) -> int:
        self._tick()
        return self._sock.sendto(data, addr)  # type: ignore[call-overload, no-any-return]

    def sendmsg(self, buffers: object, anc: object, flags: int, addr: object) -> int:
        self._tick()
        return self._sock.sendmsg(buffers, anc, flags, addr)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


@pytest.mark.parametrize("gso", [True, False], ids=["gso", "plain"])
async def test_full_send_buffer_keeps_sealed_datagrams(gso: bool) -> None:
    """Batches the socket refuses wait for writability and go out whole: nothing the
    core sealed is dropped, so no loss is reported that the network did not cause."""
    server = await UdpEndpoint.bind("127.0.0.1", 0)
    client_ep = await UdpEndpoint.bind("127.0.0.1", 0, gso=gso)
    flaky = _FullEvery(client_ep.sock, 7)
    client_ep.sock = flaky  # type: ignore[assignment]
    try:
        total = 16 << 20
        client, daemon = _pair(4, server)
        snd, rcv = Sender(total), Receiver()
        server.add(daemon, rcv.on_event)
        snd.feed(client)
        client_ep.add(client, snd.on_event)
        await asyncio.wait_for(snd.done, 60)
        assert rcv.complete(total) and rcv.wrong == 0 and rcv.duplicates == 0
        assert flaky.refused > 10 and client_ep.blocked_sends > 0
        assert client.stats().lost_bytes == 0 and client_ep.send_errors == 0
    finally:
        server.close()
        client_ep.close()


class _Recording(UdpConnection):
    """A real connection that notes how long each datagram waited for the event loop
    (``now - rx_time``, None when the adapter gave no kernel receive time)."""

    waits: list[float | None]

    def receive_datagram(self, data: bytes | bytearray | memoryview, addr: object,
                         now: float, rx_time: float | None = None) -> None:
        self.waits.append(None if rx_time is None else now - rx_time)
        super().receive_datagram(data, addr, now, rx_time)  # type: ignore[arg-type]


@pytest.mark.skipif(not os.uname().sysname == "Linux", reason="SO_TIMESTAMPNS is Linux's")
@pytest.mark.parametrize("gro", [True, False], ids=["gro", "plain"])
async def test_kernel_receive_time_excludes_event_loop_lag(gro: bool) -> None:
    """A datagram that arrives while the receiving loop is blocked is handed over with
    the kernel's receive time: the wait is measured (about the 20 ms blocked) and is not
    part of its one-way delay (within ``host_lag_allowance``, 25 ms), so a busy host's
    lag does not read as a network queue."""
    server = await UdpEndpoint.bind("127.0.0.1", 0, gso=gro, gro=gro)
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert server.features.rx_timestamps
        secret = new_path_secret()
        now = time.perf_counter()
        client = UdpConnection(UdpConfig(), 9, derive_path_keys(secret, initiator=True), now,
                               peer=server.address)
        quiet = UdpConfig(ack_every=1000, max_ack_delay=5.0)  # feedback read here instead
        daemon = _Recording(quiet, 9, derive_path_keys(secret, initiator=False), now)
        daemon.waits = []
        server.add(daemon, lambda c, ev: None)
        await asyncio.sleep(0.01)
        def send(n: int) -> None:   # seal and send at once (KEEPALIVE left out: it
            client.queue_piece(0, 0, 0, bytes(n))  # would ask for feedback at once)
            data = [d for d in client.datagrams_to_send(time.perf_counter())
                    if d[0][2] == codec.DATA]
            for d in data:
                raw.sendto(*d)

        send(1000)
        for _ in range(50):                    # the first is read at once: the reference
            await asyncio.sleep(0.005)
            if daemon.waits:
                break
        assert daemon.waits and daemon.waits[0] is not None and daemon.waits[0] < 0.05
        send(2000)
        time.sleep(0.02)                      # the loop is blocked: a descheduled process
        for _ in range(50):
            await asyncio.sleep(0.01)
            if len(daemon.waits) >= 3:
                break
        waits = daemon.waits[1:]
        assert len(waits) == 2 and all(w is not None and 0.015 <= w <= 1.0 for w in waits), waits
        fb = daemon._feedback_body(time.perf_counter())
        assert fb is not None
        parsed = codec.parse_feedback(fb)
        assert parsed.owd_count == 3
        assert parsed.owd_max_us - parsed.owd_min_us < 8_000   # the 20 ms wait left out
    finally:
        raw.close()
        server.close()
