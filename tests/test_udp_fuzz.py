"""Bad input against the UDP path (issue #12 section 5), fixed seeds, fast.

1. The codec: every frame type sealed, then truncated, bit-flipped, extended or replaced
   by random bytes: header parsing, opening and body parsing raise only ``ProtocolError``
   or ``InvalidTag``, and whatever still parses is self-consistent (pieces inside the body).
2. The core mid-transfer on the scripted link: an on-path attacker copies, replays,
   reorders, truncates and bit-flips genuine datagrams and forges new ones (wrong key,
   wrong connection id, packet numbers far ahead), from the peer's address and from a
   stranger's, in both directions. Nothing raises, every injected datagram is counted
   once as a drop, no genuine one is, the peer addresses never move, and the real
   transfer delivers identical data with every byte once.
3. The asyncio adapter: a real socket pair moving data while a third socket floods the
   receiver with junk; the transfer completes intact and the junk is counted.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import socket
import time

import pytest
from cryptography.exceptions import InvalidTag

from tests.test_udp_aio import Receiver, Sender, _pair
from tests.udp_link import Link, Peer, Sim, Sink, Source, pair
from transport.errors import ProtocolError
from transport.udp import codec, derive_path_keys, new_path_secret
from transport.udp.aio import UdpEndpoint
from transport.udp.crypto import NONCE, Opener, Sealer
from transport.udp.events import PiecesReceived

# -- 1. codec ------------------------------------------------------------------------------


def _samples() -> list[tuple[int, bytes]]:
    fb = codec.Feedback(largest=40, ack_delay_us=5, recv_bytes=1 << 20, recv_packets=700,
                        recv_time_us=123, owd_count=3, owd_min_us=-5, owd_max_us=9, low=10,
                        ranges=((10, 20), (25, 30), (33, 41)))
    return [(codec.DATA, codec.encode_data(1, 2, [(1, 2, 3, b"abc" * 30), (4, 5, 6, b"z")])),
            (codec.FEEDBACK, codec.encode_feedback(fb, 1400)),
            (codec.KEEPALIVE, codec.encode_keepalive(7, 8)),
            (codec.PROBE, codec.encode_probe(1, 2, 300)),
            (codec.PROBE_ACK, codec.encode_probe_ack(1, 2, 3)),
            (codec.CLOSE, codec.encode_close(1, "bye")),
            (codec.ERROR, codec.encode_close(2, "no"))]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    op = rng.random()
    if op < 0.25:
        return bytes(buf[:rng.randrange(len(buf) + 1)])
    if op < 0.6:
        for _ in range(rng.randrange(1, 4)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        return bytes(buf)
    if op < 0.75:
        return bytes(buf) + rng.randbytes(rng.randrange(1, 40))
    return rng.randbytes(rng.randrange(0, 1600))


@pytest.mark.parametrize("seed", range(3))
def test_codec_sealed_datagrams_mutated_fail_only_cleanly(seed: int) -> None:
    rng = random.Random(seed)
    secret = new_path_secret()
    sealer = Sealer(derive_path_keys(secret, initiator=True).send)
    opener = Opener(derive_path_keys(secret, initiator=False).receive)
    sealed = []
    for pn, (type_, body) in enumerate(_samples()):
        hdr = codec.encode_header(type_, 0xABC, pn)
        sealed.append(hdr + sealer.seal(pn, hdr, body))
    outcomes = {"protocol": 0, "tag": 0, "parsed": 0}
    for _ in range(4000):
        original = rng.choice(sealed)
        data = _mutate(rng, original)
        try:
            h = codec.parse_header(data)
            body = opener.aead.decrypt(NONCE.pack(opener.iv_hi, opener.iv_lo ^ h.packet_number),
                                       data[codec.HEADER_SIZE:], data[:codec.HEADER_SIZE])
            frame = codec.parse_body(h.type, body)
        except ProtocolError:
            outcomes["protocol"] += 1
            continue
        except InvalidTag:
            outcomes["tag"] += 1
            continue
        # Only an unchanged datagram opens: the AEAD covers header and body.
        assert data == original
        outcomes["parsed"] += 1
        if isinstance(frame, codec.DataFrame):
            assert sum(len(p.data) + codec.PIECE_HEADER.size for p in frame.pieces) <= len(body)
    assert outcomes["protocol"] > 100 and outcomes["tag"] > 100, outcomes


@pytest.mark.parametrize("seed", range(3))
def test_codec_plain_bodies_parse_consistently_or_refuse(seed: int) -> None:
    """Bodies are parsed after the AEAD, but a bug there must still not crash or read
    outside the body: mutated plaintexts either raise ``ProtocolError`` or parse into
    pieces that lie inside the body and feedback ranges that are ordered."""
    rng = random.Random(100 + seed)
    samples = _samples()
    for _ in range(4000):
        type_, body = rng.choice(samples)
        data = _mutate(rng, body)
        if rng.random() < 0.2:
            type_ = rng.choice(list(codec.TYPE_NAMES))
        try:
            frame = codec.parse_body(type_, data)
        except ProtocolError:
            continue
        if isinstance(frame, codec.DataFrame):
            assert all(len(p.data) > 0 for p in frame.pieces)
            assert sum(len(p.data) + codec.PIECE_HEADER.size for p in frame.pieces) <= len(data)
        elif isinstance(frame, codec.Feedback):
            starts = [r[0] for r in frame.ranges]
            assert all(a < b for a, b in frame.ranges)
            assert starts == sorted(set(starts))


# -- 2. the core mid-transfer --------------------------------------------------------------


class AttackLink(Link):
    """A lossless link with an attacker on it: every genuine datagram arrives once, on
    time; with probability ``rate`` the attacker also injects a replay (later), a
    bit-flipped copy, a truncated copy, random bytes, a forgery under another key with a
    packet number just ahead, one far ahead, or one with another connection id. All
    injections appear from the sender's address (spoofed). ``injected`` counts them."""

    def __init__(self, rng: random.Random, cid: int, rate: float, **kw: object) -> None:
        super().__init__(rng, **kw)  # type: ignore[arg-type]
        self.cid = cid
        self.rate = rate
        self.injected = 0
        self.seen: list[bytes] = []
        self.wrong = Sealer(derive_path_keys(new_path_secret(), initiator=True).send)

    def forge(self, pn: int, cid: int | None = None) -> bytes:
        hdr = codec.encode_header(codec.DATA, self.cid if cid is None else cid, pn)
        body = codec.encode_data(0, 0, [(0, 0, 0, b"evil" * 40)])
        return hdr + self.wrong.seal(pn, hdr, body)

    def attack(self, data: bytes) -> list[bytes]:
        rng = self.rng
        pn = codec.HEADER.unpack_from(data, 0)[5]
        kind = rng.randrange(8)
        if kind == 0 and self.seen:
            return [rng.choice(self.seen)]                     # replay of an older one
        if kind == 1:
            buf = bytearray(data)
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            return [bytes(buf)]                                # bit flip
        if kind == 2:
            return [data[:rng.randrange(len(data))]]           # truncated
        if kind == 3:
            return [rng.randbytes(rng.randrange(0, 1500))]     # random
        if kind == 4:
            return [self.forge(pn + rng.randrange(1, 50))]     # wrong key, plausible pn
        if kind == 5:
            return [self.forge(pn + (1 << 40))]                # far ahead
        if kind == 6:
            return [self.forge(pn + 1, cid=self.cid ^ 0xFF)]   # another connection
        return [data + b"\x00" * rng.randrange(1, 9)]          # extended

    def transmit(self, now: float, data: bytes) -> list[tuple[float, bytes]]:
        out = super().transmit(now, data)
        if self.rng.random() < self.rate:
            for bad in self.attack(data):
                self.injected += 1
                # Later than the genuine copy (a replay), or before it (a race).
                out.append((now + self.delay * self.rng.uniform(0.9, 3.0), bad))
        if len(self.seen) < 64 or self.rng.random() < 0.05:
            self.seen.append(data)
            if len(self.seen) > 256:
                self.seen.pop(0)
        return out


class OpenSim(Sim):
    """``Sim`` where an end may also send to an address that is not its peer (a PROBE
    validating a new address, RFC 9000 section 8.2): those datagrams go nowhere and are
    kept in ``elsewhere``."""

    def __init__(self) -> None:
        super().__init__()
        self.elsewhere: list[tuple[str, object, int]] = []

    def _flush(self, name: str) -> None:
        p = self.peers[name]
        for data, addr in p.conn.datagrams_to_send(self.now):
            if addr != (p.other, 1):
                self.elsewhere.append((name, addr, len(data)))
                continue
            for when, d in p.link.transmit(self.now, data):
                heapq.heappush(self._heap, (when, self._seq, p.other, name, d))
                self._seq += 1


@pytest.mark.parametrize("seed", [1, 2])
def test_core_under_attack_mid_transfer_delivers_identical_data(seed: int) -> None:
    rng = random.Random(seed)
    blocks = {(0, i): rng.randbytes(256 << 10) for i in range(16)}  # 4 MiB
    src, sink = Source(blocks), Sink({k: len(v) for k, v in blocks.items()})
    a, b = pair(cid=0x77)
    fwd = AttackLink(rng, 0x77, 0.3, delay=0.01, reorder=0.05, reorder_extra=0.004)
    bwd = AttackLink(rng, 0x77, 0.6, delay=0.01)
    sim = OpenSim()
    sim.add("a", Peer(a, fwd, "b", src.on_event, src.feed))
    sim.add("b", Peer(b, bwd, "a", lambda ev: sink.on_event(ev, sim.now)))
    stranger = {"sent": 0}
    strangers_rng = random.Random(seed + 1000)

    def flood(now: float) -> None:
        """A stranger's datagrams (its own address) into both ends every 10 ms."""
        for dest, link in (("b", fwd), ("a", bwd)):
            for _ in range(5):
                pick = strangers_rng.random()
                if pick < 0.4 and len(link.seen) > 32:
                    data = strangers_rng.choice(link.seen[:-32])  # sniffed, replayed later
                elif pick < 0.7:
                    data = link.forge(strangers_rng.randrange(0, 5000))
                else:
                    data = strangers_rng.randbytes(strangers_rng.randrange(0, 1500))
                sim._heap.append((now, -1, dest, "mallory", data))
                stranger["sent"] += 1
        sim._heap.sort()

    sim.run(60.0, stop=lambda: src.done, every=(0.01, flood))
    assert src.done, f"not done at t={sim.now}"
    assert sink.complete() and sink.unknown == 0
    assert all(bytes(sink.data[k]) == v for k, v in blocks.items())
    assert src.acked_twice == 0
    # A sniffed copy racing the genuine one is reordering: the sender may
    # declare the packets it overtook lost and re-send them. A byte delivered twice is
    # such a re-send (never an injected datagram), and re-sends stay a few per cent.
    # (Not every one is counted as a spurious loss: when the overtaken original lands
    # after the floor moved past it, the receiver delivers it without acknowledging.)
    st = a.stats()
    assert sink.duplicate_bytes <= st.retransmitted_bytes <= st.lost_bytes
    assert st.retransmitted_bytes <= 0.08 * src.total
    assert fwd.injected > 100 and bwd.injected > 10 and stranger["sent"] > 100
    # Every injected or stranger's datagram is one counted drop; no genuine one is
    # (the link itself loses nothing; whatever is still in flight at the stop is not
    # counted on either side, so allow for those).
    in_flight = len(sim._heap)
    drops = sum(a.drops.values()) + sum(b.drops.values())
    injected = fwd.injected + bwd.injected + stranger["sent"]
    assert injected - in_flight <= drops <= injected
    assert b.drops["auth"] > 0 and b.drops["replay"] > 0 and b.drops["cid"] > 0
    assert b.drops["ahead"] > 0 and b.drops["magic"] + b.drops["short"] > 0
    assert a.peer == ("b", 1) and b.peer == ("a", 1)  # nothing moved the peer address
    # A sniffed datagram replayed from the stranger's address before the genuine copy
    # arrives is authentic: the end validates that address with a PROBE (never more than
    # a full datagram) and keeps its peer, since the stranger cannot answer.
    assert all(addr == ("mallory", 1) and n <= a.size for _, addr, n in sim.elsewhere)
    assert not a.closed and not b.closed


def test_replayed_and_forged_close_cannot_end_a_transfer() -> None:
    """A sniffed CLOSE replayed, and a CLOSE forged under another key, are dropped."""
    a, b = pair(cid=9)
    a.queue_piece(0, 0, 0, b"y" * 3000)
    genuine = [d for d, _ in a.datagrams_to_send(0.0)]
    for d in genuine:
        b.receive_datagram(d, ("a", 1), 0.0)
    wrong = Sealer(derive_path_keys(new_path_secret(), initiator=True).send)
    hdr = codec.encode_header(codec.CLOSE, 9, 50)
    b.receive_datagram(hdr + wrong.seal(50, hdr, codec.encode_close(0, "x")), ("m", 1), 0.0)
    for d in genuine:
        b.receive_datagram(d, ("m", 1), 0.0)
    assert not b.closed
    assert b.drops["auth"] == 1 and b.drops["replay"] == len(genuine)
    ev = b.next_event()
    assert isinstance(ev, PiecesReceived) and sum(len(p[3]) for p in ev.pieces) == 3000
    assert b.next_event() is None


# -- 3. the adapter: a flood from a third socket -------------------------------------------


def _kernel_drops(port: int) -> int:
    """Datagrams the kernel dropped at the 127.0.0.1:``port`` UDP socket (full buffer)."""
    for line in open("/proc/net/udp").read().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}":
            return int(fields[-1])
    return 0


async def test_adapter_flood_from_third_socket_during_transfer() -> None:
    total = 16 << 20
    server = await UdpEndpoint.bind("127.0.0.1", 0)
    client_ep = await UdpEndpoint.bind("127.0.0.1", 0)
    flooder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flooder.setblocking(False)
    try:
        client, daemon = _pair(0xF100D, server)
        snd, rcv = Sender(total), Receiver()
        server.add(daemon, rcv.on_event)
        snd.feed(client)
        client_ep.add(client, snd.on_event)
        rng = random.Random(5)
        wrong = Sealer(derive_path_keys(new_path_secret(), initiator=True).send)
        sent = 0

        def junk() -> bytes:
            pick = rng.randrange(4)
            if pick == 0:  # the right connection id under the wrong key
                pn = rng.randrange(0, 3000)
                hdr = codec.encode_header(codec.DATA, 0xF100D, pn)
                return hdr + wrong.seal(pn, hdr, codec.encode_data(
                    0, 0, [(0, 0, 0, b"evil" * 300)]))
            if pick == 1:  # unknown connection id
                return codec.encode_header(codec.DATA, rng.randrange(1 << 64), 1) + bytes(200)
            if pick == 2:
                return rng.randbytes(rng.randrange(0, 40))  # short
            return rng.randbytes(rng.randrange(40, 1452))

        t0 = time.perf_counter()
        while not snd.done.done() and time.perf_counter() - t0 < 60:
            for _ in range(50):
                try:
                    flooder.sendto(junk(), server.address)
                    sent += 1
                except BlockingIOError:
                    break
            await asyncio.sleep(0.001)
        await asyncio.wait_for(snd.done, 30)
        for _ in range(100):  # the last junk may still wait in the socket buffer
            await asyncio.sleep(0.01)
            if server.unknown_cid + sum(daemon.drops.values()) >= sent:
                break
        assert rcv.complete(total) and rcv.wrong == 0
        assert rcv.duplicates <= client.stats().spurious_losses * 1394  # counted re-sends
        assert sent > 1000
        counted = server.unknown_cid + sum(daemon.drops.values())
        # Every junk datagram that reached the socket was counted once; the kernel may
        # have dropped some (junk or genuine) with the receive buffer full, and says how
        # many. A genuine datagram is never counted as a drop.
        kernel = _kernel_drops(server.address[1])
        assert sent - kernel <= counted <= sent, (counted, sent, kernel)
        assert daemon.drops["auth"] + daemon.drops["ahead"] + daemon.drops["replay"] > 0
        assert daemon.peer == client_ep.address
        assert not daemon.closed and not client.closed
        print(f"flood: {sent} junk datagrams during {total >> 20} MiB, {counted} counted")
    finally:
        flooder.close()
        server.close()
        client_ep.close()
